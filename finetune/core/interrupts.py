"""Ctrl-C and SIGTERM that no library can swallow.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. Some
libraries catch BaseException around their own work: importing GPTQModel (which PEFT does the first
time it inspects LoRA layers) swallows a Ctrl-C that lands during its ~7 s import, and the stage then
runs to the end and is marked done as if nobody had asked it to stop. The handler below remembers
the signal as well as raising it, and `check()` raises it again at the points where work becomes
permanent (a staged directory renamed into place, a stage marked done), so an interrupt is never lost:
at worst it takes effect at the next of those points, and the stage in flight is still not marked done.
"""

from __future__ import annotations

import signal


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` and staged write cleans up."""


_received: int | None = None


def _raise(signum: int) -> None:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum: int, frame: object) -> None:
    global _received
    _received = signum
    _raise(signum)


def install() -> None:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated, both remembered for `check()`. Main thread only."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def check() -> None:
    """Raise the interrupt received earlier, if any (its first exception may have been caught by a library)."""
    if _received is not None:
        _raise(_received)
