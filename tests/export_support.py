"""Shared pieces of the export tests: task rows, a real LoRA adapter, tiny models of other chat families.

Tiny models get the family's real chat template (tests/chat_templates/, fetched from the model
repositories by llama.cpp's scripts/get_chat_template.py; TinyLlama's written from its
tokenizer_config.json) and, where one is available offline, the family's real tokenizer (Qwen 2.5,
Llama 3, Phi-3; Gemma 2 gets the Gemma 3 vocabulary); the others reuse SmolLM2's real tokenizer (BPE)
with the family's special tokens added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.core.config import compose
from finetune.core.rundir import RunDir
from finetune.models.families import PLAIN_CHAT_TEMPLATE
from finetune.models.loading import resolve_model

TEMPLATES = Path(__file__).parent / "chat_templates"

ADDRESSES = [
    ("123 Main St, Springfield, IL 62704",
     {"AddressNumber": "123", "StreetName": "Main", "StreetNamePostType": "St", "PlaceName": "Springfield",
      "StateName": "IL", "ZipCode": "62704"}),
    ("9 Elm Avenue Apt 4, Portland, OR 97205",
     {"AddressNumber": "9", "StreetName": "Elm", "StreetNamePostType": "Avenue", "OccupancyType": "Apt",
      "OccupancyIdentifier": "4", "PlaceName": "Portland", "StateName": "OR", "ZipCode": "97205"}),
    ("500 W Madison St, Chicago, IL 60661",
     {"AddressNumber": "500", "StreetNamePreDirectional": "W", "StreetName": "Madison", "StreetNamePostType": "St",
      "PlaceName": "Chicago", "StateName": "IL", "ZipCode": "60661"}),
    ("77 Sunset Blvd, Los Angeles, CA 90028",
     {"AddressNumber": "77", "StreetName": "Sunset", "StreetNamePostType": "Blvd", "PlaceName": "Los Angeles",
      "StateName": "CA", "ZipCode": "90028"}),
    ("1600 Pennsylvania Ave NW, Washington, DC 20500",
     {"AddressNumber": "1600", "StreetName": "Pennsylvania", "StreetNamePostType": "Ave",
      "StreetNamePostDirectional": "NW", "PlaceName": "Washington", "StateName": "DC", "ZipCode": "20500"}),
    ("42 Harbor Rd, Boston, MA 02110",
     {"AddressNumber": "42", "StreetName": "Harbor", "StreetNamePostType": "Rd", "PlaceName": "Boston",
      "StateName": "MA", "ZipCode": "02110"}),
]

# TinyLlama-1.1B-Chat-v1.0's chat_template (Zephyr format), as in its tokenizer_config.json.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# family -> (registry model whose config to use, chat template, special tokens to add, bos, eos)
FAMILIES = {
    "chatml": ("qwen2.5-0.5b", "Qwen-Qwen2.5-7B-Instruct.jinja", [], None, "<|im_end|>"),
    "llama3": ("llama3.2-1b", "meta-llama-Llama-3.2-3B-Instruct.jinja",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|end_of_text|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "phi3": ("phi3", "microsoft-Phi-3.5-mini-instruct.jinja",
             ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>"),
    "gemma": ("gemma2", "google-gemma-2-2b-it.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<end_of_turn>"),
    "zephyr": ("tinyllama", ZEPHYR_TEMPLATE, ["</s>", "<|system|>", "<|user|>", "<|assistant|>"], None, "</s>"),
    "plain": ("gemma3-270m", PLAIN_CHAT_TEMPLATE, ["<bos>", "<eos>"], "<bos>", "<eos>"),
}


def smollm2_cfg(run_dir: Path, overrides: list[str] = ()):
    return compose(["model=smollm2", "task=extraction", "method=lora", "export=default", f"run_dir={run_dir}",
                    "evaluate.n_threads=1", *overrides])


def write_task_data(cfg, run: RunDir) -> None:
    """Rows in the data stage's format (prompt/completion + reference)."""
    run.data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (address, fields) in enumerate(ADDRESSES):
        prompt = [{"role": "system", "content": cfg.task.system_prompt},
                  {"role": "user", "content": cfg.task.prompt_template.replace("{input}", address)}]
        rows.append({"id": f"extraction-{i:06d}", "prompt": prompt,
                     "completion": [{"role": "assistant", "content": json.dumps(fields)}], "reference": fields})
    splits = {"train": rows[:4], "validation": rows[4:5], "test": rows[5:]}
    for split, part in splits.items():
        (run.data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def train_lora(cfg, run: RunDir, model, tokenizer, steps: int = 4, lr: float = 1e-3) -> None:
    """A real LoRA adapter: a few AdamW steps on the task rows, saved like the train stage does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.models.loading import adapt_messages

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=list(cfg.model.lora_target_modules)))
    rows = [json.loads(line) for line in (run.data_dir / "train.jsonl").read_text().splitlines()]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for step in range(steps):
        row = rows[step % len(rows)]
        text = tokenizer.apply_chat_template(adapt_messages(row["prompt"] + row["completion"], cfg.model),
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)


# Families whose real tokenizer llama.cpp ships as a vocabulary-only GGUF (in the same sdist as its
# converter): a tiny model of these architectures gets the real tokenizer (transformers 5 forces
# Qwen2Tokenizer on model_type qwen2, so SmolLM2's vocabulary would not survive the round trip).
REAL_VOCAB = {"chatml": "ggml-vocab-qwen2.gguf", "llama3": "ggml-vocab-llama-bpe.gguf"}

# SentencePiece families get their real vocabulary back as tokenizer.model (finetune.gguf_vocab), next
# to the tokenizer_config.json their model repository publishes, because llama.cpp's converter reads
# tokenizer.model for them. Phi-3: llama.cpp's Phi-3 vocabulary GGUF (the Llama 2 pieces, 32000, plus
# 11 added chat tokens). TinyLlama: the Llama 2 vocabulary it was trained with. Gemma 2: its own 256k
# vocabulary is on no package registry, so the tiny Gemma 2 gets the Gemma 3 vocabulary (262k pieces,
# same format and turn tokens) from the packaged Gemma 3 270M.
SPM_VOCAB = {"phi3": "ggml-vocab-phi-3.gguf", "zephyr": "ggml-vocab-llama-spm.gguf", "gemma": "package:gemma3-270m"}
SPM_FAMILIES = set(SPM_VOCAB)

_PHI3_ADDED = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>", 32003: "<|placeholder2|>",
               32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>", 32007: "<|end|>",
               32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>"}


def _added(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def phi3_tokenizer_config() -> dict:
    """microsoft/Phi-3.5-mini-instruct's tokenizer_config.json (chat template aside): chat tokens strip
    the whitespace after them (rstrip), no BOS added, legacy=False."""
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>", special=False, rstrip=True)}
    decoder.update({str(i): _added(t, rstrip=t != "<|endoftext|>") for i, t in _PHI3_ADDED.items()})
    return {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
            "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
            "model_max_length": 131072, "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}


def tinyllama_tokenizer_config() -> dict:
    """TinyLlama/TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json (chat template aside): the Llama 2
    tokenizer, BOS added, </s> ends a turn and pads."""
    return {"add_bos_token": True, "add_eos_token": False,
            "added_tokens_decoder": {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")},
            "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
            "model_max_length": 2048, "pad_token": "</s>", "padding_side": "right", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}


def gemma_tokenizer_config(vocab) -> dict:
    """google/gemma-2-2b-it's tokenizer_config.json (chat template aside): control tokens are special added
    tokens; user-defined pieces (runs of spaces, tabs and newlines, HTML tags) are plain added tokens,
    written as SentencePiece stores them (spaces as U+2581)."""
    decoder = {str(i): _added(t.replace(" ", "\u2581"), special=bool(a & 8))
               for i, (t, a) in enumerate(zip(vocab.tokens, vocab.attrs)) if a & (8 | 16)}
    return {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "bos_token": "<bos>",
            "clean_up_tokenization_spaces": False, "eos_token": "<eos>", "model_max_length": 8192,
            "pad_token": "<pad>", "padding_side": "left", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}


def llama_cpp_vocab(name: str) -> Path:
    """One of llama.cpp's vocabulary-only GGUFs (models/ggml-vocab-*.gguf in the llama-cpp-python sdist),
    with its tokenizer test vectors (.inp texts, .out token ids of the real tokenizer) when it has them;
    extracted once into the cache."""
    import tarfile
    import tempfile

    from finetune.core.cache import cache_root, file_lock
    from finetune.export.converter import download_sdist, llama_cpp_version

    out = cache_root() / "test-tokenizers" / "llama.cpp-vocab"
    with file_lock(out.parent / "llama.cpp-vocab.lock"):
        if not (out / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            version = llama_cpp_version()
            # All the vocabularies the tests use, from one download of the sdist.
            wanted = {name} | {v for v in [*REAL_VOCAB.values(), *SPM_VOCAB.values()] if v.endswith(".gguf")}
            with tempfile.TemporaryDirectory() as tmp, tarfile.open(download_sdist(version, Path(tmp))) as tar:
                prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/models/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                           and m.name[len(prefix):].removesuffix(".inp").removesuffix(".out") in wanted]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(out, members=members, filter="data")
    return out / name


def _vocab_gguf(name: str) -> Path:
    """A vocabulary GGUF: one of llama.cpp's or, for "package:<model>", a packaged registry model's GGUF."""
    from finetune.models.gguf_source import packaged_gguf_path

    if name.startswith("package:"):
        return packaged_gguf_path(compose([f"model={name.split(':', 1)[1]}"]).model)
    return llama_cpp_vocab(name)


def _write_spm_tokenizer(family: str, gguf: Path, out: Path) -> None:
    """tokenizer.model + the repository's tokenizer_config.json (+ tokenizer.json) for a SentencePiece family."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from finetune.models.gguf_vocab import read_gguf_vocab, sentencepiece_model

    vocab = read_gguf_vocab(gguf)
    out.mkdir(parents=True, exist_ok=True)
    if family == "gemma":
        (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
        config = gemma_tokenizer_config(vocab)
    else:  # the Llama 2 SentencePiece model (Phi-3 adds its chat tokens on top)
        (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab, n_pieces=32000))
        config = phi3_tokenizer_config() if family == "phi3" else tinyllama_tokenizer_config()
        # Their tokenizer.json holds the BPE merges in SentencePiece score order (whitespace runs merge
        # last), as transformers 4 converted them; transformers 5 rebuilding them from tokenizer.model
        # orders them by id and splits runs of spaces differently from SentencePiece and llama.cpp.
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        pieces = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
        merges = generate_merges(pieces, scores, skip_tokens=["<unk>", "<s>", "</s>"])
        # (and its post-processor adds BOS as add_bos_token says: transformers 5 takes it from this file)
        backend = LlamaTokenizer(vocab=pieces, merges=merges, **{
            k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "add_bos_token")})
        backend.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(out)  # the files load as the repository's do: real ids, BOS rule
    for i, entry in config["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(entry["content"]) == int(i), (family, i, entry["content"])
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == config["add_bos_token"], family


def real_tokenizer_dir(family: str) -> Path:
    """The family's real tokenizer as an HF directory, made once from its vocabulary GGUF."""
    import tempfile

    from transformers import AutoTokenizer

    from finetune.core.cache import cache_root, file_lock

    name = REAL_VOCAB.get(family) or SPM_VOCAB[family]
    out = cache_root() / "test-tokenizers" / name.removesuffix(".gguf").replace(":", "-")
    with file_lock(out.with_suffix(".lock")):
        if (out / "tokenizer_config.json").is_file():
            return out
        gguf = _vocab_gguf(name)
        if family in SPM_FAMILIES:
            with tempfile.TemporaryDirectory() as tmp:
                _write_spm_tokenizer(family, gguf, Path(tmp) / "tokenizer")
                shutil.copytree(Path(tmp) / "tokenizer", out)
        else:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def family_tokenizer(family: str, real_vocab: bool = False):
    """The family's chat template and special tokens on SmolLM2's tokenizer (or, with real_vocab, on
    the family's real tokenizer; a SentencePiece family keeps its repository's BOS/EOS)."""
    from transformers import AutoTokenizer

    _, template, special, bos, eos = FAMILIES[family]
    if real_vocab:
        tok = AutoTokenizer.from_pretrained(real_tokenizer_dir(family))
        special = [t for t in special if t not in tok.get_vocab()]
        if family in SPM_FAMILIES:  # the repository's tokenizer as published: nothing added or renamed
            special, bos, eos = [], None, None
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model(compose(["model=smollm2"]).model))
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    tok.chat_template = template if "{%" in template else (TEMPLATES / template).read_text()
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    return tok


