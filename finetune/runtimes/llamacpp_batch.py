"""llama.cpp evaluation that decodes many prompts per call (continuous batching), with the answers of
finetune.runtimes.llamacpp.generate_llama_cpp (one prompt at a time, as a server answers).

Up to `parallel` sequences are live at once, each in its own KV stream of `n_ctx` cells (kv_unified off,
so a sequence's cells sit where they would in a one-sequence context). Every step decodes one token of
every live sequence in one llama_decode; a finished sequence's slot takes the next waiting prompt, and
once none wait the live ones move down to consecutive slots (llama.cpp splits a batch of sequences with
gaps in their ids into several ubatches). The prompts' common prefix (system prompt and template) is
decoded once into one more stream and copied into a slot for each new prompt, which then decodes its own
suffix alone, as the one-at-a-time path decodes what its prefix cache lacks. Stopping, text and token
counts follow llama-cpp-python's create_completion (AnswerState); its sampler chain and seeds too.

Equal answers need kernels whose result for one row does not depend on how many rows share the call.
On this AVX2 build that holds for Q8_0, Q5_0 and Q4_1 weights (row-by-row vec_dot and llamafile's tinyBLAS
give the same floats) and for F16 attention while each sequence has one token in a ubatch (decoding) or
at least two (prompts: hence a suffix of at least two tokens, and no one-token prompt chunk). It does not
hold for K-quants (Q4_K, Q5_K, Q6_K: the ffn_down of a Q4_K_M SmolLM2): repacked Q4_K runs gemm on groups
of 4 rows and gemv on the rest, and ggml's tiled K-quant matmul takes over from 8 rows; their last-bit
differences flip the int8 rounding of the next layer's activations and move logits by ~0.5. Answers then
differ from one-at-a-time, which itself changes with the order of the prompts (docs/llamacpp-batching.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import random
import time
from collections import deque
from pathlib import Path
from typing import Any

from finetune.core.errors import ConfigError, ExportError
from finetune.core.hardware import cpu_threads
from finetune.runtimes.generation import Generation, Grammars, Sampling, common_prefix, context_needed, per_prompt
from finetune.runtimes.llamacpp import open_gguf, prompt_tokens
from finetune.runtimes.llamacpp_stops import AnswerState  # noqa: F401 - part of this module's interface

# Tokens each prompt keeps of its own beyond a shared prefix: a suffix of one token would be decoded one-wide,
# through other kernels than the one-at-a-time path's.
OWN_MIN = 2
MAX_PARALLEL = 255  # llama.cpp holds at most 256 sequences; one stream holds the shared prefix


def context_size(longest_prompt: int, max_new_tokens: int) -> int:
    """Each sequence's n_ctx as the evaluate stage sizes it: what the longest prompt and its answer need
    (context_needed), rounded up to llama.cpp's 256-cell KV padding."""
    return -(-context_needed(longest_prompt, max_new_tokens) // 256) * 256


def completion_seeds(seed: int, n: int) -> list[int]:
    """The sampler seed of each prompt as generate_llama_cpp's Llama(seed=...) draws them: every
    create_completion reseeds with random.Random(previous seed).randint(0, 2**32)."""
    import llama_cpp

    seeds, current = [], seed or llama_cpp.LLAMA_DEFAULT_SEED
    for _ in range(n):
        current = random.Random(current).randint(0, 2**32)
        seeds.append(current)
    return seeds


def new_sampler(vocab: Any, sampling: Sampling, seed: int, grammar: str | None) -> Any:
    """A sampler chain as create_completion builds it (repeat penalties off are no-ops, left out):
    [grammar], then greedy (temperature 0), dist(seed) alone (below 0), or top_k(0), typical(1), top_p,
    min_p(0), temp, dist(seed)."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise ConfigError(f"llama.cpp rejected the sampling settings or the GBNF grammar {grammar!r}")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if grammar is not None:
        add(llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root"))
    if sampling.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
    elif sampling.temperature < 0.0:
        add(llama_cpp.llama_sampler_init_dist(seed))
    else:
        add(llama_cpp.llama_sampler_init_top_k(0))
        add(llama_cpp.llama_sampler_init_typical(1.0, 1))
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(0.0, 1))
        add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def greedy_grammar(chain: Any, grammar: str | None, sampling: Sampling) -> Any:
    """The grammar sampler of a greedy chain (its first), or None where the chain samples or has no grammar."""
    import llama_cpp

    return llama_cpp.llama_sampler_chain_get(chain, 0) if grammar is not None and sampling.greedy else None


def grammar_accepts(grammar_sampler: Any, token: int, logit: float) -> bool:
    """Whether the grammar, in its current state, allows `token` next (applied to that one candidate)."""
    import llama_cpp

    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, logit, 0.0))
    candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
    llama_cpp.llama_sampler_apply(grammar_sampler, ctypes.byref(candidates))
    return data[0].logit != -math.inf


class Decoder:
    """A llama_context with `n_streams` KV streams and one llama_batch, both freed on close."""

    def __init__(self, llm: Any, n_ctx: int, n_streams: int, n_threads: int, n_batch: int):
        import llama_cpp

        self.lib = llama_cpp
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # as Llama made its own
        params.n_ctx = n_ctx * n_streams
        params.n_seq_max = n_streams
        params.kv_unified = False
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise ExportError(f"llama.cpp could not make a context of {n_streams} x {n_ctx} tokens")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) items, at most n_batch of them."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise ExportError(f"llama_decode failed (code {rc}) on {len(items)} tokens")

    def decode_prompt(self, tokens: list[int], start: int, seq: int) -> None:
        """A prompt (or its suffix) alone, in chunks of at most n_batch and never of one token (a one-token
        chunk takes the one-row attention kernels, see the module docstring); logits of its last token."""
        i = 0
        while i < len(tokens):
            size = min(self.n_batch, len(tokens) - i)
            if len(tokens) - i - size == 1:
                size -= 1
            chunk = tokens[i : i + size]
            last = i + size == len(tokens)
            self.decode([(t, start + i + j, seq, last and j == size - 1) for j, t in enumerate(chunk)])
            i += size

    def move(self, src: int, dst: int) -> None:
        """Move a sequence's cells to another stream, cell for cell (copied at the next decode)."""
        self.lib.llama_memory_seq_rm(self.mem, dst, -1, -1)
        self.lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.lib.llama_memory_seq_rm(self.mem, src, -1, -1)

    def copy(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, dst, -1, -1)
        self.lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)


