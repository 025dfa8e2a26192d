"""Which process this is when `torchrun` / `accelerate launch` starts several (read from the environment
they set), and whether the model is sharded (FSDP, DeepSpeed ZeRO-3)."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def sharded() -> bool:
    """FSDP or DeepSpeed ZeRO-3 (set by `accelerate launch`): the model must not be placed with a device_map."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
