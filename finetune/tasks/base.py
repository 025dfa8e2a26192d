"""What every task kind shares: the prompt, reading a row's input back, the answer-text helpers.

A task kind module (extraction.py, classification.py, generation.py) adds the three things that
differ: how a reference answer is checked and written (`check_output`, `answer_text`), how a model's
answer is parsed (`parse`, forgiving), and how it is scored (`score`, strict).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from finetune.core.config import TaskConfig
from finetune.core.errors import ConfigError
from finetune.tasks.grammar import Constraint, gbnf_grammar


class BadExample(ValueError):
    """A data row the task cannot use; `kind` names the problem in the validation report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)


def strip_fences(text: str) -> str:
    """The inside of the first ```lang ... ``` block if the answer has one, else the text itself."""
    match = _FENCE.search(text)
    return match.group(1).strip() if match else text.strip()


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def normalize_value(value: Any) -> str:
    """An extraction value as scoring compares it: text normalized and stripped of edge spaces, commas
    and semicolons; any other value as canonical JSON."""
    if isinstance(value, str):
        return normalize_text(value).strip(" ,;")
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class Task:
    kind = ""
    headline_metric = ""
    specialists: tuple[str, ...] = ()  # baselines this kind offers; the first is the default
    baseline_notes: dict[str, str] = {}  # what each baseline is, for the report

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.name = str(cfg.name)
        self.system_prompt = cfg.system_prompt or ""
        self.prompt_template = cfg.prompt_template or "{input}"
        self.learned: dict = {}  # what learn_from_train settled
        self.specialist = cfg.specialist or (self.specialists[0] if self.specialists else "none")
        if self.specialist not in ("none", *self.specialists):
            raise ConfigError(
                f"task {self.name}: specialist {self.specialist!r} is not one of {['none', *self.specialists]} "
                f"for kind {self.kind}"
            )
        references = [str(b) for b in (cfg.reference_baselines or [])]
        unknown = [b for b in references if b not in self.specialists]
        if unknown:
            raise ConfigError(
                f"task {self.name}: reference_baselines {unknown} are not baselines of kind {self.kind} "
                f"(choose from {list(self.specialists)}, or task.reference_baselines=[])"
            )
        # One that is already the specialist is evaluated once, as the specialist.
        self.reference_baselines = [b for b in dict.fromkeys(references) if b != self.specialist]
        try:
            self.prompt_template.format(input="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"task {self.name}: prompt_template {self.prompt_template!r} must contain {{input}} and no other "
                f"{{placeholder}} (write literal braces as {{{{ and }}}}): {exc!r}"
            ) from None

    # ---- prompts -------------------------------------------------------------------------
    def user_turn(self, text: str) -> str:
        return self.prompt_template.format(input=text)

    def prompt_messages(self, text: str) -> list[dict]:
        """System prompt (when the task has one) + the user turn, in chat-message form."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": self.user_turn(text)}]

    def input_of(self, row: dict) -> str:
        """The raw input of a data-stage row: its `input` field, else the user turn minus the template."""
        if isinstance(row.get("input"), str):
            return row["input"]
        user = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        marker = "\x00INPUT\x00"
        prefix, _, suffix = self.prompt_template.format(input=marker).partition(marker)
        if user.startswith(prefix) and user.endswith(suffix) and len(user) >= len(prefix) + len(suffix):
            return user[len(prefix) : len(user) - len(suffix)]
        return user

    # ---- per kind ---------------------------------------------------------------------
    def check_output(self, value: Any) -> Any:
        """The reference answer for a data value, or BadExample naming what is wrong with it."""
        raise NotImplementedError

    def learn_from_train(self, train_references: list, train_inputs: list[str | None] | None = None) -> dict:
        """Settle what the task takes from the training answers (and their inputs) before rows are rendered
        (extraction: the field list and its order, whether values copy the input); returns what was decided,
        for the data stage's report."""
        return self.learned

    def label_counts(self, references: list) -> dict[str, int] | None:
        """How many of these answers hold each label (classification) or field (extraction), in the task's
        order, for the report's per-label table; None where a task has neither."""
        return None

    def check_held_out(self, references: dict[str, list]) -> None:
        """After learn_from_train: note in `learned` what the validation/test references ({split: [reference]})
        hold that training did not (classification: labels the model cannot have learned)."""

    def answer_text(self, reference: Any) -> str:
        """The assistant turn the model is trained to write for this reference."""
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError

    def baseline(self, name: str, train_rows: list[dict], test_rows: list[dict]) -> tuple[list[str], dict] | None:
        """Answers of the named baseline (one of `specialists`) on test_rows, fitted on train_rows where it
        learns, and what to record about it; None when it cannot be applied to this data."""
        raise ConfigError(f"task {self.name}: kind {self.kind} has no baseline {name!r}")

    def specialist_baseline(self, train_rows: list[dict], test_rows: list[dict]) -> list[str] | None:
        """Answers of the task's specialist on test_rows; None when it has none or it does not apply."""
        if self.specialist == "none":
            return None
        result = self.baseline(self.specialist, train_rows, test_rows)
        return None if result is None else result[0]

    def headline(self, references: list, scored: list[dict]) -> float:
        """The headline metric of these rows from `score`'s per-row results, without parsing the answers again
        (a bootstrap resamples the rows); here the mean of each row's own value, the kinds that pool counts
        over rows override it."""
        return sum(row[self.headline_metric] for row in scored) / len(scored) if scored else 0.0

    # ---- constrained decoding (finetune.tasks.grammar) ---------------------------------------
    per_input = False  # whether the constraint depends on the input answered (answer_constraint(text))

    def answer_constraint(self, text: str | None = None) -> Constraint:
        """What a valid answer is, for constrained decoding: a JSON schema dict, a label list, or None.
        `text`: the input answered, where the constraint depends on it (per_input); None: any input."""
        return None

    def answer_grammar(self, text: str | None = None) -> str | None:
        """The GBNF grammar every runtime decodes under (None: free text)."""
        return gbnf_grammar(self.answer_constraint(text))

    def answer_grammars(self, inputs: list[str]) -> str | list[str | None] | None:
        """The grammar of answers to these inputs: one for all of them, or one each where it depends on the input."""
        if not self.per_input:
            return self.answer_grammar()
        return [self.answer_grammar(text) for text in inputs]
