"""Generation: free text (a headline, a summary), scored with ROUGE against one reference.

Parsing strips a code fence, surrounding whitespace and quotes, and a leading "Headline:" /
"Title:" / "Summary:" / "Answer:" label. Scoring: mean ROUGE-1/2/L F-measure (rouge-score,
Porter stemming, its default lower-casing tokenizer); exact_match after case/space folding is the
per-row `correct`. The headline is rougeL. Specialist baseline: the lead (first sentence of the
input), the classic summarization baseline.
"""

from __future__ import annotations

import re
from typing import Any

from finetune.tasks.base import BadExample, Task, normalize_text, strip_fences

_LABEL = re.compile(r"^\s*(?:headline|title|summary|answer)\s*:\s*", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9£$])")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def first_sentence(text: str) -> str:
    text = " ".join((text or "").split())
    match = _SENTENCE_END.search(text)
    return text[: match.start()].strip() if match else text


class GenerationTask(Task):
    kind = "generation"
    headline_metric = "rougeL"
    specialists = ("lead",)
    baseline_notes = {"lead": "the input's first sentence"}

    # ---- data -------------------------------------------------------------------------
    def check_output(self, value: Any) -> str:
        if not isinstance(value, str):
            raise BadExample("wrong_type", f"answer should be a string, got {type(value).__name__}")
        return value.strip()

    def answer_text(self, reference: str) -> str:
        return reference

    # ---- answers ----------------------------------------------------------------------
    def parse(self, text: str) -> str | None:
        text = _LABEL.sub("", strip_fences(text or "")).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1].strip()
        return text or None

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        if len(references) != len(outputs):
            raise ValueError(f"{len(references)} references but {len(outputs)} outputs")
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        rows = []
        for reference, output in zip(references, outputs):
            parsed = self.parse(output)
            scores = scorer.score(str(reference), parsed or "")
            row = {k: scores[k].fmeasure for k in ROUGE_TYPES}
            for k in ROUGE_TYPES:
                totals[k] += row[k]
            correct = parsed is not None and normalize_text(parsed) == normalize_text(str(reference))
            rows.append({"parsed": parsed, "correct": correct, **row})
        n = len(outputs)
        metrics: dict[str, float] = {"n": n}
        metrics.update({k: (totals[k] / n if n else 0.0) for k in ROUGE_TYPES})
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n if n else 0.0
        metrics["empty_rate"] = sum(r["parsed"] is None for r in rows) / n if n else 0.0
        return metrics, rows

    # ---- baseline -----------------------------------------------------------------------
    def baseline(self, name: str, train_rows: list[dict], test_rows: list[dict]) -> tuple[list[str], dict] | None:
        if name != "lead":
            return super().baseline(name, train_rows, test_rows)
        return [first_sentence(self.input_of(row)) for row in test_rows], {}