class Live:
    """A sequence being answered: its prompt, state, sampler, next position and clock."""

    def __init__(self, index: int, state: AnswerState, sampler: Any, pos: int, slot: int, grammar: Any = None):
        self.index, self.state, self.sampler, self.pos, self.slot = index, state, sampler, pos, slot
        self.grammar = grammar  # the chain's grammar sampler when it decodes greedily (BatchedLlama.sample)
        self.started = time.perf_counter()
        self.token = -1  # sampled, to be decoded next
        self.logprobs: list[float] = []


class BatchedLlama:
    """An open GGUF with a context of `parallel` KV streams (and one for a shared prompt prefix) that answers
    lists of prompts, `parallel` sequences per llama_decode; kept open between calls (finetune.route serves
    one request after another through it). Close it, or use it as a context manager."""

    def __init__(self, gguf_path: str | Path, *, n_ctx: int, parallel: int = 16, n_threads: int | None = None,
                 seed: int = 42):
        import llama_cpp

        if not 1 <= parallel <= MAX_PARALLEL:
            raise ConfigError(f"parallel={parallel}: llama.cpp decodes 1 to {MAX_PARALLEL} sequences at once")
        self.parallel, self.seed = parallel, seed
        threads = n_threads or cpu_threads()
        self._stack = contextlib.ExitStack()
        try:
            self.llm = self._stack.enter_context(open_gguf(Path(gguf_path), n_ctx=n_ctx, n_threads=threads,
                                                           n_threads_batch=threads, seed=seed))
            n_batch = max(min(n_ctx, 512), parallel)  # Llama's own n_batch: prompts are fed in the same chunks
            self.dec = Decoder(self.llm, n_ctx, parallel + 1, threads, n_batch)
            self._stack.callback(self.dec.close)
        except BaseException:
            self._stack.close()
            raise
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._last: list[int] = []  # the previous call's first prompt, and the prefix the prefix stream holds
        self._held: list[int] = []

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "BatchedLlama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def piece(self, token: int) -> bytes:
        """The token's text as create_completion detokenizes it (special tokens render empty)."""
        import llama_cpp

        if token not in self._pieces:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is its length
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            self._pieces[token] = buf.raw[:n]
        return self._pieces[token]

    def logprob(self, idx: int, token: int) -> float:
        """Log-probability of `token` under the raw logits of output `idx` of the last decode."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.dec.ctx, idx), shape=(self.n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    def sample(self, seq: Live, idx: int) -> int:
        """The sequence's next token from output `idx` of the last decode, through its sampler chain.
        Greedy under a grammar, the chain would mask all 49k tokens of the vocabulary at every step (2.5x the
        time of an unconstrained batched decode on 2 cores); the unconstrained argmax is the constrained one
        whenever the grammar allows it (ties too: both take the lowest id), so only that token is checked,
        and the whole vocabulary is masked only when it is refused: llama.cpp's common_sampler_sample does
        the same (grammar_first=false)."""
        import llama_cpp
        import numpy as np

        if seq.grammar is not None:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.dec.ctx, idx), shape=(self.n_vocab,))
            token = int(logits.argmax())
            if grammar_accepts(seq.grammar, token, float(logits[token])):
                llama_cpp.llama_sampler_accept(seq.sampler, token)  # the grammar advances, as after sampling
                return token
        return llama_cpp.llama_sampler_sample(seq.sampler, self.dec.ctx, idx)

    def generate(self, prompts: list[str], stop_tokens: list[str], sampling: Sampling, *,
                 bos_token: str | None = None, grammar: Grammars = None) -> list[Generation]:
        """See generate_llama_cpp_batched."""
        import llama_cpp

        if not prompts:
            return []
        dec, vocab, llm = self.dec, self.vocab, self.llm
        parallel = min(self.parallel, len(prompts))
        prefix_seq = self.parallel  # the extra stream
        results: list[Generation | None] = [None] * len(prompts)
        token_lists = [prompt_tokens(llm, p, bos_token) for p in prompts]
        # One prompt (a server's request): its prefix in common with the previous call's, as a server's
        # prompt cache keeps it; the prefix stream holds it from the earlier call when it still matches.
        prefix = common_prefix(token_lists if len(prompts) > 1 else [self._last, token_lists[0]], OWN_MIN)
        self._last = token_lists[0]
        seeds = completion_seeds(sampling.seed, len(prompts))
        grammars = per_prompt(grammar, len(prompts))
        stops = [s.encode("utf-8") for s in stop_tokens]
        if prefix and self._held[:prefix] == token_lists[0][:prefix] and len(self._held) >= prefix:
            llama_cpp.llama_memory_seq_rm(dec.mem, prefix_seq, prefix, -1)  # keep exactly the shared part
        elif prefix:
            llama_cpp.llama_memory_seq_rm(dec.mem, prefix_seq, -1, -1)
            dec.decode_prompt(token_lists[0][:prefix], 0, prefix_seq)
        self._held = token_lists[0][:prefix] if prefix else self._held
        slots: list[Live | None] = [None] * parallel
        waiting = deque(range(len(prompts)))

        def finish(seq: Live) -> None:
            results[seq.index] = Generation(
                text=seq.state.text.decode("utf-8", errors="ignore"), n_tokens=len(seq.state.tokens),
                latency_s=time.perf_counter() - seq.started, stopped=seq.state.stopped, batch=seq.slot,
                logprobs=seq.logprobs[: len(seq.state.tokens)])
            llama_cpp.llama_sampler_free(seq.sampler)
            slots[seq.slot] = None

        def take(seq: Live, idx: int) -> bool:
            """Sample the sequence's next token from output `idx` of the last decode; True when finished."""
            token = self.sample(seq, idx)
            is_eog = llama_cpp.llama_vocab_is_eog(vocab, token)
            if not is_eog:
                seq.logprobs.append(round(self.logprob(idx, token), 5))
            done = seq.state.add(token, is_eog)
            if not done and seq.pos >= dec.n_ctx:
                seq.state.cut()
                done = True
            seq.token = token
            if done:
                finish(seq)
            return done

        try:
            while waiting or any(slots):
                for slot in range(parallel):  # admit: each new prompt's suffix decoded alone
                    if slots[slot] is not None or not waiting:
                        continue
                    i = waiting.popleft()
                    tokens = token_lists[i]
                    if len(tokens) >= dec.n_ctx:
                        raise ConfigError(f"prompt {i} has {len(tokens)} tokens, more than n_ctx={dec.n_ctx}")
                    # create_completion's max_tokens: none (<= 0) or too many mean what the context leaves
                    room = dec.n_ctx - len(tokens)
                    max_tokens = min(sampling.max_new_tokens, room) if sampling.max_new_tokens > 0 else room
                    sampler = new_sampler(vocab, sampling, seeds[i], grammars[i])
                    seq = Live(i, AnswerState(stops, max_tokens, self.bos, self.piece), sampler, len(tokens), slot,
                               greedy_grammar(sampler, grammars[i], sampling))
                    slots[slot] = seq
                    if prefix:
                        dec.copy(prefix_seq, slot)
                    else:
                        llama_cpp.llama_memory_seq_rm(dec.mem, slot, -1, -1)
                    dec.decode_prompt(tokens[prefix:], prefix, slot)
                    take(seq, -1)
                if not waiting:  # live sequences on consecutive ids: llama.cpp decodes them as one ubatch
                    free = [s for s in range(parallel) if slots[s] is None]
                    while free:
                        last = max((s for s in range(parallel) if slots[s] is not None), default=-1)
                        if last < free[0]:
                            break
                        dst = free.pop(0)
                        dec.move(last, dst)
                        slots[dst], slots[last] = slots[last], None
                        slots[dst].slot = dst
                        free.append(last)
                        free.sort()
                live = [s for s in slots if s is not None]
                if not live:
                    continue
                dec.decode([(s.token, s.pos, s.slot, True) for s in live])
                for idx, seq in enumerate(live):
                    seq.pos += 1
                    take(seq, idx)
        finally:
            for seq in slots:
                if seq is not None:
                    llama_cpp.llama_sampler_free(seq.sampler)
            for slot in range(parallel):  # the next call starts from empty streams
                llama_cpp.llama_memory_seq_rm(dec.mem, slot, -1, -1)
        return results  # type: ignore[return-value]


