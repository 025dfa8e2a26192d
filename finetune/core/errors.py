"""Typed errors of the library. Each message says what is wrong and what to do; `python -m finetune`
(finetune.__main__) alone turns them into one paragraph on stderr and an exit code.

    ConfigError        a config value or a combination of values is invalid (exit 2)
    DataError          the data cannot be used; the message names the file and row (exit 3)
    ModelUnavailable   the model cannot be loaded here (offline, not installed, bad path) (exit 4)
    TrainingDiverged   the loss or gradients stopped being finite; nothing was saved (exit 5)
    ExportError        an export step failed or an artifact did not pass its check (exit 6)
    RunDirError        the run directory cannot be used for this run (exit 7)
"""

from __future__ import annotations


class FinetuneError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class ConfigError(FinetuneError, ValueError):
    exit_code = 2


class DataError(FinetuneError, ValueError):
    exit_code = 3


class ModelUnavailable(FinetuneError):
    exit_code = 4


class TrainingDiverged(FinetuneError, RuntimeError):
    exit_code = 5


class ExportError(FinetuneError, RuntimeError):
    exit_code = 6


class RunDirError(FinetuneError):
    exit_code = 7
