"""Child processes that end with their parent: a converter or quantizer left running after the run was
killed would keep writing into the run directory. And the two things every server we start needs: a free port,
and a wait until it answers."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server we start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, seconds: float) -> None:
    """Return once `url` answers; raise if `proc`, the server writing `log_path`, exits first (with the end of
    that log), or when `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered ({log_path}): "
                               f"{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s ({log_path})")
