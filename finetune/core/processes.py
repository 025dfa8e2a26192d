"""Child processes that end with their parent: a converter or quantizer left running after the run was
killed would keep writing into the run directory."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: between fork and exec the child only makes this one call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the child when its parent dies, however the parent dies
    (Linux; elsewhere nothing happens)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def run_child(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run for our children: output captured as text, killed on Ctrl-C or any error of ours
    (subprocess.run does that), and by the kernel if we are killed."""
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent, **kwargs)
