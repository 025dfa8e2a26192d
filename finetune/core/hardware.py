"""What this machine offers: CPU threads and native bf16, and whether bf16 is the faster on it."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Any, Iterator


def cpu_threads() -> int:
    """CPU cores this process may run on: the default thread count of torch and llama.cpp here."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (avx512f, avx512_bf16, ...); empty where it has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 / AMX): bf16 autocast is about 2x faster than fp32 there
    and about 50x slower on CPUs without it (docs/training.md)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# The CPU's bf16 matmul is taken over fp32 only when it is clearly the faster (a margin for timing noise).
BF16_MIN_SPEEDUP = 1.1


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup() -> float:
    """fp32 seconds over bf16 seconds of one (512 x 1024) @ (1024 x 2048) matmul on this CPU at torch's
    thread count, best of 5 each after 2 warm-ups (~0.2 s in all, once per process): above 1 where bf16 is
    the faster. The flags do not say it: an AMD EPYC with AVX512-BF16 ran bf16 ~2x fp32 and a Xeon with AMX
    ~7x, but a Xeon with AVX512-BF16 whose AMX the VM hides ran it at 0.54-0.71x (oneDNN's avx512_core_bf16
    kernel against MKL's fp32 one; training steps 1.43x slower in bf16, docs/training.md)."""
    import torch

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(2048, 1024, dtype=dtype)
        for _ in range(2):
            torch.nn.functional.linear(a, b)
        seconds = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            seconds = min(seconds, time.perf_counter() - start)
        return seconds

    return best(torch.float32) / best(torch.bfloat16)


def cpu_bf16_faster() -> bool:
    """Whether bf16 autocast is the faster choice on this CPU: native bf16 (cpu_supports_bf16) and matmuls
    measured at least BF16_MIN_SPEEDUP times fp32's speed (bf16_matmul_speedup)."""
    return cpu_supports_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def if_cpu_bf16(native: Any, otherwise: Any) -> Any:
    """The config resolver ${if_cpu_bf16:A,B}: A where this CPU computes bf16 natively, else B: a default sized
    by time has to know that fp32 training steps are ~3x slower than bf16 ones (docs/training.md)."""
    return native if cpu_supports_bf16() else otherwise


def auto_device() -> str:
    """What the config's `device=auto` means: "cuda" where torch sees a CUDA device, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def if_cpu(on_cpu: Any, otherwise: Any, *, _root_: Any) -> Any:
    """The config resolver ${if_cpu:A,B}: A where the run trains on the CPU (`device=cpu`, or `auto` where torch
    sees no CUDA device), else B."""
    device = str(_root_.get("device", "auto"))
    return on_cpu if (auto_device() if device == "auto" else device) == "cpu" else otherwise


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch on n threads for a while (evaluate.n_threads): on a shared CPU, fewer threads than cores
    keeps OpenMP threads from spinning against other processes (5-10x slower generation, measured)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
