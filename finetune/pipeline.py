"""The stages in order, the run directory, skipping finished stages and continuing runs.

Each stage is a plain function `fn(cfg, run) -> dict` that reads its inputs from the run
directory and writes its outputs there. When it returns, a marker `stages/<name>.json`
records its summary; a re-run of the same run directory skips marked stages (unless
`force=true`), so a crash or Ctrl-C loses only the stage in flight, and training itself
resumes from its last checkpoint.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from finetune.config import STAGE_ORDER
from finetune.data_sources import DataError

log = logging.getLogger("finetune")

# stage -> "module:function"; imported lazily so `--cfg job` and the tests stay fast.
STAGES = {
    "data": "finetune.data:prepare",
    "train": "finetune.train:train",
    "merge": "finetune.export.merge:merge",
    "gptq": "finetune.export.gptq:quantize",
    "gguf": "finetune.export.gguf:export_gguf",
    "ollama": "finetune.export.ollama:write_modelfiles",
    "evaluate": "finetune.evaluate:evaluate",
}
# What each stage reads that an earlier stage writes.
REQUIRES = {
    "train": ["data"],
    "merge": ["train"],
    "gptq": ["merge"],
    "gguf": ["merge"],
    "ollama": ["gguf"],
    "evaluate": ["data"],
}
# Evaluation describes the run directory as it is now, so it never counts as "done".
ALWAYS_RERUN = {"evaluate"}


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory. Every stage reads and writes through these."""

    root: Path

    @property
    def data_dir(self) -> Path:  # train/validation/test.jsonl + validation_report.json
        return self.root / "data"

    @property
    def checkpoints_dir(self) -> Path:  # trainer checkpoints (resume)
        return self.root / "checkpoints"

    @property
    def adapter_dir(self) -> Path:  # final LoRA adapter (or full model for method=full)
        return self.root / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gptq_dir(self) -> Path:
        return self.root / "gptq"

    @property
    def gguf_dir(self) -> Path:  # *.gguf + Modelfile.*
        return self.root / "gguf"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_marker(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self.stage_marker(stage).is_file()

    def stage_summary(self, stage: str) -> dict:
        return json.loads(self.stage_marker(stage).read_text())

    def mark_done(self, stage: str, summary: dict) -> None:
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stage_marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(self.stage_marker(stage))

    def clear(self, stage: str) -> None:
        self.stage_marker(stage).unlink(missing_ok=True)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def stage_function(stage: str) -> Callable[[DictConfig, RunDir], dict]:
    module, fn = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), fn)


def selected_stages(cfg: DictConfig) -> list[str]:
    chosen = {str(getattr(s, "value", s)) for s in cfg.stages}
    return [s for s in STAGE_ORDER if s in chosen]


def check_run_identity(cfg: DictConfig, run: RunDir) -> None:
    """A run directory belongs to one model and one task: continuing it with another is an error."""
    identity = {"model": cfg.model.name, "task": cfg.task.name, "method": str(cfg.method.name.value)}
    path = run.root / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in identity.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise SystemExit(
                f"error: run directory {run.root} was made for a different run ({what}).\n"
                f"Use a new run_dir, or the original model/task/method to continue this one."
            )
    elif is_main_process():
        run.root.mkdir(parents=True, exist_ok=True)
        identity["command"] = "python -m finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        path.write_text(json.dumps(identity, indent=2))


def wait_for(run: RunDir, stage: str, timeout_s: float = 3600) -> None:
    """Non-main ranks wait for rank 0 to finish a stage that only rank 0 runs."""
    start = time.time()
    while not run.is_done(stage):
        if time.time() - start > timeout_s:
            raise TimeoutError(f"rank {rank()}: rank 0 did not finish stage {stage!r} in {timeout_s:.0f}s")
        time.sleep(1)


def quiet_progress_bars() -> None:
    """Per-item progress bars (weights loading, dataset mapping) flood logs and CI output; the stages
    log their own progress. Kept when a person watches a terminal."""
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run_pipeline(cfg: DictConfig, root: Path) -> RunDir:
    run = RunDir(root)
    quiet_progress_bars()
    stages = selected_stages(cfg)
    if world_size() > 1 and "run_dir=" not in " ".join(sys.argv):
        raise SystemExit(
            "error: with several processes every rank composes the config and must agree on the run "
            "directory: pass run_dir=outputs/NAME explicitly."
        )
    check_run_identity(cfg, run)
    if is_main_process():
        OmegaConf.save(cfg, run.root / "config.yaml", resolve=True)
        log.info("run directory: %s", run.root)
        log.info("stages: %s", ", ".join(stages))

    for stage in stages:
        missing = [r for r in REQUIRES.get(stage, []) if not run.is_done(r) and r not in stages]
        if missing:
            raise SystemExit(
                f"error: stage {stage!r} needs stage(s) {missing} first, and {run.root} has not run them. "
                f"Add them to stages=[...] or point run_dir at a run that has."
            )
        if run.is_done(stage) and not cfg.force and stage not in ALWAYS_RERUN:
            log.info("[%s] already done in %s, skipping (force=true re-runs it)", stage, run.root)
            continue
        # Only training runs on every rank; data preparation, export and evaluation run once.
        if stage != "train" and not is_main_process():
            if stage == "data":
                wait_for(run, "data")
            continue
        run.clear(stage)
        log.info("[%s] starting", stage)
        start = time.time()
        try:
            summary = stage_function(stage)(cfg, run) or {}
        except DataError as exc:  # unusable input: the message names the file and row
            raise SystemExit(f"error: [{stage}] {exc}") from None
        summary["seconds"] = round(time.time() - start, 1)
        if is_main_process():
            run.mark_done(stage, summary)
        log.info("[%s] done in %.1fs", stage, summary["seconds"])
        if stage == "train" and not is_main_process():
            return run  # other ranks are finished once the adapter is saved
    if is_main_process():
        log.info("finished: %s", run.root)
    return run
