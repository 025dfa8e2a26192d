"""Checks run on every exported GGUF (export.verify=true): llama.cpp tokenizes like transformers, predicts
like the merged model, and answers. Each failure raises ExportError saying what differed, with a diff."""

from __future__ import annotations

import difflib
import logging
import time
from typing import Any

from finetune.core.errors import ExportError
from finetune.runtimes.generation import adds_bos
from finetune.runtimes.llamacpp import prompt_tokens

log = logging.getLogger("finetune")


def text_diff(expected: str, got: str, a: str = "transformers chat template", b: str = "Ollama TEMPLATE") -> str:
    """A unified diff of two renderings, one line per template line, with invisible characters shown."""
    lines = difflib.unified_diff([repr(x) for x in expected.splitlines(keepends=True)],
                                 [repr(x) for x in got.splitlines(keepends=True)], a, b, lineterm="")
    return "\n".join(lines)


def ids_diff(expected: list[int], got: list[int], detok: Any) -> str:
    n = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))
    return (f"token ids first differ at position {n} of {len(expected)} (HF) / {len(got)} (llama.cpp):\n"
            f"  HF:        {expected[max(0, n - 3):n + 5]}  {detok(expected[max(0, n - 3):n + 5])!r}\n"
            f"  llama.cpp: {got[max(0, n - 3):n + 5]}  {detok(got[max(0, n - 3):n + 5])!r}")


def hf_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids transformers uses for a rendered prompt (the rule evaluation uses: BOS added only when the
    template did not write it)."""
    return tokenizer(text, add_special_tokens=adds_bos(tokenizer.bos_token, text))["input_ids"]


def check_prompt_tokens(llm: Any, tokenizer: Any, text: str, what: str) -> list[int]:
    """llama.cpp's ids for the HF-rendered prompt equal transformers' ids (tokenizer converted right)."""
    expected = hf_ids(tokenizer, text)
    got = prompt_tokens(llm, text, tokenizer.bos_token)
    if got != expected:
        raise ExportError(f"{what}: llama.cpp tokenizes the prompt differently from transformers; "
                          + ids_diff(expected, got, lambda t: tokenizer.decode(t)))
    return got


def generate(llm: Any, prompt_ids: list[int], stops: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    out = llm.create_completion(prompt_ids, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                min_p=0.0, repeat_penalty=1.0, stop=list(stops))
    seconds = time.perf_counter() - start
    choice = out["choices"][0]
    n = int(out["usage"]["completion_tokens"])
    return {"answer": choice["text"], "finish_reason": choice.get("finish_reason"), "tokens": n,
            "tokens_per_s": round(n / seconds, 1) if seconds > 0 else None}


def top1_agreement(llm: Any, hf_model: Any, ids: list[int]) -> dict:
    """Next-token argmax of the GGUF (llama.cpp) vs the merged HF model at every prompt position."""
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    gguf_logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        hf_logits = hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    agree = float((gguf_logits.argmax(-1) == hf_logits.argmax(-1)).mean())
    return {"top1_agreement": round(agree, 4), "positions": len(ids),
            "last_logits_max_diff": float(np.abs(gguf_logits[-1] - hf_logits[-1]).max())}
