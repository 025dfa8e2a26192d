"""Ctrl-C and SIGTERM that no library can swallow.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. Some
libraries catch BaseException around their own work: importing GPTQModel (which PEFT does the first
time it inspects LoRA layers) swallows a Ctrl-C that lands during its ~7 s import, and the stage then
runs to the end and is marked done as if nobody had asked it to stop. The handler below remembers
the signal as well as raising it, and `check()` raises it again at the points where work becomes
permanent (a staged directory renamed into place, a stage marked done), so an interrupt is never lost:
at worst it takes effect at the next of those points, and the stage in flight is still not marked done.

A signal that lands while a module is being imported waits for the import to end (it is delivered again
every 50 ms until then). An exception raised inside an import can go through a C extension's initialisation,
where it cannot pass: torch's first import calls into Python from pybind11 code that cannot carry an
exception, so a Ctrl-C there ended the process with SIGABRT (std::terminate) instead of exit code 130 and its
clean-up; elsewhere it leaves a half-initialised module behind. Imports take seconds at most.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` and staged write cleans up."""


_received: int | None = None
_redelivery: threading.Timer | None = None
REDELIVER_S = 0.05


def _raise(signum: int) -> None:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _importing(frame: FrameType | None) -> bool:
    """Whether the main thread is inside an import (importlib's frozen bootstrap frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _redeliver() -> None:
    if _received is not None:  # the latest signal: a SIGTERM after a Ctrl-C during the same import wins
        os.kill(os.getpid(), _received)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received, _redelivery
    _received = signum
    if _importing(frame):
        if _redelivery is None or not _redelivery.is_alive():
            _redelivery = threading.Timer(REDELIVER_S, _redeliver)
            _redelivery.daemon = True
            _redelivery.start()
        return
    _raise(signum)


def install() -> None:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated, both remembered for `check()`. Main thread only."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def check() -> None:
    """Raise the interrupt received earlier, if any (its first exception may have been caught by a library)."""
    if _received is not None:
        _raise(_received)