def generate_llama_cpp_batched(
    gguf_path: str | Path,
    prompts: list[str],
    stop_tokens: list[str],
    sampling: Sampling,
    *,
    n_ctx: int,
    parallel: int = 16,
    n_threads: int | None = None,
    bos_token: str | None = None,
    grammar: Grammars = None,
) -> list[Generation]:
    """generate_llama_cpp's answers, `parallel` sequences decoded per llama_decode.

    n_ctx is each sequence's context (prompt + answer), as generate_llama_cpp's n_ctx; `grammar` is a
    GBNF text (root rule "root") every answer must follow, or a list of one per prompt. Returns one
    Generation per prompt, in prompt order: latency_s from the answer's first decode to its last token,
    batch = the slot it ran in (answers of different slots overlap in time: the call's wall time is not the
    sum of latencies), and each answer token's log-probability under the raw logits (logprobs).
    """
    if not prompts:
        return []
    width = min(parallel, len(prompts)) if 1 <= parallel <= MAX_PARALLEL else parallel  # out of range: refused
    with BatchedLlama(gguf_path, n_ctx=n_ctx, parallel=width, n_threads=n_threads,
                      seed=sampling.seed) as llama:
        return llama.generate(prompts, stop_tokens, sampling, bos_token=bos_token, grammar=grammar)
