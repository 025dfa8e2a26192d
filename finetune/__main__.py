"""`python -m finetune [overrides]`: compose the config with Hydra, hand it to the pipeline.

The only place that turns the library's typed errors (finetune.core.errors) into a message on stderr
and an exit code.

In a multirun (`-m`) each job is one run in hydra.sweep.dir/<job number>. For a sweeper that optimises
(it has a `direction`: `-m hydra/sweeper=finetune`, Optuna, see docs/training.md) the job returns the
objective, the validation task metric of the run (finetune.pipeline.objective). A job whose own values
failed it (TRIAL_FAILURES) prints its error and raises it to Hydra instead of exiting: the Optuna
sweeper records the trial as failed and goes on while failures stay within hydra.sweeper.max_failure_rate,
Hydra's basic sweeper raises it once its batch of jobs has run. Any other error (config, data, model, run
directory) is shared by every job, so it ends the sweep at once with its exit code.
"""

import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.core import interrupts, memory
from finetune.core.config import CONF_DIR, register_configs
from finetune.core.errors import ExportError, FinetuneError, TrainingDiverged

register_configs()


# What a job's own values caused (a learning rate that diverges, a model that fails its export check): in a
# sweep such a job fails alone, the others go on.
TRIAL_FAILURES = (TrainingDiverged, ExportError)


def report(exc: FinetuneError) -> int:
    """One paragraph on stderr for a typed error; returns its exit code."""
    where = f"[{exc.stage}] " if getattr(exc, "stage", None) else ""
    print(f"error: {where}{exc}", file=sys.stderr)
    return exc.exit_code


INTERRUPTED = ("the stage in flight was not marked done and its unfinished files were removed; run the same "
               "command again (with run_dir=...) to continue: finished stages are reused, training resumes from "
               "its last checkpoint")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from finetune.core.config import to_typed
    from finetune.pipeline import objective, run_pipeline

    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    search = sweep and "direction" in hydra_cfg.sweeper
    # A job of a sweep records its own overrides, the command that reproduces it as a single run.
    command = "python -m finetune " + " ".join(map(shlex.quote, hydra_cfg.overrides.task)) if sweep else None
    interrupts.install()
    memory.keep_freed_memory()  # training steps reuse freed memory instead of faulting in fresh pages
    # Raised inside Hydra's task function: SystemExit passes through Hydra's error handler untouched.
    try:
        typed = to_typed(cfg)
        run = run_pipeline(typed, Path(hydra_cfg.runtime.output_dir), command=command, search=search)
        return objective(typed, run) if search else None
    except FinetuneError as exc:
        code = report(exc)
        if sweep and isinstance(exc, TRIAL_FAILURES):
            raise
        sys.exit(code)
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C): {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    except interrupts.Terminated:
        print(f"terminated (SIGTERM): {INTERRUPTED}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    main()
