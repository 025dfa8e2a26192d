"""Greedy generation in transformers where a finished answer leaves the batch and a waiting prompt takes its
slot (continuous batching), with the answers of the per-batch `model.generate` path of generate_transformers.

Up to `slots` answers are decoded at once, all in one DynamicCache whose rows are right-aligned: each row's
latest token sits in the last column, shorter rows are padded on the left (attention mask 0), and position
ids count only a row's own tokens, as generate() counts them for a left-padded batch. Each step decodes one
token of every live row. A row that ends (a stop token, or max_new_tokens) is dropped from the cache, the
mask and the grammar matchers at once, and the columns no live row uses any more are cut off on the left.
Free slots take the next waiting prompts (generate_transformers' length order): they are prefilled together
as one left-padded batch, as generate() prefills, and their cache joins the running one, the shorter side
padded on the left. So a batch costs what its live rows cost, not what its longest answer costs.

Prompts that begin with the same SHARED_MIN or more tokens (a task's system prompt and the chat template's
opening, few-shot examples) have those computed once per call (shared_prefix); each admitted batch then computes
only its prompts' own tokens, attending to a copy of that cache per row (prefill_after), and the cache is laid
out as prefill() lays it. Extraction's 57-token opening is ~65% of its ~87-token prompts; a 161-token system
prompt listing 50 labels made transformers answer 538 questions in 151 s against 56 s for a short one.

Greedy answers are the argmax of the same logits under the same grammar mask as generate()'s. They can still
differ in the last bits: a row shares its steps with other rows and other padding than in its fixed batch,
and CPU kernels (SDPA's blocked softmax, GEMM blocking) then sum in another order; a near-tie of the top two
logits may flip. scripts/bench_eval.py --transformers counts the identical answers.

transformers' own continuous batching (model.generate_batch, ContinuousBatchingManager; 5.24) is not used.
It runs on a CPU (paged sdpa) and its greedy tokens matched generate()'s on 4 prompts, but it took 3.4x the
time of generate() one prompt at a time (26.5 s vs 7.7 s, 4 x 24 tokens, SmolLM2-135M fp32, 1 core), and it
takes no logits processor of ours: its processors are built from the GenerationConfig (a `logits_processor=`
argument is silently ignored) and see a flat batch of tokens, not the request each belongs to, so a
per-answer grammar matcher has nowhere to live. Models this loop does not fit (supports_continuous) and
sampling stay on generate().
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from finetune.runtimes.generation import Generation, common_prefix

# GenerationConfig fields that add a logits processor to greedy search; generate() takes them from the
# model's generation_config when ours leaves them unset. This loop applies none of them.
GREEDY_PROCESSORS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                     "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                     "sequence_bias", "exponential_decay_length_penalty", "guidance_scale", "watermarking_config",
                     "renormalize_logits")
NEUTRAL = (None, 0, 1, 1.0, False, [], {})
SHARED_MIN = 16  # prompts that begin with this many common tokens have them computed once (shared_prefix)


@dataclass
class Answer:
    index: int  # the prompt's position in the call
    matcher: Any = None  # its llguidance matcher, under a grammar
    tokens: list[int] = field(default_factory=list)  # generated, the stop token excluded
    logprobs: list[float] = field(default_factory=list)  # raw log-probability of each chosen token, stop included
    stopped: bool = False
    done: bool = False
    steered: bool = False  # its grammar changed a choice: some token was not the raw argmax


def supports_continuous(model: Any) -> bool:
    """Whether this loop gives generate()'s greedy answers for the model: every layer keeps a plain growing
    cache (no sliding window, no linear attention), forward takes position ids, and the model's own
    generation_config adds no logits processor generate() would apply."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    if any(type(layer) is not DynamicLayer for layer in layers):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes them on
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return False
    defaults = getattr(model, "generation_config", None)
    return all(getattr(defaults, name, None) in NEUTRAL for name in GREEDY_PROCESSORS)


def left_pad(t: Any, length: int) -> Any:
    """Pad the sequence dimension (-2 of a cache tensor, -1 of a mask) on the left up to `length`."""
    import torch.nn.functional as F

    if t.dim() == 2:
        return F.pad(t, (length - t.shape[-1], 0))
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


