"""What this machine offers: CPU threads and native bf16."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def cpu_threads() -> int:
    """CPU cores this process may run on: the default thread count of torch and llama.cpp here."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 / AMX): bf16 autocast is about 2x faster than fp32 there
    and about 50x slower on CPUs without it (docs/training.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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
