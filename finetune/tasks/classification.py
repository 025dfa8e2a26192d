"""Classification: the answer is exactly one label of a fixed set.

Parsing is forgiving about the form of a label: case, surrounding quotes/brackets/asterisks, a
trailing period, a code fence, a "Label:" prefix, or an explanation after the label on the first
line or after the first word ("Spam - it offers a prize"). Anything else is invalid (parse -> None):
"not spam" is not read as spam.
Scoring: accuracy; macro_f1 over the labels the references or answers hold (scikit-learn's rule), where an
invalid answer is a miss for the true label and a false positive for none; invalid_rate; f1_<label> per
label. The label set is task.labels or, empty, the training answers' labels (learn_from_train). The headline
is macro_f1: with imbalanced classes (SMS spam is 87% ham) always answering the majority label scores 0.87
accuracy but only ~0.47 macro-F1.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Any

from finetune.core.config import TaskConfig
from finetune.core.errors import ConfigError
from finetune.tasks.base import BadExample, Task, f1, normalize_text, strip_fences

log = logging.getLogger("finetune")
_PREFIX = re.compile(r"^(?:the\s+)?(?:answer|label|category|class|classification)\s*(?:is)?\s*[:=-]?\s*", re.I)
_EDGES = " \t\n\"'`*_()[]{}<>.!?,;:"


class ClassificationTask(Task):
    kind = "classification"
    headline_metric = "macro_f1"
    specialists = ("tfidf_logreg",)
    baseline_notes = {"tfidf_logreg": "TF-IDF word 1-2-grams + logistic regression"}

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        # The label set. Empty: any label, and the set is learned from the training split (learn_from_train).
        self.labels = [str(label) for label in (cfg.labels or [])]
        self.labels_given = bool(self.labels)
        self._index_labels()

    def _index_labels(self) -> None:
        self._by_norm = {self._norm(label): label for label in self.labels}
        if len(self._by_norm) != len(self.labels):
            raise ConfigError(f"task {self.name}: labels {self.labels} are not distinct after case/punctuation folding")

    def learn_from_train(self, train_references: list[str], train_inputs: list[str | None] | None = None) -> dict:
        """With task.labels empty, the label set is the training answers' distinct labels, most frequent first
        (ties in order of appearance); a label only the validation or test rows hold cannot be learned, and
        is then a miss wherever it is the reference. The data stage's report lists the set and each label's
        count in the training split."""
        counts = collections.Counter(train_references)
        if not self.labels_given:
            self.labels = sorted(counts, key=lambda label: -counts[label])  # stable: ties keep appearance order
            if len(self.labels) < 2:
                raise ConfigError(
                    f"task {self.name} (kind classification): the training answers hold {len(self.labels)} "
                    f"distinct label(s) {self.labels}, so there is nothing to tell apart; set "
                    f"task.labels=[a,b,...] or check the data's output column")
            self._index_labels()
        self.learned = {"labels": list(self.labels), "labels_from": "task.labels" if self.labels_given
                        else "the training answers (task.labels empty)",
                        "label_counts_train": self.label_counts(train_references)}
        return self.learned

    def label_counts(self, references: list) -> dict[str, int]:
        counts = collections.Counter(references)
        return {label: counts.get(label, 0) for label in self.labels}

    def check_held_out(self, references: dict[str, list]) -> None:
        """Labels of validation/test rows that the learned set lacks (given labels reject such rows on reading):
        counted per split in the report (`labels_outside_training`) and warned about; each is a miss."""
        outside: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for split, labels in references.items():
            for label in labels:
                if label not in self.labels:
                    outside[label][split] += 1
        if outside:
            log.warning("[data] task %s: labels %s are in held-out rows but in no training answer: the model cannot "
                        "learn them, and each such row is a miss", self.name, sorted(outside))
        self.learned["labels_outside_training"] = {label: dict(splits) for label, splits in outside.items()}

    @staticmethod
    def _norm(text: str) -> str:
        return normalize_text(text).strip(_EDGES)

    # ---- data -------------------------------------------------------------------------
    def check_output(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadExample("wrong_type", f"label should be a string, got {type(value).__name__}")
        label = str(value).strip()
        if self.labels_given and label not in self.labels:
            raise BadExample("label_not_in_set", f"label {label!r} is not in the task's labels {self.labels}")
        return label

    def answer_text(self, reference: str) -> str:
        return reference

    def answer_constraint(self, text: str | None = None) -> list[str]:
        """The label set: a constrained answer is exactly one label, bare, as trained."""
        return list(self.labels)

    # ---- answers ----------------------------------------------------------------------
    def parse(self, text: str) -> str | None:
        text = strip_fences(text or "")
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        for candidate in (text, first_line, _PREFIX.sub("", first_line)):
            label = self._by_norm.get(self._norm(candidate))
            if label is not None:
                return label
        words = _PREFIX.sub("", first_line).split()
        if words:
            return self._by_norm.get(self._norm(words[0]))
        return None

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        if len(references) != len(outputs):
            raise ValueError(f"{len(references)} references but {len(outputs)} outputs")
        rows, parsed = [], []
        for reference, output in zip(references, outputs):
            p = self.parse(output)
            parsed.append(p)
            rows.append({"parsed": p, "correct": p == reference, "valid": p is not None})
        n = len(outputs)
        metrics: dict[str, float] = {"n": n}
        metrics["macro_f1"], per_label = self._macro_f1(references, parsed)
        metrics["accuracy"] = sum(r["correct"] for r in rows) / n if n else 0.0
        metrics["invalid_rate"] = sum(not r["valid"] for r in rows) / n if n else 0.0
        metrics.update({f"f1_{label}": value for label, value in per_label.items()})
        return metrics, rows

    def headline(self, references: list, scored: list[dict]) -> float:
        return self._macro_f1(references, [row["parsed"] for row in scored])[0]

    def _macro_f1(self, references: list, parsed: list) -> tuple[float, dict[str, float]]:
        """Macro-F1 and F1 per label. Every label of the set, and any reference label the set lacks (one the
        training split never held): the macro average is over the labels the references or the answers hold, as
        scikit-learn's f1_score(average="macro") takes them, so a label with no test row is not an automatic
        zero. An invalid answer (None) is a miss for its reference and a false positive for no label."""
        tp: collections.Counter = collections.Counter()
        fp: collections.Counter = collections.Counter()
        fn: collections.Counter = collections.Counter()
        for reference, answer in zip(references, parsed):
            if answer == reference:
                tp[reference] += 1
            else:
                fn[reference] += 1
                fp[answer] += 1
        classes = self.labels + [r for r in dict.fromkeys(references) if r not in self.labels]
        per_label = {label: f1(tp[label] / (tp[label] + fp[label]) if tp[label] + fp[label] else 0.0,
                               tp[label] / (tp[label] + fn[label]) if tp[label] + fn[label] else 0.0)
                     for label in classes}
        present = [label for label in classes if tp[label] + fn[label] + fp[label]]
        return (sum(per_label[label] for label in present) / len(present) if present else 0.0), per_label

    # ---- baseline -----------------------------------------------------------------------
    def baseline(self, name: str, train_rows: list[dict], test_rows: list[dict]) -> tuple[list[str], dict] | None:
        """tfidf_logreg: TF-IDF word 1-2-grams + logistic regression (one-vs-rest for more than two labels),
        fitted on the train split."""
        if name != "tfidf_logreg":
            return super().baseline(name, train_rows, test_rows)
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline

        texts = [self.input_of(r) for r in train_rows]
        labels = [r["reference"] for r in train_rows]
        info = {"train_rows": len(train_rows)}
        if len(set(labels)) < 2:
            return [labels[0] if labels else self.labels[0]] * len(test_rows), info
        classifier = LogisticRegression(C=10.0, solver="liblinear")
        if len(set(labels)) > 2:  # one-vs-rest, as liblinear did by itself before scikit-learn 1.8 refused it
            classifier = OneVsRestClassifier(classifier)
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), classifier)
        model.fit(texts, labels)
        return [str(p) for p in model.predict([self.input_of(r) for r in test_rows])], info
