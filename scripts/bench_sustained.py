"""Does this machine keep its speed under sustained load? A fixed matrix workload for --seconds, its rate per window.

    .venv/bin/python scripts/bench_sustained.py [--seconds 330] [--window 15] [--dtype auto|bf16|fp32]

The work never changes (the same tensors, shapes of one decoder MLP on a training step's 346 tokens: SmolLM2-135M's
576 -> 1536 -> 576, plus a weight-gradient product), so any drift in its rate is the machine's: clock, turbo budget,
a VM's neighbours; not the training state, the allocator or the data. Printed per window: iterations per second
and the ratio against the first window; last line: `JSON {...}` (as every scripts/bench_*.py prints it) with the
machine and every window. Run it on a quiet machine (nothing else heavy): the budgeted training of
`python -m finetune` revises its step count from the seconds per step it sees, so a machine that slows after a
minute or two trains fewer steps than its first steps promised.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=330.0)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 where the CPU computes it natively (as training does), else fp32")
    a = p.parse_args()
    if not 0 < 2 * a.window <= a.seconds:
        p.error(f"--seconds {a.seconds:g} must hold at least two windows of --window {a.window:g} s")

    import torch

    from finetune.core.hardware import cpu_supports_bf16

    dtype_name = a.dtype if a.dtype != "auto" else ("bf16" if cpu_supports_bf16() else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(346, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)
    dy = torch.randn(346, 1536, dtype=dtype)
    flop_per_iter = 2 * 346 * 576 * 1536 * 3  # x w^T, (x w^T) w, dy^T x

    def one() -> None:
        h = x @ w.T
        h @ w
        torch.nn.functional.silu(h.float()).to(dtype)
        dy.T @ x

    for _ in range(20):  # warm-up: oneDNN kernels chosen, memory touched
        one()
    windows = []
    start = last = time.perf_counter()
    count = 0
    threads = torch.get_num_threads()
    print(f"{'seconds':>8} {'iter/s':>8} {'GFLOP/s':>8} {'vs first':>8}   ({dtype_name}, {threads} threads)")
    while last - start < a.seconds:
        for _ in range(10):
            one()
        count += 10
        now = time.perf_counter()
        if now - last >= a.window:
            rate = count / (now - last)
            windows.append({"end_s": round(now - start, 1), "iter_per_s": round(rate, 1),
                            "gflops": round(rate * flop_per_iter / 1e9, 1)})
            ratio = rate / windows[0]["iter_per_s"]
            print(f"{now - start:8.0f} {rate:8.1f} {windows[-1]['gflops']:8.1f} {ratio:8.2f}", flush=True)
            last, count = now, 0
    rates = [w["iter_per_s"] for w in windows]
    half = len(rates) // 2
    summary = {"first_window": rates[0], "min_window": min(rates), "first_half_mean": sum(rates[:half]) / max(half, 1),
               "second_half_mean": sum(rates[half:]) / max(len(rates) - half, 1)}
    summary["second_half_vs_first_half"] = round(summary["second_half_mean"] / summary["first_half_mean"], 3)
    print(f"second half / first half: {summary['second_half_vs_first_half']:.2f}x; "
          f"slowest window / first: {min(rates) / rates[0]:.2f}x")
    _bench.emit({"machine": _bench.machine(), "dtype": dtype_name, "summary": summary, "windows": windows})


if __name__ == "__main__":
    main()
