"""finetune.core.memory: freed blocks stay in the process, so reusing them takes no page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainutil import ROOT

# 10 rounds of allocating, touching and freeing a 64 MiB tensor (above glibc's default 32 MiB mmap ceiling,
# so by default every round is a fresh mmap: 16,384 faults of 4 KiB pages), counting minor page faults after
# 10 rounds of warm-up.
PROBE = """
import json, resource, sys
import torch
threshold = None
if sys.argv[1] == "keep":
    from finetune.core.memory import keep_freed_memory
    threshold = keep_freed_memory()
for _ in range(10):  # warm up (the heap grows over the first rounds: 4-6 of them faulted, measured)
    torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20).sum()
print(json.dumps({"threshold": threshold, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = probe("default"), probe("keep")
    if kept["threshold"] < (64 << 20):
        pytest.skip(f"this C library keeps blocks up to {kept['threshold']} bytes only")
    assert default["faults"] > 10 * 16_000 * 0.8  # every round faults its 64 MiB in again
    assert kept["faults"] < default["faults"] / 3  # measured: 0, once one round (16,384)
