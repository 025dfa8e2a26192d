"""Seconds per training step of our trainer, two settings against each other, one process per run, alternating.

    .venv/bin/python scripts/bench_steps.py --before 'method.share_prefix=false' [--pairs 3] [--steps 12] [overrides...]
    .venv/bin/python scripts/bench_steps.py --before 'keep_memory=false'        # glibc's malloc left as it is
    .venv/bin/python scripts/bench_steps.py --before 'dense_lm_head=false'      # TRL's vocabulary tiles on a CPU
    .venv/bin/python scripts/bench_steps.py --before 'bf16_copies=false'        # frozen weights cast every step

Each run is a fresh process that does what `python -m finetune` does before training (finetune/core/memory.py
at start-up, unless `keep_memory=false` is among its overrides), prepares the task's data and builds the
trainer with finetune.train.build_trainer, then trains `--steps` real optimizer steps (no evaluation, no
checkpoint) and reports the mean seconds of steps 3..N (step 1 pays one-time costs), the minor page faults
per step and the rows' tokens. Runs alternate (ours, before, ours, before, ...) so that a machine whose speed
drifts over minutes (a VM) moves both arms alike; the ratio of the arms' medians is printed.

Utilisation: step 2 of each run is also counted by torch's FlopCounterMode (every matrix product
autograd and the attention actually computed, forward and backward: a shared opening once per batch, frozen
layers without their weight gradients; the counting makes that step slow, and it is not timed). Each run measures
its matrix-product peak in the precision it trains in (the best 2048^3 torch.mm, scripts/_bench.py) right after
its timed steps, in the same process and burst of the machine's speed, and prints
    utilisation = FLOPs of a step / mean seconds of steps 3..N / that peak,
with a step's FLOPs = step 2's per computed token x the timed steps' mean computed tokens (rows differ in length).

Why not scripts/bench_train.py: it runs both trainers as threads of one process, which on a 2-core CPU made
every step ~2x slower than the same trainer alone (and the slowdown grew round by round); step-time ratios
of a few tens of percent drown in that. Both arms here use the same rows in the same order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

CHILD = "--child"


def child(steps: int, overrides: list[str]) -> None:
    """One arm's run: print a JSON line with its step times."""
    import resource

    keep = "keep_memory=false" not in overrides
    if "dense_lm_head=false" in overrides:
        import finetune.train.trl_hooks

        finetune.train.trl_hooks.DENSE_MAX_ELEMENTS = 0  # every projection through TRL's ChunkedLogProbFunction
    if "bf16_copies=false" in overrides:
        import finetune.train.stage

        finetune.train.stage.keep_bf16_copies = lambda model: 0  # autocast casts frozen weights on every step
    overrides = [o for o in overrides if not o.startswith(("keep_memory=", "dense_lm_head=", "bf16_copies="))]
    if keep:
        from finetune.core.memory import keep_freed_memory

        keep_freed_memory()
    from transformers import TrainerCallback

    from finetune.core.config import compose
    from finetune.core.rundir import RunDir
    from finetune.data.prepare import prepare
    from finetune.pipeline import quiet_progress_bars
    from finetune.train.stage import build_trainer

    quiet_progress_bars()
    root = Path(tempfile.mkdtemp(prefix="bench_steps_"))
    cfg = compose([f"run_dir={root}", f"method.max_steps={steps}", "method.eval_steps=0", "method.save_steps=100000",
                   "method.logging_steps=100000", "method.metric_examples=0", "tracking=none", *overrides])
    run = RunDir(root)
    prepare(cfg, run)
    trainer, info = build_trainer(cfg, run)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.faults, self.start, self.start_faults = [], [], 0.0, 0
            self.tokens: list[int] = []  # computed tokens of each optimizer step
            self.running = 0  # of the step running: every micro-batch's (training_step below)

        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.start_faults, self.running = time.perf_counter(), faults(), 0

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            self.faults.append(faults() - self.start_faults)
            self.tokens.append(self.running)

    class Counter(TrainerCallback):
        """FLOPs of step 2 (state.global_step == 1 when it begins), not a timed step."""

        def __init__(self):
            self.mode, self.flops = None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                from torch.utils.flop_counter import FlopCounterMode

                self.mode = FlopCounterMode(display=False)
                self.mode.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.flops, self.mode = self.mode.get_total_flops(), None

    clock, counter = Clock(), Counter()
    trainer.add_callback(counter)
    trainer.add_callback(clock)
    inner = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        clock.running += int(inputs["input_ids"].numel())
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    try:
        trainer.train()
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the last step's checkpoint: ~1.6 GB at 135M, per run
    timed = clock.seconds[2:] or clock.seconds
    mean_s = statistics.mean(timed)
    tokens = clock.tokens
    timed_tokens = statistics.mean(tokens[2:] or tokens)
    # step 2's FLOPs per computed token, times the timed steps' mean tokens (their rows differ in length)
    gflop = counter.flops / 1e9 / tokens[1] * timed_tokens if counter.flops and len(tokens) > 1 else 0.0
    peak = _bench.gemm_peak()["bf16" if info["precision"] == "bf16" else "fp32"]
    print(json.dumps({"mean_s": mean_s, "steps_s": [round(s, 3) for s in clock.seconds],
                      "gflop_per_step": round(gflop, 1), "gemm_peak_gflop_s": peak,
                      "utilisation": round(gflop / mean_s / peak, 3) if peak and gflop else None,
                      "faults_per_step": round(statistics.mean(clock.faults[2:] or clock.faults)),
                      "computed_tokens_per_step": round(timed_tokens, 1),
                      "precision": info["precision"]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(int(sys.argv[2]), sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, metavar="OVERRIDES", help="added to the overrides for the other arm")
    p.add_argument("--pairs", type=int, default=3, help="runs of each arm (alternating)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (steps 3..N are timed)")
    p.add_argument("overrides", nargs="*", help="finetune overrides for both arms (default: the plain default)")
    a = p.parse_args()
    arms = {"ours": a.overrides, "before": [*a.overrides, *a.before.split()]}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for i in range(a.pairs):
        for name in (("ours", "before") if i % 2 == 0 else ("before", "ours")):
            proc = subprocess.run([sys.executable, __file__, CHILD, str(a.steps), *arms[name]], capture_output=True,
                                  text=True, cwd=_bench.ROOT)
            if proc.returncode:
                sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"pair {i + 1}/{a.pairs} {name:6s} {result['mean_s']:.3f} s/step | {result['faults_per_step']:7d} "
                  f"faults/step | {result['computed_tokens_per_step']:.0f} computed tokens/step | "
                  f"{result['gflop_per_step']} GFLOP/step, {result['precision']} peak {result['gemm_peak_gflop_s']} "
                  f"GFLOP/s, utilisation {result['utilisation']}", flush=True)
    summary = {name: {"median_s": round(statistics.median(r["mean_s"] for r in runs), 3),
                      "runs_s": [round(r["mean_s"], 3) for r in runs],
                      "faults_per_step": round(statistics.median(r["faults_per_step"] for r in runs)),
                      "computed_tokens_per_step": runs[0]["computed_tokens_per_step"],
                      "gflop_per_step": runs[0]["gflop_per_step"],
                      "utilisation_median": statistics.median(r["utilisation"] or 0.0 for r in runs),
                      "precision": runs[0]["precision"]} for name, runs in results.items()}
    ratio = summary["before"]["median_s"] / summary["ours"]["median_s"]
    print(f"\nbefore/ours seconds per step: {ratio:.2f}x  (ours {summary['ours']['median_s']} s, before "
          f"{summary['before']['median_s']} s, medians of {a.pairs} runs each)")
    print("JSON " + json.dumps({"machine": _bench.machine(), "before_overrides": a.before, "overrides": a.overrides,
                                "steps": a.steps, "pairs": a.pairs, "ratio_before_over_ours": round(ratio, 3),
                                "arms": summary}))


if __name__ == "__main__":
    main()
