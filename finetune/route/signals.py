"""Confidence of one answer of the small model, from what generating it already gave: no extra model.

Signals of an answer (`features`):
  lp_min, lp_q10, lp_q25, lp_mean   the lowest per-token log-probability, its 10% and 25% quantiles, and the
                                    mean (Gupta et al. 2024: low quantiles are robust to answer length where
                                    the mean is not)
  valid                             the task's own check: the JSON parses and every key is a known field
                                    (extraction), the label is in the label set (classification), non-empty
  stopped                           the answer ended on the end-of-turn token, not at max_new_tokens
  log_tokens                        log(1 + answer tokens)

A `Scorer` turns them into one confidence (higher: more likely right): one signal alone, an invalid or
cut answer always least confident, or a logistic regression over all of them (scikit-learn), fitted on
the validation split only. Both are written to router.json as plain numbers, so the server computes the
same confidence without scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SIGNALS = ["lp_min", "lp_q10", "lp_q25", "lp_mean"]
FEATURES = [*SIGNALS, "valid", "stopped", "log_tokens"]
INVALID_PENALTY = 1000.0  # below any log-probability: an invalid or cut answer is escalated first


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), no numpy needed."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def answer_valid(task: Any, text: str) -> bool:
    """The task's own validity check of an answer (see the module docstring)."""
    parsed = task.parse(text)
    if parsed is None:
        return False
    fields = getattr(task, "fields", None)
    if isinstance(parsed, dict) and fields:
        return set(parsed) <= set(fields)
    return True


def features(task: Any, text: str, logprobs: list[float] | None, stopped: bool) -> dict[str, float]:
    """The signals of one answer. An answer without tokens counts as certain on the log-probabilities (its
    validity and stop signals still speak)."""
    lps = list(logprobs or []) or [0.0]
    return {
        "lp_min": min(lps),
        "lp_q10": quantile(lps, 0.10),
        "lp_q25": quantile(lps, 0.25),
        "lp_mean": sum(lps) / len(lps),
        "valid": float(answer_valid(task, text)),
        "stopped": float(bool(stopped)),
        "log_tokens": math.log1p(len(logprobs or [])),
    }


@dataclass
class Scorer:
    """How router.json turns signals into a confidence: kind "signal" (one signal, with the validity rule) or
    "logistic" (P(right) = sigmoid(bias + sum w_i (x_i - mean_i) / scale_i))."""

    kind: str
    signal: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0

    def confidence(self, x: dict[str, float]) -> float:
        if self.kind == "signal":
            ok = x["valid"] >= 0.5 and x["stopped"] >= 0.5
            return x[self.signal] - (0.0 if ok else INVALID_PENALTY)
        z = self.bias + sum(w * (x[k] - self.mean[k]) / self.scale[k] for k, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def name(self) -> str:
        return self.signal if self.kind == "signal" else "logistic(" + ",".join(self.weights) + ")"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}) or k == "kind"}

    @classmethod
    def from_dict(cls, data: dict) -> "Scorer":
        if data.get("kind") not in ("signal", "logistic"):
            raise ValueError(f"unknown scorer kind {data.get('kind')!r} (signal or logistic)")
        return cls(**data)


def fit_logistic(xs: list[dict[str, float]], bad: list[bool]) -> Scorer:
    """A logistic regression of "the small answer is right" on every feature, standardized (scikit-learn)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[x[k] for k in FEATURES] for x in xs], dtype=float)
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=1.0, max_iter=1000)
    model.fit((X - mean) / scale, [not b for b in bad])
    return Scorer(kind="logistic", weights={k: float(w) for k, w in zip(FEATURES, model.coef_[0])},
                  mean={k: float(m) for k, m in zip(FEATURES, mean)},
                  scale={k: float(s) for k, s in zip(FEATURES, scale)}, bias=float(model.intercept_[0]))
