"""One copy of the tokens every row of a batch begins with (the system prompt and the chat template's opening).

Every training row of a task starts with the same system prompt and user-turn opening: for the extraction task
57 of a row's ~133 tokens (SmolLM2's template). In a causal model those tokens' hidden states depend only on
themselves, so they are the same in every row of the batch; padding-free batches computed them once per row.
With `method.share_prefix` the collator keeps them once, at the head of the batch's single row, and every other
row follows as a suffix whose positions continue from the prefix (position_ids p, p+1, ...). The attention
below reads that layout off the position_ids: a segment that starts at position s > 0 attends to the first s
tokens of the batch (the prefix) and causally to itself. The loss and the gradients are the rows' own, summed
(the prefix's gradient is the sum of what each row's copy would get); tests/test_train.py checks both against
the unshared batch. The prefix stops before the first labelled token of every row, so no loss term moves.

Used where it is exact and measured: padding-free training on a CPU, with transformers' sdpa attention and no
logit soft-capping or sliding window shorter than the rows (`unsupported_reason`).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("finetune")

ATTENTION = "finetune_shared_prefix"
MIN_PREFIX = 8  # shorter shared openings are not worth a different layout


def shared_prefix_length(rows: list[dict]) -> int:
    """Tokens every row begins with, ending at least one token before the first labelled token of any row (so
    each row's first suffix token is unlabelled: it is predicted across a row boundary and masked)."""
    if len(rows) < 2:
        return 0
    ids = [row["input_ids"] for row in rows]
    first = ids[0]
    limit = min(len(x) for x in ids) - 1
    for row in rows:
        labelled = next((i for i, label in enumerate(row["labels"]) if label != -100), len(row["labels"]))
        limit = min(limit, labelled - 1)
    length = 0
    while length < limit and all(x[length] == first[length] for x in ids[1:]):
        length += 1
    return length


def opening_cost(rows: list[dict], batch_size: int, shared: bool) -> dict:
    """The opening every training row begins with (system prompt and chat template, in tokens), the rows' mean
    length, and the opening's share of the tokens a training step of `batch_size` rows computes: once per
    batch where the rows share it (`shared`), once per row otherwise. `rows`: the training rows or a sample."""
    opening = shared_prefix_length(rows)
    mean = sum(len(row["input_ids"]) for row in rows) / max(len(rows), 1)
    computed = opening + batch_size * (mean - opening) if shared else batch_size * mean
    share = (opening if shared else batch_size * opening) / computed if computed else 0.0
    return {"opening_tokens": opening, "row_tokens_mean": round(mean, 1), "opening_share_of_step": round(share, 3)}


class SharedPrefixCollator:
    """Padding-free batches whose rows share their common opening (module docstring); batches without one
    (fewer than MIN_PREFIX tokens, or a single row) go to `fallback`, TRL's padding-free collator."""

    def __init__(self, fallback: Any):
        self.fallback = fallback

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        prefix = shared_prefix_length(rows)
        if prefix < MIN_PREFIX:
            return self.fallback(rows)
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i, row in enumerate(rows):
            start = 0 if i == 0 else prefix
            ids, row_labels = list(row["input_ids"][start:]), list(row["labels"][start:])
            row_labels[0] = -100  # predicted from the previous row's last token: never a loss term
            input_ids += ids
            labels += row_labels
            positions += range(start, start + len(ids))
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def segments(position_ids: Any) -> list[tuple[int, int, int]] | None:
    """(start, end, first position) of each run of consecutive positions in a one-row batch, or None when the
    row is one plain sequence or not a layout this attention reads (the first run must start at 0, and a run
    starting at s > 0 needs the first run to hold s tokens)."""
    pos = position_ids.reshape(-1)
    breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()
    if not breaks:
        return None
    bounds = [0, *breaks, pos.numel()]
    firsts = pos[bounds[:-1]].tolist()
    if firsts[0] != 0 or max(firsts) > bounds[1]:
        return None
    return [(a, b, s) for a, b, s in zip(bounds[:-1], bounds[1:], firsts)]


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: segment by segment on a shared-prefix or packed training row, sdpa
    (with the mask transformers built) for everything else, generation included."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    parts = None
    if position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1:
        parts = segments(position_ids)
    if parts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    outputs = []
    for start, end, prefix in parts:
        # Small per-segment matrices: eager math beats the CPU flash kernel's backward here (docs/training.md).
        q = query[:, :, start:end]
        k, v = key[:, :, start:end], value[:, :, start:end]
        n = end - start
        blocked = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        if prefix:
            k = torch.cat([key[:, :, :prefix], k], dim=2)
            v = torch.cat([value[:, :, :prefix], v], dim=2)
            blocked = torch.cat([blocked.new_zeros(n, prefix), blocked], dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        outputs.append(torch.matmul(probs, v))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ATTENTION a name transformers accepts (its masks built as for sdpa, used by the fallback)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def unsupported_reason(model: Any, max_length: int) -> str | None:
    """Why this model's attention cannot be computed this way exactly, or None."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", ATTENTION):
        return f"attention implementation {implementation!r} (only sdpa is replaced)"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    window = getattr(config, "sliding_window", None)
    if window and (getattr(config, "use_sliding_window", True) is not False) and window < max_length:
        return f"sliding-window attention ({window} < method.max_length={max_length})"
    return None


def enable(model: Any, fallback: Any, max_length: int) -> SharedPrefixCollator | None:
    """Switch `model` to the shared-prefix attention and return the collator; None (and a log line saying
    why) where it would not be exact."""
    reason = unsupported_reason(model, max_length)
    if reason:
        log.info("method.share_prefix: not used for this model: %s", reason)
        return None
    model.set_attn_implementation(register())
    return SharedPrefixCollator(fallback)