class Batch:
    """The live rows: their shared right-aligned cache and its attention mask, row r of both is live[r]."""

    def __init__(self) -> None:
        self.live: list[Answer] = []
        self.cache: Any = None
        self.mask: Any = None  # batch x cache columns, 1 where a row has a token

    def join(self, rows: list[Answer], cache: Any, mask: Any) -> None:
        import torch

        if self.cache is None:
            self.live, self.cache, self.mask = list(rows), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, length), left_pad(new.keys, length)])
            old.values = torch.cat([left_pad(old.values, length), left_pad(new.values, length)])
        self.mask = torch.cat([left_pad(self.mask, length), left_pad(mask, length)])
        self.live += rows

    def drop_finished(self) -> None:
        """Remove finished rows, then the leading columns no remaining row uses."""
        import torch

        keep = [r for r, a in enumerate(self.live) if not a.done]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[r] for r in keep]
        if not keep:
            self.cache = self.mask = None
            return
        rows = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[rows]
        first = int(self.mask.shape[1] - self.mask.sum(dim=1).max())
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, first:]
            layer.values = layer.values[rows, :, first:]
        self.mask = self.mask[:, first:]


def choose(rows: list[Answer], logits: Any, stop_ids: set[int], max_new_tokens: int, want_logprobs: bool) -> Any:
    """Each row's next token: the argmax of its logits under its grammar, as generate()'s greedy search takes it.
    Marks the rows that end here; returns the chosen tokens (batch x 1) to feed next."""
    import torch

    from finetune.runtimes.constrained import advance, blocked_tokens

    scores = logits.float()
    if any(a.matcher is not None for a in rows):
        blocked = blocked_tokens([a.matcher for a in rows], scores.shape[-1]).to(scores.device)
        chosen = scores.masked_fill(blocked, float("-inf")).argmax(dim=-1)
        for a, differs in zip(rows, (chosen != scores.argmax(dim=-1)).tolist()):
            a.steered = a.steered or differs
    else:
        chosen = scores.argmax(dim=-1)
    lps = torch.log_softmax(scores, dim=-1).gather(1, chosen[:, None])[:, 0].tolist() if want_logprobs else None
    for r, (a, token) in enumerate(zip(rows, chosen.tolist())):
        if lps is not None:
            a.logprobs.append(lps[r])
        if token in stop_ids:
            a.stopped = a.done = True
            continue
        a.tokens.append(token)
        if a.matcher is not None:
            advance(a.matcher, token, a.index)
        a.done = len(a.tokens) >= max_new_tokens
    return chosen[:, None]


def left_padded(token_ids: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input ids, attention mask) of token lists padded on the left to the longest, as a tokenizer pads with
    padding_side="left"."""
    import torch

    width = max(len(ids) for ids in token_ids)
    ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in token_ids], device=device)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_ids], device=device)
    return ids, mask


def prefill(model: Any, input_ids: Any, mask: Any, cache_kw: str) -> tuple[Any, Any, Any]:
    """One left-padded batch of prompts into a new cache, positions as generate() counts them; returns the
    last position's logits, the cache and the mask."""
    from transformers import DynamicCache

    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1, :], cache, mask


def shared_prefix(model: Any, token_ids: list[list[int]], cache_kw: str) -> tuple[int, Any]:
    """The tokens every prompt begins with (SHARED_MIN or more, leaving each prompt one of its own) and their
    cache, computed once; (0, None) when the prompts share fewer."""
    import torch
    from transformers import DynamicCache

    length = common_prefix(token_ids, keep=1)
    if length < SHARED_MIN:
        return 0, None
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    positions = torch.arange(length, device=device)[None]
    model(input_ids=torch.tensor([token_ids[0][:length]], device=device), position_ids=positions, use_cache=True,
          logits_to_keep=1, **{cache_kw: cache})
    return length, cache


