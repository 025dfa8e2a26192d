"""Shared pieces of the export tests: task rows, a real LoRA adapter, tiny models of other chat families.

Tiny models reuse SmolLM2's real tokenizer (BPE) with the family's special tokens added and the
family's real chat template (tests/chat_templates/, fetched from the model repositories by llama.cpp's
scripts/get_chat_template.py; TinyLlama's written from its tokenizer_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.models import PLAIN_CHAT_TEMPLATE, resolve_model
from finetune.pipeline import RunDir
from finetune.testing import compose

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

    from finetune.models import adapt_messages

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


def real_tokenizer_dir(family: str) -> Path:
    """The family's real tokenizer as an HF directory, extracted from llama.cpp's vocab GGUF once."""
    import tarfile
    import tempfile

    from transformers import AutoTokenizer

    from finetune.export.llamacpp import _download_sdist, llama_cpp_version
    from finetune.models import _file_lock, cache_root

    name = REAL_VOCAB[family]
    out = cache_root() / "test-tokenizers" / name.removesuffix(".gguf")
    with _file_lock(out.with_suffix(".lock")):
        if (out / "tokenizer_config.json").is_file():
            return out
        with tempfile.TemporaryDirectory() as tmp:
            version = llama_cpp_version()
            sdist = _download_sdist(version, Path(tmp))
            with tarfile.open(sdist) as tar:
                member = tar.getmember(f"llama_cpp_python-{version}/vendor/llama.cpp/models/{name}")
                member.name = name
                tar.extractall(tmp, members=[member], filter="data")
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
            tok.save_pretrained(out)
    return out


def family_tokenizer(family: str, real_vocab: bool = False):
    """The family's chat template and special tokens on SmolLM2's tokenizer (or, with real_vocab, on
    the family's real tokenizer)."""
    from transformers import AutoTokenizer

    _, template, special, bos, eos = FAMILIES[family]
    if real_vocab:
        tok = AutoTokenizer.from_pretrained(real_tokenizer_dir(family))
        special = [t for t in special if t not in tok.get_vocab()]
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model(compose(["model=smollm2"]).model))
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    tok.chat_template = template if "{%" in template else (TEMPLATES / template).read_text()
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    return tok


def tiny_model(family: str, out: Path, end_turn_bias: bool = True) -> Path:
    """A tiny random-weight model of the family's architecture with the family tokenizer, saved to `out`.

    With end_turn_bias the model always predicts its end-of-turn token (embedding dimension 0 is a
    large constant nothing writes to; only the end-of-turn row of lm_head reads it), so generation
    with it stops like a trained chat model's; everything else is random.
    """
    import torch
    import transformers

    tok = family_tokenizer(family, real_vocab=family in REAL_VOCAB)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    arch = {"chatml": ("Qwen2Config", "Qwen2ForCausalLM"), "llama3": ("LlamaConfig", "LlamaForCausalLM"),
            "phi3": ("Phi3Config", "Phi3ForCausalLM"), "gemma": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
            "zephyr": ("LlamaConfig", "LlamaForCausalLM"), "plain": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
    conf_cls, model_cls = (getattr(transformers, n) for n in arch[family])
    extra = {"head_dim": 16} if family in ("gemma", "plain") else {}
    torch.manual_seed(0)
    model = model_cls(conf_cls(**common, **extra)).eval()
    if end_turn_bias:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[:, 0] = 8.0 if family not in ("gemma", "plain") else 8.0 / 64 ** 0.5
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p[0, :] = 0.0
            head = model.get_output_embeddings().weight
            head.mul_(0.01)
            head[:, 0] = 0.0
            head[tok.convert_tokens_to_ids(FAMILIES[family][4]), 0] = 50.0
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if family == "phi3":  # llama.cpp's converter reads a BPE Phi-3 vocabulary when the class says so
        cfg_path = out / "tokenizer_config.json"
        data = json.loads(cfg_path.read_text())
        data["tokenizer_class"] = "GPT2Tokenizer"
        cfg_path.write_text(json.dumps(data, indent=2))
    return out


def family_task_cfg(family: str, path: Path, run_dir: Path, overrides: list[str] = ()):
    name = FAMILIES[family][0]
    return compose([f"model={name}", f"model.path={path}", "model.source=path", "task=extraction", "method=lora",
                    "export=default", f"run_dir={run_dir}", "evaluate.n_threads=1", *overrides])

