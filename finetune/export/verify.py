"""Checks run on every exported GGUF and Modelfile (export.verify=true). Each failure raises
ExportError saying what differed, with a diff."""

from __future__ import annotations

import difflib
import logging
import time
from typing import Any

from omegaconf import DictConfig

from finetune.export import ExportError
from finetune.export.llamacpp import gguf_tokenize
from finetune.export.templates import hf_render, template_writes_bos, turn_markers

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
    from finetune.generate import adds_bos

    return tokenizer(text, add_special_tokens=adds_bos(tokenizer.bos_token, text))["input_ids"]


def strip_bos(text: str, tokenizer: Any, bos_added: bool) -> str:
    """llama.cpp (and so Ollama) adds BOS while tokenizing: the template must not write it too."""
    bos = tokenizer.bos_token
    return text[len(bos):] if bos_added and template_writes_bos(tokenizer) and text.startswith(bos) else text


def check_prompt_tokens(llm: Any, tokenizer: Any, text: str, what: str) -> list[int]:
    """llama.cpp's ids for the HF-rendered prompt equal transformers' ids (tokenizer converted right)."""
    from finetune.generate import adds_bos

    expected = hf_ids(tokenizer, text)
    got = list(llm.tokenize(text.encode("utf-8"), add_bos=adds_bos(tokenizer.bos_token, text), special=True))
    if got != expected:
        raise ExportError(f"{what}: llama.cpp tokenizes the prompt differently from transformers; "
                          + ids_diff(expected, got, lambda t: tokenizer.decode(t)))
    return got


def check_rendering(cfg: DictConfig, tokenizer: Any, llm: Any, name: str, effective: list[dict],
                    rendered: str, bos_added: bool, where: str) -> dict:
    """The Ollama rendering of one conversation equals the HF rendering, as text and as token ids."""
    hf_text = hf_render(tokenizer, effective, cfg.model)
    expected = strip_bos(hf_text, tokenizer, bos_added)
    if rendered != expected:
        raise ExportError(f"{where}: the Modelfile TEMPLATE renders conversation {name!r} differently from the "
                          f"model's chat template (family {getattr(cfg.model.family, 'value', cfg.model.family)}):\n{text_diff(expected, rendered)}")
    want, got = hf_ids(tokenizer, hf_text), gguf_tokenize(llm, rendered)
    if got != want:
        raise ExportError(f"{where}: conversation {name!r}: same text, but Ollama's token ids differ from "
                          f"transformers' ({'BOS added by llama.cpp' if bos_added else 'no BOS from llama.cpp'}):\n"
                          + ids_diff(want, got, lambda t: tokenizer.decode(t)))
    return {"conversation": name, "tokens": len(got)}


def generate(llm: Any, prompt_ids: list[int], stops: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    out = llm.create_completion(prompt_ids, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                min_p=0.0, repeat_penalty=1.0, stop=list(stops))
    seconds = time.perf_counter() - start
    choice = out["choices"][0]
    n = int(out["usage"]["completion_tokens"])
    return {"answer": choice["text"], "finish_reason": choice.get("finish_reason"), "tokens": n,
            "tokens_per_s": round(n / seconds, 1) if seconds > 0 else None}


def generate_like_ollama(llm: Any, prompt_ids: list[int], stops: list[str], max_tokens: int) -> dict:
    """Greedy generation that stops the way Ollama does: at an end-of-generation token of the GGUF, or
    when the text (special tokens rendered) reaches a stop string."""
    import llama_cpp

    vocab = llm._model.vocab
    out: list[int] = []
    result = {"stopped_by": None}
    start = time.perf_counter()
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            piece = llm.detokenize([tok], special=True).decode("utf-8", "replace")
            result["stopped_by"] = f"end-of-generation token {piece!r}"
            break
        out.append(tok)
        text = llm.detokenize(out, special=True).decode("utf-8", "replace")
        hit = next((s for s in stops if s in text), None)
        if hit is not None:
            result["stopped_by"] = f"stop {hit!r}"
            break
        if len(out) >= max_tokens:
            break
    text = llm.detokenize(out, special=True).decode("utf-8", "replace")
    seconds = time.perf_counter() - start
    return {**result, "answer": text, "tokens": len(out),
            "tokens_per_s": round(len(out) / seconds, 1) if seconds > 0 else None}


def check_stop_tokens(cfg: DictConfig, llm: Any, stops: list[str], where: str) -> None:
    """Each stop string is one token of the GGUF, and the model's end-of-turn token stops generation."""
    import llama_cpp

    for stop in stops:
        ids = llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
        if len(ids) != 1:
            raise ExportError(f"{where}: stop {stop!r} is not a single token of the GGUF vocabulary ({ids})")
    eot = llm.tokenize(str(cfg.model.eos_token).encode("utf-8"), add_bos=False, special=True)
    if len(eot) == 1 and not llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot[0]) and cfg.model.eos_token not in stops:
        raise ExportError(f"{where}: the end-of-turn token {cfg.model.eos_token!r} neither ends generation in the "
                          f"GGUF nor is a stop string ({stops}): Ollama would run on past the end of the turn")


def check_stops(cfg: DictConfig, llm: Any, prompt_ids: list[int], stops: list[str], where: str) -> dict:
    """Greedy generation on the task prompt, stopped as Ollama stops it, does not run into a new turn."""
    family = str(getattr(cfg.model.family, "value", cfg.model.family))
    check_stop_tokens(cfg, llm, stops, where)
    max_tokens = max(2 * int(cfg.task.max_new_tokens), 64)
    result = generate_like_ollama(llm, prompt_ids, stops, max_tokens)
    runaway = [m for m in turn_markers(family) + list(stops) + [str(cfg.model.eos_token)] if m in result["answer"]]
    if runaway:
        raise ExportError(
            f"{where}: generation on the task prompt ran past the end of its turn ({runaway} in the output, "
            f"stop list {stops}); Ollama would do the same:\n{result['answer'][:800]!r}")
    if result["stopped_by"] is None:
        log.warning("%s: the model did not end its answer within %d tokens (a model-quality issue: no turn "
                    "marker was produced, the stop list is fine): %r", where, max_tokens, result["answer"][:200])
    return result


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
