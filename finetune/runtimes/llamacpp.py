"""llama.cpp through llama-cpp-python: open a GGUF, tokenize as llama.cpp (and so Ollama) does, generate.

Every GGUF of a run is loaded, tokenized and answered here: by the export checks, by evaluation (one
prompt at a time, as a server answers) and when a GGUF's vocabulary is read back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from finetune.core.errors import ExportError
from finetune.core.hardware import cpu_threads
from finetune.runtimes.cpu_kernels import load_cpu_kernels
from finetune.runtimes.generation import Generation, Grammars, Sampling, adds_bos, per_prompt


@contextlib.contextmanager
def native_output() -> Iterator[dict]:
    """Capture what C code writes to stdout/stderr (llama.cpp logs every tensor); shown only on failure."""
    captured: dict = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            captured["text"] = tmp.read().decode("utf-8", "replace")


@contextlib.contextmanager
def open_gguf(path: Path, n_ctx: int = 2048, n_threads: int | None = None, vocab_only: bool = False,
              **kwargs: Any) -> Iterator[Any]:
    """A llama_cpp.Llama on `path` (threads: all cores unless given), closed on exit."""
    from llama_cpp import Llama

    load_cpu_kernels()
    try:
        # A vocabulary-only load still makes llama.cpp warn about the (absent) training context.
        with native_output() if vocab_only else contextlib.nullcontext():
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or cpu_threads(),
                        vocab_only=vocab_only, verbose=False, **kwargs)
    except Exception as exc:
        raise ExportError(f"llama.cpp cannot load {path}: {type(exc).__name__}: {exc}") from exc
    try:
        yield llm
    finally:
        llm.close()


def tokenize(llm: Any, text: str, add_bos: bool) -> list[int]:
    """Token ids of `text` in llama.cpp, special tokens parsed (a rendered chat prompt holds them)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


def prompt_tokens(llm: Any, prompt: str, bos_token: str | None) -> list[int]:
    """The prompt's ids as evaluation feeds them: BOS added as for transformers (see adds_bos)."""
    return tokenize(llm, prompt, adds_bos(bos_token, prompt))


def served_tokens(llm: Any, text: str) -> list[int]:
    """The ids Ollama/llama.cpp's server uses for a rendered prompt: BOS added when the GGUF asks for it."""
    return tokenize(llm, text, add_bos=True)


def gguf_adds_bos(llm: Any) -> bool:
    """Whether llama.cpp adds BOS when tokenizing for this GGUF."""
    return len(llm.tokenize(b"a", add_bos=True, special=False)) > len(llm.tokenize(b"a", add_bos=False))


def llama_grammars(grammar: Grammars, n: int) -> list[Any]:
    """llama-cpp-python's LlamaGrammar (or None) for each of `n` prompts, each distinct grammar parsed once."""
    from llama_cpp import LlamaGrammar

    texts = per_prompt(grammar, n)
    parsed = {t: LlamaGrammar.from_string(t, verbose=False) for t in dict.fromkeys(texts) if t is not None}
    return [parsed[t] if t is not None else None for t in texts]


def generate_llama_cpp(
    gguf_path: str | Path,
    prompts: list[str],
    stop_tokens: list[str],
    sampling: Sampling,
    *,
    n_ctx: int,
    n_threads: int | None = None,
    bos_token: str | None = None,
    grammar: Grammars = None,
) -> list[Generation]:
    """One prompt at a time through llama-cpp-python, with the stop list a Modelfile would carry.

    `grammar`: a GBNF grammar (finetune.tasks.grammar.gbnf_grammar) every answer must match, or a list of
    one per prompt; llama.cpp's grammar sampler allows the end-of-turn token only once the grammar is
    complete, and only it then."""
    results = []
    with open_gguf(Path(gguf_path), n_ctx=n_ctx, n_threads=n_threads, seed=sampling.seed) as llm:
        for i, (prompt, llama_grammar) in enumerate(zip(prompts, llama_grammars(grammar, len(prompts)))):
            tokens = prompt_tokens(llm, prompt, bos_token)
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
                grammar=llama_grammar,
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
    return results


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
