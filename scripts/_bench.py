"""Small helpers shared by the scripts/bench_*.py benchmarks: machine facts, memory, tables, GEMM peak."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """What a number depends on: CPU, cores, threads, and the load average when it was taken."""
    import torch

    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
    except OSError:
        pass
    info = {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def gemm_peak(n: int | None = None, repeats: int = 5) -> dict:
    """Best-of-`repeats` GFLOP/s of an n^3 matrix product in fp32 and bf16 (torch, current thread count;
    n = 2048 on a CPU, 8192 on a GPU, where 2048^3 is too small to reach the peak)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (8192 if device == "cuda" else 2048)
    out = {}
    kinds = [("fp32", torch.float32)]
    # bf16 torch.mm once hung for minutes in an older venv (even 256^3, first call, loaded machine): measured by
    # default where the CPU computes bf16 natively (every default run there times a bf16 matmul too:
    # finetune.core.hardware.bf16_matmul_speedup), elsewhere with BENCH_BF16_PEAK=1.
    from finetune.core.hardware import cpu_supports_bf16

    if device == "cuda" or os.environ.get("BENCH_BF16_PEAK") == "1" or cpu_supports_bf16():
        kinds.append(("bf16", torch.bfloat16))
    else:
        out["bf16"] = None
    for name, dtype in kinds:
        # Probe with a small product first: bf16 torch.mm on this CPU was seen taking minutes for one
        # 2048^3 product (a slow path, not the oneDNN AVX512-BF16 kernel); then report None, not hang.
        small = torch.randn(256, 256, dtype=dtype, device=device)
        t = time.perf_counter()
        torch.mm(small, small)
        if time.perf_counter() - t > 0.5:
            out[name] = None
            continue
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = round(2 * n**3 / best / 1e9, 1)
    return out


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table for people; the JSON line is for machines."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def emit(result: dict) -> None:
    print("JSON " + json.dumps(result, default=str))
