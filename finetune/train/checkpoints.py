"""Checkpoints and the final adapter in the run directory.

Training checkpoints live in run.checkpoints_dir (the Trainer writes them; trainer_state.json last).
`resume=true` continues from the newest complete one; a folder left half-written by a crash is removed.
The final adapter (or full model) is written to a temporary folder and renamed into run.adapter_dir,
so a crash never leaves a partial adapter where later stages would pick it up.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from finetune.core.config import Config, to_dict
from finetune.core.distributed import is_main_process
from finetune.core.files import write_json_atomic
from finetune.core.rundir import RunDir

log = logging.getLogger("finetune")

# Knobs whose change makes a checkpoint of this run the wrong starting point (a warning, not an error).
_RESUME_SENSITIVE = ["lora_r", "lora_alpha", "lora_dropout", "lr", "lr_scheduler", "batch_size", "grad_accum",
                     "max_length", "packing", "seed", "max_steps", "epochs", "precision"]


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (written last) is complete; a run killed while
    saving leaves a partial folder, which is removed so that resuming never starts from it."""
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        step = path.name.split("-")[-1]
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            if state.get("global_step") == int(step):
                found.append((int(step), path))
                continue
        except (OSError, ValueError):
            pass
        if is_main_process():
            log.warning("removing incomplete checkpoint %s (the run stopped while saving it)", path)
            shutil.rmtree(path, ignore_errors=True)
    return max(found)[1] if found else None


def resume_checkpoint(cfg: Config, run: RunDir) -> Path | None:
    """The checkpoint to continue from (resume=true), after checking the method did not change."""
    method_path = run.checkpoints_dir / "method.json"
    method_now = to_dict(cfg.method)
    if not cfg.resume:
        if run.checkpoints_dir.exists() and is_main_process():
            log.info("resume=false: removing old checkpoints in %s", run.checkpoints_dir)
            shutil.rmtree(run.checkpoints_dir)
        checkpoint = None
    else:
        checkpoint = last_complete_checkpoint(run.checkpoints_dir)
    if checkpoint is not None and method_path.is_file():
        before = json.loads(method_path.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {method_now.get(k)!r}" for k in _RESUME_SENSITIVE
                   if before.get(k) != method_now.get(k)]
        if changed:
            log.warning("resuming %s with changed settings (%s): the optimizer and scheduler state come from the "
                        "checkpoint; use resume=false or a new run_dir to start over", checkpoint, "; ".join(changed))
    if is_main_process():
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(method_path, method_now)
    return checkpoint


def save_final(trainer: Any, run: RunDir) -> None:
    """Adapter (or full model) + tokenizer into a temporary folder, renamed into place when complete."""
    tmp, old = run.root / ".adapter.tmp", run.root / ".adapter.old"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank calls it (FSDP/ZeRO-3 gather); rank 0 writes
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(tmp))
        shutil.rmtree(old, ignore_errors=True)
        if run.adapter_dir.exists():
            run.adapter_dir.rename(old)
        tmp.rename(run.adapter_dir)
        shutil.rmtree(old, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
