"""Training sized by time: `method.budget_minutes` of optimizer steps, with the schedule fitted to them.

A CPU trains a few hundred tokens per second, and how many depends on the machine (about 3x between CPUs
with and without AVX512-BF16, docs/training.md), so a step count that suits one machine overruns or wastes
another. With a budget the trainer times its first steps, decides how many steps fit (never more than
method.epochs / method.max_steps allow), and re-fits the learning-rate schedule (warm-up and decay) to that
many steps, so the run ends on the schedule's last step instead of being cut mid-decay.

The first steps are a small sample: rows differ in length, and the evaluations and checkpoint saves that
come later take time of their own (a 12-minute budget decided on steps 2-5 alone trained 13.2 minutes,
docs/training.md). So the decision is revised every few steps from the average time per step so far (which
includes every evaluation and save made), keeping back the time of one more evaluation and save for the end
of training; each revision moves the schedule's end by a few steps, so the learning rate changes smoothly.
The latest decision is written to the checkpoints folder: a resumed run keeps it (its remaining steps are
not re-timed), and every process of a multi-process run uses the slowest process's timing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.core.files import write_json_atomic

log = logging.getLogger("finetune")

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def warmup_length(ratio: float, steps: int) -> int:
    """Warm-up steps for `ratio` of `steps`, rounded down (finetune.train.stage.warmup_steps says why)."""
    return int(math.floor(ratio * steps + 1e-9))


def schedule_factor(name: str, step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier of transformers' schedule `name` at `step` of `total` (warm-up linear)."""
    if name == "constant":  # no warm-up, as in transformers
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TimeBudget(TrainerCallback):
    """Stop after the steps that fit in `minutes`: decided on steps [skip, skip + timed), revised every `every`
    steps from the average so far (evaluations and saves included); the schedule fitted to each decision."""

    def __init__(self, minutes: float, schedule: str, warmup_ratio: float, record: Path,
                 skip: int = 1, timed: int = 4, every: int = 5) -> None:
        self.seconds = minutes * 60.0
        self.schedule, self.warmup_ratio, self.record = schedule, warmup_ratio, record
        self.skip, self.timed, self.every = skip, timed, every
        self.steps: int | None = None  # decided
        self.resumed = False  # a resumed run keeps the decision it finds
        self.upper = 0  # what epochs / max_steps allow
        self.t_first: float | None = None
        self.started = 0.0
        self.mark = 0.0  # end of the last step, evaluation or save: the trainer evaluates, then saves
        self.logged: int | None = None
        self.eval_seconds = self.save_seconds = 0.0  # the latest of each: kept back for the end of training
        self.first: dict | None = None  # the first decision, for the record

    def warmup(self, total: int) -> int:
        return warmup_length(self.warmup_ratio, total)

    def factor(self, step: int) -> float:
        total = self.steps or self.upper
        return schedule_factor(self.schedule, step, self.warmup(total), total)

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.upper, self.started = state.max_steps, time.time()
        if self.record.is_file():  # a resumed run keeps its decision
            self.steps, self.resumed = int(json.loads(self.record.read_text())["steps"]), True
            state.max_steps = min(self.steps, self.upper)
            log.info("time budget: %d steps, as decided before the resume (%s)", self.steps, self.record)
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it in several processes
        if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = [self.factor for _ in scheduler.lr_lambdas]

    def on_evaluate(self, args, state, control, **kwargs):
        now = time.time()
        self.eval_seconds, self.mark = now - self.mark, now

    def on_save(self, args, state, control, **kwargs):
        now = time.time()
        self.save_seconds, self.mark = now - self.mark, now

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.mark = now = time.time()
        step = state.global_step
        if self.resumed:
            return
        if step == self.skip:  # the first step pays for warm-up allocations: not timed
            self.t_first = now
            return
        if self.t_first is None or step < self.skip + self.timed:
            return
        if self.steps is not None and step >= self.steps:  # the decided last step is final: transformers'
            return  # DefaultFlowCallback, which runs first, has already stopped training on it
        if self.steps is not None and (step - self.skip - self.timed) % self.every:
            return
        per_step = _slowest((now - self.t_first) / (step - self.skip))
        left = self.seconds - (now - self.started) - self.eval_seconds - self.save_seconds
        steps = max(step, min(self.upper, step + int(left / per_step)))
        if steps == self.steps:
            return
        before, self.steps = self.steps, steps
        state.max_steps = steps
        if step >= steps:  # the trainer checked max_steps before this callback ran
            control.should_training_stop = True
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if scheduler is not None and optimizer is not None:  # the next step's rate, on the fitted schedule
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * self.factor(scheduler.last_epoch)
        decision = {"steps": steps, "seconds_per_step": round(per_step, 3), "budget_minutes": self.seconds / 60,
                    "steps_allowed_by_epochs": self.upper, "warmup_steps": self.warmup(steps),
                    "decided_at_step": step, "kept_back_seconds": round(self.eval_seconds + self.save_seconds, 1)}
        self.first = self.first or decision
        if not state.is_world_process_zero:
            return
        write_json_atomic(self.record, {**decision, "first_decision": self.first})
        if before is None:
            log.info("time budget %.1f min: %.2f s/step -> %d steps (epochs allow %d), schedule fitted to them",
                     self.seconds / 60, per_step, steps, self.upper)
        elif abs(steps - self.logged) >= max(2, 0.05 * steps) or step >= steps:  # not every small revision
            log.info("time budget: %.2f s/step so far (evaluations and saves included) -> %d steps instead of %d",
                     per_step, steps, self.logged)
        else:
            return
        self.logged = steps


def _slowest(seconds: float) -> float:
    """The largest per-step time over all processes (they must agree on the step count)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())
