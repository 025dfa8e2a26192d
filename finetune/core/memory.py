"""Keep freed memory in the process: glibc's malloc otherwise hands every large freed block back to the kernel.

glibc serves a block above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with its own mmap
and unmaps it on free, and trims the heap's free top above its trim threshold. torch's CPU allocator goes
through malloc, so the activations of every training step (a few MB each, ~1 GB a step at batch 4) were
fresh pages: SmolLM2-135M full fine-tuning on 2 cores took ~190,000 minor page faults per step. With the
thresholds raised once at start-up, ~10,000, and steps ~10% faster (docs/training.md has the figures). In a VM
a page fault can cost more when the host is busy, so fewer faults also make steps steadier.
This is glibc's documented mallopt(3) knob, the in-process form of MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ (which take effect only when set before the process starts); where the C library is not
glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("finetune")

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and go back to it; glibc refuses values above its maximum in some
# versions (32 MiB on 64-bit), so that is the fallback. Measured faults per step: 32 MiB ~50,000, 1 GiB ~10,000.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it is returned

_done: int | None = None


def keep_freed_memory() -> int:
    """Raise glibc's mmap and trim thresholds for this process (once); returns the mmap threshold set, 0 where
    nothing was changed."""
    global _done
    if _done is not None:
        return _done
    _done = 0
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (musl)
        return 0
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = next((t for t in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, t) == 1), 0)
    if threshold:
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        log.debug("malloc keeps freed blocks up to %d MiB in the process", threshold >> 20)
    _done = threshold
    return threshold