def prefill_after(model: Any, prefix: Any, length: int, suffixes: list[list[int]], pad_id: int,
                  cache_kw: str) -> tuple[Any, Any, Any]:
    """prefill() of prompts that all begin with the `length` tokens whose cache is `prefix`: only each
    prompt's own tokens (`suffixes`, left-padded) are computed, attending to a copy of the prefix per row. The
    cache comes back in prefill()'s layout (each row right-aligned: padding, prefix, its own tokens)."""
    import torch
    from transformers import DynamicCache

    ids, own = left_padded(suffixes, pad_id, next(model.parameters()).device)
    (n, width), device = ids.shape, ids.device
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(prefix.layers):
        cache.update(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous(), i)
    positions = (own.cumsum(-1) - 1).clamp(min=0) + length
    mask = torch.cat([own.new_ones((n, length)), own], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    # Columns are [prefix | padding | own tokens]; move each row's padding in front of its prefix.
    pad = (width - own.sum(dim=1))[:, None]
    col = torch.arange(length + width, device=device)[None].expand(n, -1)
    source = torch.where(col < pad, col + length, torch.where(col < pad + length, col - pad, col))
    for layer in cache.layers:
        index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    return out.logits[:, -1, :], cache, (col >= pad).long()


def decode_greedy(model: Any, tokenizer: Any, prompts: list[str], order: list[int], stop_ids: list[int],
                  max_new_tokens: int, slots: int, add_special: bool, matchers: list[Any] | None = None,
                  want_logprobs: bool = False) -> list[Answer]:
    """The answers to `prompts` (in prompt order), admitted in `order`, at most `slots` decoded at once.
    `matchers`: per prompt, an llguidance matcher (or None) its answer gets a fresh copy of. `want_logprobs`:
    fill Answer.logprobs."""
    import torch

    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # 5.24 renamed it
    stops = set(stop_ids)
    waiting = deque(order)
    answers: list[Answer | None] = [None] * len(prompts)
    batch = Batch()
    pending = None  # each live row's last chosen token, not yet in the cache
    token_ids = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    shared, prefix = shared_prefix(model, token_ids, cache_kw)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    while waiting or batch.live:
        free = slots - len(batch.live)
        if free > 0 and waiting:
            idx = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            rows = [Answer(i, matchers[i].deep_copy() if matchers and matchers[i] is not None else None)
                    for i in idx]
            for a in rows:
                answers[a.index] = a
            if prefix is not None:
                logits, cache, mask = prefill_after(model, prefix, shared, [token_ids[i][shared:] for i in idx],
                                                    pad_id, cache_kw)
            else:
                logits, cache, mask = prefill(model, *left_padded([token_ids[i] for i in idx], pad_id, device),
                                              cache_kw)
            first = choose(rows, logits, stops, max_new_tokens, want_logprobs)
            batch.join(rows, cache, mask)
            pending = first if pending is None else torch.cat([pending, first])
        kept = [r for r, a in enumerate(batch.live) if not a.done]
        if len(kept) < len(batch.live):
            pending = pending[torch.tensor(kept, device=pending.device)] if kept else None
            batch.drop_finished()
        if not batch.live or (waiting and len(batch.live) < slots):
            continue  # admit before decoding, so the new rows share this step
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.live), 1))], dim=1)
        positions = batch.mask.long().sum(dim=1, keepdim=True)
        out = model(input_ids=pending, attention_mask=mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_kw: batch.cache})
        batch.mask = mask
        pending = choose(batch.live, out.logits[:, -1, :], stops, max_new_tokens, want_logprobs)
    return answers  # type: ignore[return-value]


def generate_continuous(model: Any, tokenizer: Any, prompts: list[str], order: list[int], stop_ids: list[int],
                        max_new_tokens: int, slots: int, add_special: bool, lltokenizer: Any = None,
                        grammars: list[str | None] | None = None, logprobs: bool = False) -> list[Generation]:
    """generate_transformers' greedy answers through decode_greedy, in prompt order. All answers come back
    when the call ends, as one batch: latency_s is the whole call's wall time and batch is 0 for every answer
    (so finetune.evaluate.metrics, which adds up one latency per batch, counts the call's wall time)."""
    import torch

    matchers = None
    if lltokenizer is not None:  # generate_transformers made it because some prompt has a grammar
        from finetune.runtimes.constrained import prototypes

        matchers = prototypes(lltokenizer, grammars)
    t0 = time.perf_counter()
    with torch.inference_mode():
        answers = decode_greedy(model, tokenizer, prompts, order, stop_ids, max_new_tokens, slots, add_special,
                                matchers, want_logprobs=logprobs)
    latency = time.perf_counter() - t0
    # a.logprobs ends with the stop token's when the answer stopped; Generation.logprobs leaves it out.
    return [Generation(tokenizer.decode(a.tokens, skip_special_tokens=True), len(a.tokens), latency,
                       stopped=a.stopped, batch=0,
                       logprobs=[round(x, 5) for x in a.logprobs[: len(a.tokens)]] if logprobs else None,
                       steered=a.steered if a.matcher is not None else None)
            for a in answers]
