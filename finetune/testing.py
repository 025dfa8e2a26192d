"""Compose the real config the way `python -m finetune` does, for tests and scripts."""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from finetune.config import CONF_DIR, register_configs


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)
