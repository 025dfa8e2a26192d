"""Task kinds: the prompt, parsing a model's answer, the metric, and a non-LLM baseline.

    task = get_task(cfg.task)
    task.parse(text) -> parsed answer or None      (forgiving: fences, stray text, case)
    task.score(references, outputs) -> (metrics, rows)   (strict: see each kind's module)
    task.headline_metric -> "field_f1" | "macro_f1" | "rougeL"
    task.baseline(name, train_rows, test_rows) -> (answers, info) | None   (name: task.specialists)
    task.specialist_baseline(train_rows, test_rows) -> list[str] | None   (task.specialist's answers)

A new task of an existing kind needs only conf/task/<name>.yaml; a new kind adds a module here.
"""

from __future__ import annotations

from finetune.core.config import TaskConfig
from finetune.core.errors import ConfigError
from finetune.tasks.base import BadExample, Task
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.extraction import ExtractionTask
from finetune.tasks.generation import GenerationTask

KINDS: dict[str, type[Task]] = {
    "extraction": ExtractionTask,
    "classification": ClassificationTask,
    "generation": GenerationTask,
}

__all__ = ["BadExample", "Task", "get_task", "KINDS"]


def get_task(task_cfg: TaskConfig) -> Task:
    """The task object for the config's kind; ConfigError for an unknown kind or a bad task config."""
    kind = str(task_cfg.kind)
    if kind not in KINDS:
        raise ConfigError(f"task {task_cfg.name}: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind](task_cfg)