def tiny_model(family: str, out: Path, end_turn_bias: bool = True) -> Path:
    """A tiny random-weight model of the family's architecture with the family tokenizer, saved to `out`.

    With end_turn_bias the model always predicts its end-of-turn token (embedding dimension 0 is a
    large constant nothing writes to; only the end-of-turn row of lm_head reads it, or, with tied
    embeddings, reads it more strongly than the other rows), so generation with it stops like a trained
    chat model's; everything else is random.
    """
    import torch
    import transformers

    real = family in REAL_VOCAB or family in SPM_FAMILIES
    tok = family_tokenizer(family, real_vocab=real)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    arch = {"chatml": ("Qwen2Config", "Qwen2ForCausalLM"), "llama3": ("LlamaConfig", "LlamaForCausalLM"),
            "phi3": ("Phi3Config", "Phi3ForCausalLM"), "gemma": ("Gemma2Config", "Gemma2ForCausalLM"),
            "zephyr": ("LlamaConfig", "LlamaForCausalLM"), "plain": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
    conf_cls, model_cls = (getattr(transformers, n) for n in arch[family])
    extra = {
        # Gemma 2 as google/gemma-2-2b-it is configured: tied embeddings, logit soft-capping in attention
        # and on the output, alternating sliding-window layers, queries scaled by head_dim.
        "gemma": dict(head_dim=16, tie_word_embeddings=True, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, query_pre_attn_scalar=16, sliding_window=4096),
        "plain": dict(head_dim=16),
    }.get(family, {})
    torch.manual_seed(0)
    model = model_cls(conf_cls(**{**common, **extra})).eval()
    if end_turn_bias:
        end_turn = tok.convert_tokens_to_ids(FAMILIES[family][4])
        scaled = family in ("gemma", "plain")  # Gemma multiplies embeddings by sqrt(hidden_size)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[:, 0] = 8.0 / 64 ** 0.5 if scaled else 8.0
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p[0, :] = 0.0
            if model.config.tie_word_embeddings:
                emb[end_turn, 0] *= 3.0
            else:
                head = model.get_output_embeddings().weight
                head.mul_(0.01)
                head[:, 0] = 0.0
                head[end_turn, 0] = 50.0
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if family in SPM_FAMILIES:  # as in the model repository: llama.cpp's converter reads it
        shutil.copy(real_tokenizer_dir(family) / "tokenizer.model", out / "tokenizer.model")
    return out


def family_task_cfg(family: str, path: Path, run_dir: Path, overrides: list[str] = ()):
    name = FAMILIES[family][0]
    return compose([f"model={name}", f"model.path={path}", "model.source=path", "task=extraction", "method=lora",
                    "export=default", f"run_dir={run_dir}", "evaluate.n_threads=1", *overrides])

