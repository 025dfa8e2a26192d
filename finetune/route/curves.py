"""Quality against the share of calls sent to the strong model, RouteLLM's measures of it, and the choice of
the escalation threshold.

A router escalates every answer whose confidence is below its threshold. Sweeping the threshold from "never"
to "always" escalates the least confident rows first; each distinct confidence value is one point of the
curve: (share escalated, the task's headline metric over the mixed answers). Quality is always the task's
own metric recomputed on the mix (macro-F1 is not a mean of rows).

RouteLLM (Ong et al. 2024) measures a curve by the performance gap recovered, PGR = (q - q_small) /
(q_strong - q_small): APGR is its area over the share of strong calls, CPT(x) the smallest share of strong
calls that recovers x of the gap. They exist only where the strong model is better (a positive gap);
otherwise the report says that routing cannot pay and the router should escalate nothing.
"""

from __future__ import annotations

import random
from typing import Any, Callable

ALWAYS = 1e300  # escalate_below for "escalate every answer" (JSON has no infinity)


def quality(task: Any, references: list, outputs: list[str]) -> float:
    return float(task.score(references, outputs)[0][task.headline_metric])


def row_scores(task: Any, references: list, outputs: list[str]) -> list[float]:
    """Each row's share of the headline metric: its field F1 (extraction), 1/0 right (classification), its
    ROUGE (generation)."""
    _, rows = task.score(references, outputs)
    scores = []
    for row in rows:
        if "tp" in row:
            denominator = 2 * row["tp"] + row["fp"] + row["fn"]
            scores.append(2 * row["tp"] / denominator if denominator else 1.0)
        elif task.headline_metric in row:
            scores.append(float(row[task.headline_metric]))
        else:
            scores.append(float(row["correct"]))
    return scores


def curve(task: Any, references: list, small: list[str], strong: list[str], conf: list[float]) -> list[dict]:
    """Points (escalated, share, quality, escalate_below) from escalating nothing to everything."""
    n = len(references)
    order = sorted(range(n), key=lambda i: (conf[i], i))
    mixed = list(small)
    points = [{"escalated": 0, "share": 0.0, "quality": quality(task, references, mixed), "escalate_below": None}]
    for k, i in enumerate(order, 1):
        mixed[i] = strong[i]
        if k < n and conf[order[k]] == conf[i]:
            continue  # a threshold cannot split equal confidences
        below = (conf[i] + conf[order[k]]) / 2 if k < n else ALWAYS
        points.append({"escalated": k, "share": k / n, "quality": quality(task, references, mixed),
                       "escalate_below": below})
    return points


def area(xs: list[float], ys: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def measures(points: list[dict]) -> dict:
    """Small and strong quality, the best point, the curve's mean quality, and RouteLLM's APGR and
    CPT(50%) / CPT(80%) where the strong model is better."""
    q_small, q_strong = points[0]["quality"], points[-1]["quality"]
    best = max(points, key=lambda p: (p["quality"], -p["share"]))
    shares = [p["share"] for p in points]
    out = {"small": q_small, "strong": q_strong, "gap": q_strong - q_small,
           "best": {"share": best["share"], "quality": best["quality"]},
           "mean_quality": area(shares, [p["quality"] for p in points])}
    if q_strong <= q_small:
        out.update(apgr=None, cpt50=None, cpt80=None,
                   note="the strong model is not better on these rows: routing cannot recover a gap")
        return out
    pgr = [(p["quality"] - q_small) / (q_strong - q_small) for p in points]
    out["apgr"] = area(shares, pgr)
    for name, x in (("cpt50", 0.5), ("cpt80", 0.8)):
        out[name] = next(p["share"] for p, g in zip(points, pgr) if g >= x - 1e-12)
    return out


def bootstrap_gain(small_rows: list[float], strong_rows: list[float], escalated: set[int], n: int = 2000,
                   seed: int = 0) -> float:
    """Share of paired bootstrap resamples of the rows in which escalating `escalated` raises the mean row
    score: how sure the validation rows are that this escalation helps."""
    deltas = [(strong_rows[i] - small_rows[i]) if i in escalated else 0.0 for i in range(len(small_rows))]
    if not any(deltas):
        return 0.0
    rng = random.Random(seed)
    size = len(deltas)
    wins = sum(sum(deltas[rng.randrange(size)] for _ in range(size)) > 0 for _ in range(n))
    return wins / n


def choose(points: list[dict], conf: list[float], small_rows: list[float], strong_rows: list[float], *,
           max_escalated: float, target_quality: float | None, min_confidence: float) -> dict:
    """The validation point to deploy (see RouteConfig): with a quality target, the fewest escalations that
    reach it; else the best quality within max_escalated whose gain over escalating nothing holds in
    min_confidence of bootstrap resamples (else escalate nothing)."""
    if target_quality is not None:
        reached = [p for p in points if p["quality"] >= target_quality]
        if reached:
            return {**min(reached, key=lambda p: p["share"]), "reason": f"fewest escalations reaching {target_quality}"}
    limit = 1.0 if target_quality is not None else max_escalated
    base = points[0]
    for p in sorted((p for p in points if p["share"] <= limit + 1e-9), key=lambda p: (-p["quality"], p["share"])):
        if p["escalated"] == 0 or p["quality"] <= base["quality"]:
            break
        escalated = {i for i, c in enumerate(conf) if c < p["escalate_below"]}
        sure = bootstrap_gain(small_rows, strong_rows, escalated)
        if sure >= min_confidence:
            why = "target not reached: best quality" if target_quality is not None else f"best quality within {limit:.0%} escalated"
            return {**p, "bootstrap": sure, "reason": why}
    return {**base, "reason": "no escalation gains on the validation rows with the required confidence"}


def apply(task: Any, references: list, small: list[str], strong: list[str], conf: list[float],
          escalate_below: float | None, strong_tokens: list[int]) -> dict:
    """The chosen threshold on other rows: quality, share escalated, and the calls and strong-model tokens
    saved against sending every request to the strong model."""
    escalated = [escalate_below is not None and c < escalate_below for c in conf]
    mixed = [t if e else s for s, t, e in zip(small, strong, escalated)]
    n = len(references)
    all_tokens = sum(strong_tokens)
    used = sum(t for t, e in zip(strong_tokens, escalated) if e)
    return {"quality": quality(task, references, mixed), "share_escalated": sum(escalated) / n if n else 0.0,
            "escalated": sum(escalated), "n": n, "calls_saved": 1 - sum(escalated) / n if n else 0.0,
            "strong_tokens": used, "strong_tokens_always": all_tokens,
            "strong_tokens_saved": 1 - used / all_tokens if all_tokens else None}


def cross_validated(fit: Callable[[list[int]], Callable[[int], float]], n: int, folds: int = 5,
                    seed: int = 0) -> list[float]:
    """Out-of-fold confidences: `fit(train_indices)` returns a confidence function of a row index."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    out = [0.0] * n
    for f in range(folds):
        held = idx[f::folds]
        rest = [i for i in idx if i not in set(held)]
        confidence = fit(rest)
        for i in held:
            out[i] = confidence(i)
    return out
