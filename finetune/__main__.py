"""`python -m finetune [overrides]`: compose the config with Hydra, hand it to the pipeline.

The only place that turns the library's typed errors (finetune.core.errors) into a message on stderr
and an exit code.
"""

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.core.config import CONF_DIR, register_configs
from finetune.core.errors import FinetuneError

register_configs()


def report(exc: FinetuneError) -> int:
    """One paragraph on stderr for a typed error; returns its exit code."""
    where = f"[{exc.stage}] " if getattr(exc, "stage", None) else ""
    print(f"error: {where}{exc}", file=sys.stderr)
    return exc.exit_code


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` and staged write cleans up."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


INTERRUPTED = ("the stage in flight was not marked done and its unfinished files were removed; run the same "
               "command again (with run_dir=...) to continue: finished stages are reused, training resumes from "
               "its last checkpoint")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from finetune.pipeline import run_pipeline

    signal.signal(signal.SIGTERM, _on_sigterm)
    # Raised inside Hydra's task function: SystemExit passes through Hydra's error handler untouched.
    try:
        run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FinetuneError as exc:
        sys.exit(report(exc))
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C): {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"terminated (SIGTERM): {INTERRUPTED}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    main()
