"""Checks run on every Modelfile (export.verify=true): Ollama's rendering of sample conversations equals
the model's HF chat template, as text and as token ids, and generation stops at the end of the turn."""

from __future__ import annotations

import logging
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.export.checks import hf_ids, ids_diff, text_diff
from finetune.export.ollama.template import template_writes_bos
from finetune.models.families import family
from finetune.models.loading import render_prompt
from finetune.runtimes.llamacpp import generate_like_ollama, served_tokens

log = logging.getLogger("finetune")


def strip_bos(text: str, tokenizer: Any, bos_added: bool) -> str:
    """llama.cpp (and so Ollama) adds BOS while tokenizing: the template must not write it too."""
    bos = tokenizer.bos_token
    return text[len(bos):] if bos_added and template_writes_bos(tokenizer) and text.startswith(bos) else text


def check_rendering(cfg: Config, tokenizer: Any, llm: Any, name: str, effective: list[dict],
                    rendered: str, bos_added: bool, where: str) -> dict:
    """The Ollama rendering of one conversation equals the HF rendering, as text and as token ids."""
    hf_text = render_prompt(tokenizer, effective, cfg.model)
    expected = strip_bos(hf_text, tokenizer, bos_added)
    if rendered != expected:
        raise ExportError(f"{where}: the Modelfile TEMPLATE renders conversation {name!r} differently from the "
                          f"model's chat template (family {cfg.model.family}):\n{text_diff(expected, rendered)}")
    want, got = hf_ids(tokenizer, hf_text), served_tokens(llm, rendered)
    if got != want:
        raise ExportError(f"{where}: conversation {name!r}: same text, but Ollama's token ids differ from "
                          f"transformers' ({'BOS added by llama.cpp' if bos_added else 'no BOS from llama.cpp'}):\n"
                          + ids_diff(want, got, lambda t: tokenizer.decode(t)))
    return {"conversation": name, "tokens": len(got)}


def check_stop_tokens(cfg: Config, llm: Any, stops: list[str], where: str) -> None:
    """Each stop string is one token of the GGUF, and the model's end-of-turn token stops generation."""
    import llama_cpp

    for stop in stops:
        ids = llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
        if len(ids) != 1:
            raise ExportError(f"{where}: stop {stop!r} is not a single token of the GGUF vocabulary ({ids})")
    eot = llm.tokenize(cfg.model.eos_token.encode("utf-8"), add_bos=False, special=True)
    if len(eot) == 1 and not llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot[0]) and cfg.model.eos_token not in stops:
        raise ExportError(f"{where}: the end-of-turn token {cfg.model.eos_token!r} neither ends generation in the "
                          f"GGUF nor is a stop string ({stops}): Ollama would run on past the end of the turn")


def check_stops(cfg: Config, llm: Any, prompt_ids: list[int], stops: list[str], where: str) -> dict:
    """Greedy generation on the task prompt, stopped as Ollama stops it, does not run into a new turn."""
    check_stop_tokens(cfg, llm, stops, where)
    max_tokens = max(2 * cfg.task.max_new_tokens, 64)
    result = generate_like_ollama(llm, prompt_ids, stops, max_tokens)
    runaway = [m for m in family(cfg.model.family).turn_markers + list(stops) + [cfg.model.eos_token] if m in result["answer"]]
    if runaway:
        raise ExportError(
            f"{where}: generation on the task prompt ran past the end of its turn ({runaway} in the output, "
            f"stop list {stops}); Ollama would do the same:\n{result['answer'][:800]!r}")
    if result["stopped_by"] is None:
        log.warning("%s: the model did not end its answer within %d tokens (a model-quality issue: no turn "
                    "marker was produced, the stop list is fine): %r", where, max_tokens, result["answer"][:200])
    return result
