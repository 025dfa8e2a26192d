"""`python -m finetune [overrides]`: compose the config with Hydra, hand it to the pipeline.

The only place that turns the library's typed errors (finetune.core.errors) into a message on stderr
and an exit code.
"""

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


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from finetune.pipeline import run_pipeline

    try:
        run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FinetuneError as exc:
        # Raised inside Hydra's task function: SystemExit passes through Hydra's error handler untouched.
        sys.exit(report(exc))


if __name__ == "__main__":
    main()
