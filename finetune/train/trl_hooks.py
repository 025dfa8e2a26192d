"""Our changes to TRL's SFTTrainer: the LM head scores only the completion positions on every device, and
evaluation can add the task's own metric on validation rows (finetune.train.selection).

TRL 1.16 projects through the 49k-vocabulary head (log-probs, entropy, top-1, in chunks) only where the label
is not -100 on CUDA/XPU, but at EVERY position elsewhere, to keep tile shapes static for Neuron's compiler.
On a CPU that is prompt and padding too: py-spy put 26% of a training step in that forward alone, with
completion tokens ~37% of the real ones (docs/training.md). The loss and the logged metrics are the same
either way (masked positions are zeroed, tested to 1e-5); only our trainer turns it on (a thread-local flag
around compute_loss), so a plain SFTTrainer in the same process (scripts/bench_train.py's baseline) keeps
TRL's behaviour. If TRL stops deciding this through trl.trainer.utils._use_triton, nothing is patched.

On a CPU our trainer also projects those positions in one piece rather than through TRL's vocabulary tiles
(`dense_log_probs`): the tiles exist to keep the [tokens, vocabulary] logits out of GPU memory, and off a GPU
they cost a second projection in the backward, a zero-filled 49k x 576 weight gradient that the tiles then add
into, and ~10 elementwise passes over each tile in torch (TRL's Triton kernels do those on a GPU). A few hundred
completion tokens' logits are ~45 MB; above DENSE_MAX_ELEMENTS (tokens x vocabulary) TRL's tiles are used.
Same log-probabilities, entropy and top-1 (tested against TRL's function); docs/training.md has the speed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("finetune")

_COMPACT = threading.local()
DENSE_MAX_ELEMENTS = 1 << 26  # completion tokens x vocabulary: 256 MB of fp32 logits


def _patch_trl_utils(name: str, replace: Callable[[Any], Any]) -> bool:
    """Swap trl.trainer.utils.<name> for replace(original), once per process; False (and nothing changed) if TRL
    no longer has it, so the LM head is then computed as TRL decides."""
    import trl.trainer.utils as trl_utils

    marker = f"_finetune_replaced_{name}"
    if getattr(trl_utils, marker, False):
        return True
    original = getattr(trl_utils, name, None)
    if original is None:
        log.debug("trl.trainer.utils.%s is gone: LM head as TRL computes it", name)
        return False
    setattr(trl_utils, name, replace(original))
    setattr(trl_utils, marker, True)
    return True


def _compact_while_we_train(use_triton: Callable) -> Callable:
    """TRL's device test, saying "compact" while our trainer computes a loss."""
    return lambda device: use_triton(device) or getattr(_COMPACT, "on", False)


def dense_log_probs(hidden, weight, bias, targets, temperature: float = 1.0, softcap: float | None = None,
                    logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> tuple:
    """What TRL's ChunkedLogProbFunction returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1; None
    where not in `outputs`), from one projection of all rows through the head. Only the log-probabilities carry
    gradients: the other fields are logged, never trained on (TRL's SFTTrainer detaches them)."""
    import torch
    import torch.nn.functional as F

    from finetune.train.model import bf16_weight

    copy = bf16_weight(weight)  # a frozen head under CPU bf16 autocast: cast once, not every step
    z = F.linear(hidden, weight if copy is None else copy, bias).float()  # bf16 product, fp32 softmax (as TRL's)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    log_p = z.log_softmax(-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
        log_sum_sq = torch.logsumexp(2 * log_p, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None  # the first maximum, as TRL's
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def _dense_on_cpu(chunked: Any) -> Any:
    """TRL's LM-head function, computed by dense_log_probs while our trainer computes a loss on a CPU (module
    docstring)."""

    class DenseOnCpu:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, *rest):
            if (getattr(_COMPACT, "on", False) and hidden.device.type == "cpu"
                    and hidden.shape[0] * weight.shape[0] <= DENSE_MAX_ELEMENTS):
                return dense_log_probs(hidden, weight, bias, targets, temperature, *rest)
            return chunked.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)

    return DenseOnCpu


def trainer_class() -> type:
    """SFTTrainer whose loss scores only completion positions through the LM head (module docstring)."""
    from trl import SFTTrainer

    global _TRAINER
    if _TRAINER is None:
        _patch_trl_utils("_use_triton", _compact_while_we_train)
        _patch_trl_utils("_ChunkedLogProbFunction", _dense_on_cpu)

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
