"""`python -m finetune [overrides]`: compose the config with Hydra, hand it to the pipeline."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import CONF_DIR, register_configs

register_configs()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from finetune.pipeline import run_pipeline

    run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
