"""How sure a difference between two models is on these test rows: a paired bootstrap over the rows.

Fifty test rows rank models only when they differ by more than the rows' own noise: with TREC's 50 question
types the first 50 rows put a TF-IDF baseline ahead of the fine-tuned model in two runs of four, while all 538
rows put it 0.07-0.11 accuracy behind in every run (docs/tasks.md, "Example: many labels"). So every model the
evaluate stage scores on the fine-tuned model's rows gets the 95% interval of its headline difference to it:
the rows are drawn with replacement RESAMPLES times, the same draw for both models, and each draw's headline is
recomputed from the rows' scores (`Task.headline`). An interval that holds 0 is a difference these rows
cannot tell from none.
"""

from __future__ import annotations

import random
from typing import Any

RESAMPLES = 1000
SEED = 0  # the same rows drawn in every run: an interval moves only when the answers do


def paired_interval(task: Any, references: list, ours: list[dict], theirs: list[dict],
                    resamples: int = RESAMPLES) -> list[float]:
    """[low, high]: the 2.5th and 97.5th percentiles of headline(theirs) - headline(ours) over resampled rows
    (`ours`, `theirs`: the per-row scores of the same rows, in the same order)."""
    rng = random.Random(SEED)
    n = len(references)
    differences = []
    for _ in range(resamples):
        draw = [rng.randrange(n) for _ in range(n)]
        picked = [references[i] for i in draw]
        differences.append(task.headline(picked, [theirs[i] for i in draw])
                           - task.headline(picked, [ours[i] for i in draw]))
    differences.sort()
    return [round(differences[int(0.025 * resamples)], 4), round(differences[int(0.975 * resamples) - 1], 4)]


def against(task: Any, predictions: dict[str, list[dict]], reference: str = "finetuned") -> dict[str, list[float]]:
    """{model: [low, high]} for every model that answered the rows `reference` answered (matched by id)."""
    ours = {row["id"]: row for row in predictions.get(reference) or []}
    intervals = {}
    for name, rows in predictions.items():
        pairs = [(ours[row["id"]], row) for row in rows if row["id"] in ours]
        if name == reference or len(pairs) < 2:
            continue
        intervals[name] = paired_interval(task, [a["reference"] for a, _ in pairs], [a for a, _ in pairs],
                                          [b for _, b in pairs])
    return intervals
