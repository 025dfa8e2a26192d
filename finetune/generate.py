"""Generate answers for a list of rendered prompts, in the runtime that will serve the model.

Two backends with one result type: transformers (batched, left-padded; base, adapter, merged and
GPTQ models) and llama.cpp (one prompt at a time, as a server answers; every GGUF). Both stop on
the model's end-of-turn tokens and count only the tokens generated before the stop, so tokens/s
compare across runtimes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Generation:
    text: str  # decoded answer, up to (not including) the stop token
    n_tokens: int  # tokens generated before the stop
    latency_s: float  # wall time until this answer was available (its whole batch, when batched)
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)
    batch: int = 0  # answers generated together share one latency


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 42


def sampling_from(cfg: Any) -> Sampling:
    return Sampling(
        max_new_tokens=int(cfg.task.max_new_tokens),
        do_sample=bool(cfg.evaluate.do_sample),
        temperature=float(cfg.evaluate.temperature),
        top_p=float(cfg.evaluate.top_p),
        seed=int(cfg.method.seed),
    )


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run torch on n threads for a while (evaluate.n_threads): on a shared CPU, fewer threads than cores
    avoids OpenMP threads spinning against other processes (5-10x slower generation, measured)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> list[int]:
    """Ids of the model's end-of-turn tokens; an unknown token is a config error, not a silent no-stop."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == unk and token != tokenizer.unk_token):
            raise ValueError(f"stop token {token!r} (model.stop_tokens) is not in the tokenizer's vocabulary")
        ids.append(int(token_id))
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def adds_bos(bos_token: str | None, prompt: str) -> bool:
    """Let the tokenizer add its special tokens only when the chat template did not write BOS itself.

    Templates such as Llama 3's and Gemma's render the BOS text; tokenizing that with special tokens
    on would start the prompt with two BOS tokens. The same rule is used for llama.cpp.
    """
    return not (bos_token and prompt.startswith(bos_token))


def generate_transformers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    stop_tokens: list[str],
    sampling: Sampling,
    batch_size: int = 16,
) -> list[Generation]:
    """Batched generation with left padding; prompts are length-sorted to waste little on padding."""
    import torch
    from transformers import GenerationConfig

    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    gen_cfg = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} if sampling.do_sample else {}),
    )
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    add_special = adds_bos(tokenizer.bos_token, prompts[0]) if prompts else True
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special
            ).to(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**batch, generation_config=gen_cfg)
            latency = time.perf_counter() - t0
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(idx, new_tokens):
                end = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
                kept = tokens if end is None else tokens[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True)
                results[i] = Generation(text, len(kept), latency, stopped=end is not None, batch=start)
    finally:
        tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]


def llama_cpp_tokens(llm: Any, prompt: str, bos_token: str | None) -> list[int]:
    """The prompt's token ids in llama.cpp, BOS handled as for transformers (see adds_bos)."""
    return list(llm.tokenize(prompt.encode("utf-8"), add_bos=adds_bos(bos_token, prompt), special=True))


def generate_llama_cpp(
    gguf_path: str | Path,
    prompts: list[str],
    stop_tokens: list[str],
    sampling: Sampling,
    *,
    n_ctx: int,
    n_threads: int | None = None,
    bos_token: str | None = None,
) -> list[Generation]:
    """One prompt at a time through llama-cpp-python, with the stop list a Modelfile would carry."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_threads=n_threads or cpu_threads(),
        seed=sampling.seed,
        verbose=False,
    )
    results = []
    try:
        for i, prompt in enumerate(prompts):
            tokens = llama_cpp_tokens(llm, prompt, bos_token)
            t0 = time.perf_counter()
            out = llm.create_completion(
                tokens,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature if sampling.do_sample else 0.0,
                top_p=sampling.top_p if sampling.do_sample else 1.0,
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                stop=list(stop_tokens),
            )
            latency = time.perf_counter() - t0
            choice = out["choices"][0]
            results.append(
                Generation(
                    text=choice["text"],
                    n_tokens=int(out["usage"]["completion_tokens"]),
                    latency_s=latency,
                    stopped=choice.get("finish_reason") == "stop",
                    batch=i,
                )
            )
    finally:
        llm.close()
    return results
