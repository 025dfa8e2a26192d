"""Trainer callbacks: a progress line a person can follow, and a guard that stops a diverging run.

ProgressLog prints one line per logging step (rank 0): step, loss, learning rate, gradient norm, real
(non-pad) tokens per second and the time left. DivergenceGuard raises TrainingDiverged as soon as a loss or
gradient norm is NaN/inf, before the checkpoint of that step is written and long before anything is exported.
"""

from __future__ import annotations

import logging
import math
import time

from transformers import TrainerCallback

from finetune.core.errors import TrainingDiverged

log = logging.getLogger("finetune")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLog(TrainerCallback):
    """One line per logging step: `step 20/60 (33%) | loss 1.234 | lr 1.9e-04 | grad 0.81 | 412 tok/s | ETA 2m04s`."""

    def __init__(self) -> None:
        self.start = self.last_time = 0.0
        self.start_step = 0
        self.last_tokens: float | None = None
        self.tokens = 0.0  # non-pad tokens seen in this session
        self.train_seconds = 0.0  # time spent on training steps (evaluation excluded) in this session

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.time()
        self.start_step = state.global_step
        if state.is_world_process_zero:
            log.info("training: %d steps (from step %d), %d process(es), per-device batch %d x %d accumulation",
                     state.max_steps, state.global_step, args.world_size, args.per_device_train_batch_size,
                     args.gradient_accumulation_steps)

    def tokens_per_second(self) -> float | None:
        return round(self.tokens / self.train_seconds, 1) if self.train_seconds > 0 else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.time()
        if "eval_loss" in logs:
            if state.is_world_process_zero:
                # state.best_metric is updated after this log; include the value just measured. It is the
                # loss only when checkpoints are chosen by loss (method.best_by=task: the task metric, logged apart).
                best = ""
                if state.best_metric is not None and args.metric_for_best_model in (None, "eval_loss", "loss"):
                    best = f" (best {min(state.best_metric, logs['eval_loss']):.4f})"
                log.info("eval  step %d/%d | eval_loss %.4f%s | %.1fs", state.global_step, state.max_steps,
                         logs["eval_loss"], best, logs.get("eval_runtime", 0.0))
            self.last_time = now  # evaluation time does not count towards tokens/s
            return
        if "loss" not in logs:
            return
        # TRL logs the running count of non-pad tokens of all processes; it restarts at 0 after a resume.
        total = logs.get("num_tokens")
        rate = None
        if total is not None:
            if self.last_tokens is not None and total >= self.last_tokens:
                seen, seconds = total - self.last_tokens, now - self.last_time
                self.tokens += seen
                self.train_seconds += seconds
                rate = seen / seconds if seconds > 0 else None
            self.last_tokens = total
        self.last_time = now
        if not state.is_world_process_zero:
            return
        done = state.global_step - self.start_step
        eta = (now - self.start) / done * (state.max_steps - state.global_step) if done > 0 else None
        parts = [f"step {state.global_step}/{state.max_steps} ({100 * state.global_step / max(1, state.max_steps):.0f}%)",
                 f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if logs.get("grad_norm") is not None:
            parts.append(f"grad {logs['grad_norm']:.3g}")
        if rate is not None:
            parts.append(f"{rate:.0f} tok/s")
        parts.append(f"elapsed {_duration(now - self.start)}")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        log.info(" | ".join(parts))


class DivergenceGuard(TrainerCallback):
    """Raise TrainingDiverged when a logged loss or gradient norm is NaN or infinite, or when the loss has
    exploded to the level of a uniform guess over the vocabulary (ln V) from far below it: a learning rate
    that large often saturates the model into a finite but useless state instead of overflowing.

    Every process sees the same (gathered) logs, so every process stops. `logging_nan_inf_filter=False`
    keeps the Trainer from hiding a NaN step inside the logged average.
    """

    KEYS = ("loss", "grad_norm", "eval_loss")

    def __init__(self, method, precision: str) -> None:
        self.lr = method.lr
        self.precision = precision
        self.first_loss: float | None = None
        self.uniform_loss: float | None = None  # ln(vocabulary size)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = getattr(model, "config", None)
        vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
        self.uniform_loss = math.log(vocab) if vocab else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in self.KEYS:
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                raise TrainingDiverged(self.message(key, value, state.global_step))
        loss = logs.get("loss")
        if loss is None:
            return
        if self.first_loss is None:
            self.first_loss = float(loss)
        elif self.uniform_loss and loss >= 0.9 * self.uniform_loss and loss > 2 * self.first_loss:
            raise TrainingDiverged(self.message(
                "loss", loss, state.global_step,
                f" (it started at {self.first_loss:.3f}; ln(vocabulary) = {self.uniform_loss:.3f} is a uniform guess)"))

    def message(self, key: str, value: float, step: int, why: str = "") -> str:
        hints = [f"lower the learning rate (method.lr={self.lr:g}; try {self.lr / 10:g})",
                 "keep gradient clipping on (method.max_grad_norm=1.0)"]
        if self.precision == "fp16":
            hints.append("use method.precision=bf16 or fp32 (fp16 overflows)")
        elif self.precision == "bf16":
            hints.append("or method.precision=fp32")
        return (
            f"training diverged at step {step}: {key} = {value}{why}. The weights are garbage, so no adapter "
            f"was saved and nothing will be exported. To fix it: {'; '.join(hints)}. Then start over with "
            f"resume=false or a new run_dir (the checkpoints hold the diverging optimizer state)."
        )
