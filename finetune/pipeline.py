"""The stages in order, and the loop that runs them over a run directory.

Each stage is a plain function `fn(cfg, run) -> dict` that reads its inputs from the run directory and
writes its outputs there. When it returns, a marker `stages/<name>.json` records its summary; a re-run
of the same run directory skips marked stages (unless `force=true`), so a crash or Ctrl-C loses only
the stage in flight, and training itself resumes from its last checkpoint.

STAGES is the one table of stages: adding an export format is one module plus one row here.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from finetune.core.config import Config, to_typed
from finetune.core.distributed import is_main_process, rank, world_size
from finetune.core.errors import ConfigError, FinetuneError, RunDirError
from finetune.core.files import write_json_atomic
from finetune.core.rundir import RunDir
from finetune.data.prepare import prepare
from finetune.evaluate.stage import evaluate
from finetune.export.gguf import export_gguf
from finetune.export.gptq import quantize
from finetune.export.merge import merge
from finetune.export.ollama.modelfile import write_modelfiles
from finetune.models.families import family
from finetune.tasks import get_task
from finetune.train.stage import train

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Config, RunDir], dict]
    requires: list[str] = field(default_factory=list)  # stages whose outputs it reads
    all_ranks: bool = False  # runs in every process (training); the others run on rank 0 only
    always_rerun: bool = False  # describes the run directory as it is now, so never "done"


STAGES: list[Stage] = [
    Stage("data", prepare),
    Stage("train", train, requires=["data"], all_ranks=True),
    Stage("merge", merge, requires=["train"]),
    Stage("gptq", quantize, requires=["merge"]),
    Stage("gguf", export_gguf, requires=["merge"]),
    Stage("ollama", write_modelfiles, requires=["gguf"]),
    Stage("evaluate", evaluate, requires=["data"], always_rerun=True),
]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def selected_stages(cfg: Config) -> list[Stage]:
    """The stages `cfg.stages` names, in table order ("all": every stage); ConfigError for an unknown name."""
    chosen = [str(s) for s in cfg.stages]
    unknown = [s for s in chosen if s not in stage_names() and s != "all"]
    if unknown:
        raise ConfigError(f"stages={chosen}: unknown stage(s) {unknown}; valid: {', '.join(stage_names())} "
                          f"(or all)")
    return [s for s in STAGES if "all" in chosen or s.name in chosen]


def check_config(cfg: Config) -> None:
    """Names owned by other layers, checked before any stage runs."""
    family(cfg.model.family)
    get_task(cfg.task)


def check_run_identity(cfg: Config, run: RunDir) -> None:
    """A run directory belongs to one model and one task: continuing it with another is an error."""
    identity = {"model": cfg.model.name, "task": cfg.task.name, "method": str(cfg.method.name)}
    path = run.run_json
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in identity.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise RunDirError(
                f"run directory {run.root} was made for a different run ({what}).\n"
                f"Use a new run_dir, or the original model/task/method to continue this one."
            )
    elif is_main_process():
        run.root.mkdir(parents=True, exist_ok=True)
        identity["command"] = "python -m finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_json_atomic(path, identity)


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


def run_pipeline(composed: DictConfig | Config, root: Path) -> RunDir:
    """Run the selected stages of the composed config in the run directory `root`."""
    cfg = composed if isinstance(composed, Config) else to_typed(composed)
    run = RunDir(root)
    stages = selected_stages(cfg)
    check_config(cfg)
    quiet_progress_bars()
    if world_size() > 1 and "run_dir=" not in " ".join(sys.argv):
        raise ConfigError(
            "with several processes every rank composes the config and must agree on the run "
            "directory: pass run_dir=outputs/NAME explicitly."
        )
    check_run_identity(cfg, run)
    if is_main_process():
        OmegaConf.save(OmegaConf.structured(cfg), run.config_path, resolve=True)
        log.info("run directory: %s", run.root)
        log.info("stages: %s", ", ".join(s.name for s in stages))

    names = [s.name for s in stages]
    for stage in stages:
        missing = [r for r in stage.requires if not run.is_done(r) and r not in names]
        if missing:
            raise RunDirError(
                f"stage {stage.name!r} needs stage(s) {missing} first, and {run.root} has not run them. "
                f"Add them to stages=[...] or point run_dir at a run that has."
            )
        if run.is_done(stage.name) and not cfg.force and not stage.always_rerun:
            log.info("[%s] already done in %s, skipping (force=true re-runs it)", stage.name, run.root)
            continue
        if not stage.all_ranks and not is_main_process():
            if stage.name == "data":  # training on this rank reads the data rank 0 writes
                wait_for(run, "data")
            continue
        run.clear(stage.name)
        log.info("[%s] starting", stage.name)
        start = time.time()
        try:
            summary = stage.fn(cfg, run) or {}
        except FinetuneError as exc:
            exc.stage = stage.name  # __main__ names the stage in its message
            raise
        summary["seconds"] = round(time.time() - start, 1)
        if is_main_process():
            run.mark_done(stage.name, summary)
        log.info("[%s] done in %.1fs", stage.name, summary["seconds"])
        if stage.all_ranks and not is_main_process():
            return run  # other ranks are finished once the adapter is saved
    if is_main_process():
        log.info("finished: %s", run.root)
    return run
