"""The task's own metric on validation rows, during and after training.

A low validation loss is not a right answer: at 150 steps the address model had eval_loss 0.11 and field F1
0.62 (docs/training.md). So the trainer can score `method.metric_examples` validation rows with the task's
metric (greedy answers, as the evaluate stage generates them) at every evaluation and keep the checkpoint
with the best one (`method.best_by=task`), and it scores the final model once: that number is the
objective of a hyper-parameter search (the test split stays untouched by any choice). A plain run scores
no validation rows (finetune.core.config.metric_examples): the evaluate stage measures its model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from finetune.core.config import Config, metric_examples
from finetune.core.rundir import RunDir
from finetune.data.rows import read_rows, run_task
from finetune.models.loading import render_prompt
from finetune.runtimes.generation import Sampling
from finetune.runtimes.transformers import generate_transformers

log = logging.getLogger("finetune")


class ValidationScorer:
    """Greedy answers of the model being trained on the first `method.metric_examples` validation rows."""

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg = cfg
        self.task = run_task(cfg.task, run)
        path = run.split_path("validation")
        rows = read_rows(path, required=("prompt", "reference")) if path.is_file() else []
        self.rows = rows[: metric_examples(cfg.method)]
        self.metric = self.task.headline_metric
        self.key = f"eval_{self.metric}"

    def __bool__(self) -> bool:
        return bool(self.rows) and bool(self.metric)

    def score(self, model: Any, tokenizer: Any) -> dict:
        """{metric: value, ...} of the task on the validation rows, and the seconds it took."""
        start = time.perf_counter()
        prompts = [render_prompt(tokenizer, r["prompt"], self.cfg.model) for r in self.rows]
        sampling = Sampling(max_new_tokens=self.cfg.task.max_new_tokens)
        was_training = model.training
        try:
            outputs = generate_transformers(model, tokenizer, prompts, list(self.cfg.model.stop_tokens), sampling,
                                            batch_size=self.cfg.evaluate.batch_size)
        finally:
            model.train(was_training)
        metrics, _ = self.task.score([r["reference"] for r in self.rows], [o.text for o in outputs])
        return {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "seconds": round(time.perf_counter() - start, 1)}
