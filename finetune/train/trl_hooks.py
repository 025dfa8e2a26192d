"""Our changes to TRL's SFTTrainer: the LM head scores only the completion positions on every device, and
evaluation can add the task's own metric on validation rows (finetune.train.selection).

TRL 1.16 projects through the 49k-vocabulary head (log-probs, entropy, top-1, in chunks) only where the label
is not -100 on CUDA/XPU, but at EVERY position elsewhere, to keep tile shapes static for Neuron's compiler.
On a CPU that is prompt and padding too: py-spy put 26% of a training step in that forward alone, with
completion tokens ~37% of the real ones (docs/training.md). The loss and the logged metrics are the same
either way (masked positions are zeroed, tested to 1e-5); only our trainer turns it on (a thread-local flag
around compute_loss), so a plain SFTTrainer in the same process (scripts/bench_train.py's baseline) keeps
TRL's behaviour. If TRL stops deciding this through trl.trainer.utils._use_triton, nothing is patched.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("finetune")

_COMPACT = threading.local()


def _install_compact_lm_head() -> bool:
    """Wrap TRL's device test so that it says "compact" while our trainer computes a loss; False (and
    nothing changed) if TRL has no such test any more."""
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_finetune_compact_lm_head", False):
        return True
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.debug("trl.trainer.utils._use_triton is gone: LM head scored as TRL decides")
        return False

    def use_compact(device) -> bool:
        return original(device) or getattr(_COMPACT, "on", False)

    trl_utils._use_triton = use_compact
    trl_utils._finetune_compact_lm_head = True
    return True


def trainer_class() -> type:
    """SFTTrainer whose loss scores only completion positions through the LM head (module docstring)."""
    from trl import SFTTrainer

    global _TRAINER
    if _TRAINER is None:
        _install_compact_lm_head()

        class FinetuneSFTTrainer(SFTTrainer):
            validation_scorer = None  # finetune.train.selection.ValidationScorer (method.metric_examples > 0)
            select_by_task = False  # method.best_by=task: every evaluation also scores the task metric

            def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
                """The validation loss, plus the task's metric on validation rows when checkpoints are chosen by it."""
                metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
                scorer = self.validation_scorer
                if self.select_by_task and scorer and eval_dataset is None and metric_key_prefix == "eval":
                    result = scorer.score(self.model, self.processing_class)
                    extra = {scorer.key: result[scorer.metric], "eval_task_seconds": result["seconds"]}
                    metrics.update(extra)
                    self.log(extra)
                    log.info("eval  step %d | %s %.4f on %d validation rows | %.1fs", self.state.global_step,
                             scorer.metric, result[scorer.metric], len(scorer.rows), result["seconds"])
                return metrics

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                _COMPACT.on = True
                try:
                    return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                                num_items_in_batch=num_items_in_batch)
                finally:
                    _COMPACT.on = False

        _TRAINER = FinetuneSFTTrainer
    return _TRAINER


_TRAINER: type | None = None
