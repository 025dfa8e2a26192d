"""Merge stage: the trained adapter folded into the base weights, saved as a plain safetensors model.

The base is reloaded in full precision for the merge (merging into 4-bit layers is slow and lossy,
docs/training.md); the merged model must give the adapter model's logits on a real task example, and the saved
files must reload to exactly the merged weights. The folder also gets the tokenizer with its chat
template, a generation config that stops at every end-of-turn token, and a model card.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.core.files import dir_size, staged_dir
from finetune.core.rundir import RunDir
from finetune.export.card import model_card
from finetune.export.samples import task_prompt
from finetune.models.loading import (
    SENTENCEPIECE_FILE,
    adapt_messages,
    load_model,
    saved_tokenizer,
    sentencepiece_model_file,
)
from finetune.runtimes.transformers import stop_token_ids

log = logging.getLogger("finetune")

# fp32 merge of a LoRA delta: differences come from summation order only (< 1e-4 measured on SmolLM2-135M).
MERGE_ATOL = 1e-3
# Same weights, fresh process state: only kernel choice (e.g. sdpa vs eager) can differ.
RELOAD_ATOL = 1e-4


def complete_tokenizer_config(tokenizer: Any, dest: Path) -> dict:
    """Write into dest/tokenizer_config.json what transformers 5 keeps only in tokenizer.json and llama.cpp's
    converter reads only from tokenizer_config.json (transformers 4 wrote both there):

    - add_bos_token / add_eos_token, as the tokenizer behaves. The converter reads a post-processor that
      adds nothing as "unset", and llama.cpp then adds BOS to every prompt of a SentencePiece model
      (Phi-3) trained without one.
    - added_tokens_decoder, plus the user-defined pieces of dest/tokenizer.model. The SentencePiece
      converter takes user-defined pieces from it only; without them Gemma's runs of spaces become
      ordinary pieces and llama.cpp splits "\n  indented" differently from transformers. (A piece such
      as "▁▁" never matches raw text as an added token, so transformers tokenizes as before.)
    """
    ids = tokenizer("a")["input_ids"]
    added = {i: {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
             for i, t in tokenizer.added_tokens_decoder.items()}
    for i, piece in _user_defined_pieces(dest / SENTENCEPIECE_FILE).items():
        added.setdefault(i, {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": False})
    extra = {
        "add_bos_token": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "add_eos_token": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
        "added_tokens_decoder": {str(i): added[i] for i in sorted(added)},
    }
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, **extra}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return extra


def _user_defined_pieces(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return {i: p.piece for i, p in enumerate(proto.pieces) if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}


def copy_sentencepiece_model(cfg: Config, run: RunDir, dest: Path) -> Path | None:
    """tokenizer.model (SentencePiece families: Gemma, Phi-3, Llama 2) next to the merged weights: llama.cpp's
    converter reads it and transformers 5's save_pretrained does not write it."""
    src = run.adapter_dir / SENTENCEPIECE_FILE
    if not src.is_file():
        src = sentencepiece_model_file(cfg.model)
    if src is None:
        return None
    return Path(shutil.copyfile(src, dest / SENTENCEPIECE_FILE))


def sample_ids(cfg: Config, run: RunDir, tokenizer: Any, max_tokens: int = 256) -> Any:
    """Token ids of one real example (prompt + reference answer), as training saw them."""
    import torch

    prompt, completion = task_prompt(cfg, run)
    messages = prompt + ([{"role": "assistant", "content": completion}] if completion else [])
    text = tokenizer.apply_chat_template(adapt_messages(messages, cfg.model), tokenize=False,
                                         add_generation_prompt=completion is None)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor([ids])


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _save_dtype(model: Any) -> Any:
    """Save in the base checkpoint's own precision (bf16 for most hub models, fp32 for ours)."""
    import torch

    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def merged_model(cfg: Config, run: RunDir, ids: Any) -> tuple[Any, dict]:
    """The fp32 merged model and what the merge check measured."""
    import torch

    method = str(cfg.method.name)
    if method == "full":  # the trainer saved the whole fine-tuned model in adapter_dir
        model = load_model(cfg.model, dtype=torch.float32, path=str(run.adapter_dir)).eval()
        return model, {"method": method, "merge_logits_max_diff": 0.0}
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{run.adapter_dir} holds no LoRA adapter (adapter_config.json); run the train stage")
    from peft import PeftModel

    base = load_model(cfg.model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    adapter_logits = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        base_logits = _logits(peft_model, ids)
    model = peft_model.merge_and_unload().eval()
    diff = (_logits(model, ids) - adapter_logits).abs().max().item()
    info = {
        "method": method,
        "merge_logits_max_diff": diff,
        "adapter_logits_change": (adapter_logits - base_logits).abs().max().item(),
        "sample_tokens": int(ids.shape[1]),
    }
    if not diff <= MERGE_ATOL:
        raise ExportError(
            f"the merged model does not reproduce the adapter model: max |logit diff| = {diff:.3g} > {MERGE_ATOL} "
            f"on a {ids.shape[1]}-token example. The adapter in {run.adapter_dir} may not match the base model.")
    return model, info


def merge(cfg: Config, run: RunDir) -> dict:
    """Stage `merge`: adapter + base -> run.merged_dir (safetensors, tokenizer, generation config, README)."""
    from transformers import AutoModelForCausalLM

    if not cfg.export.merge:
        return {"skipped": "export.merge is false"}
    if not run.adapter_dir.is_dir():
        raise ExportError(f"no trained model in {run.adapter_dir}: run the train stage first")
    start = time.perf_counter()
    tokenizer = saved_tokenizer(cfg.model, run.adapter_dir)
    ids = sample_ids(cfg, run, tokenizer)
    model, info = merged_model(cfg, run, ids)

    stops = stop_token_ids(tokenizer, list(cfg.model.stop_tokens))
    eos = tokenizer.eos_token_id  # first: it becomes config.eos_token_id
    eos_ids = ([eos] if eos is not None else []) + [i for i in stops if i != eos]
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eos_ids[0]
    dtype = _save_dtype(model)
    model = model.to(dtype)
    expected = _logits(model, ids)  # what the saved files must reproduce exactly

    with staged_dir(run.merged_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_sentencepiece_model(cfg, run, tmp)
        complete_tokenizer_config(tokenizer, tmp)
        del model
        gc.collect()
        attn = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **attn).eval()
        reload_diff = (_logits(reloaded, ids) - expected).abs().max().item()
        del reloaded
        gc.collect()
        if reload_diff > RELOAD_ATOL:
            raise ExportError(f"the saved merged model does not reload to the merged weights "
                              f"(max |logit diff| {reload_diff:.3g})")
        if not list(tmp.glob("*.safetensors")):
            raise ExportError(f"save_pretrained wrote no safetensors file in {tmp}")
        info.update(reload_logits_max_diff=reload_diff, dtype=str(dtype).replace("torch.", ""),
                    eos_token_id=eos_ids)
        (tmp / "README.md").write_text(model_card(cfg, run, info), encoding="utf-8")
        info["size_bytes"] = dir_size(tmp)
    info.update(merged_dir=str(run.merged_dir), seconds_merge=round(time.perf_counter() - start, 1))
    log.info("merged model in %s (merge logit max diff %.2e, %s)", run.merged_dir,
             info["merge_logits_max_diff"], info["dtype"])
    return info
