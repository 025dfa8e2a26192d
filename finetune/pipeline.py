"""The stages in order, and the loop that runs them over a run directory.

Each stage is a plain function `fn(cfg, run) -> dict` that reads its inputs from the run directory and
writes its outputs there. When it returns, a marker `stages/<name>.json` records its summary; a re-run
of the same run directory skips marked stages (unless `force=true`), so a crash or Ctrl-C loses only
the stage in flight, and training itself resumes from its last checkpoint.

A marker is trusted only while what the stage read and wrote is unchanged: it records a fingerprint of
the config values the stage depends on, of the outputs of the stages it requires, of the files it read
from outside the run directory, and of its own outputs (content hashes). A stage whose fingerprint no
longer matches runs again, and running a stage clears the markers of every stage downstream of it.
A run directory is held by one process at a time (a lock), and a folder that is not a run directory
is never adopted.

STAGES is the one table of stages: adding an export format is one module plus one row here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from finetune.core.config import Config, metric_examples, model_config, to_dict, to_typed
from finetune.core.values import value_problems
from finetune.core.distributed import is_main_process, rank, world_size
from finetune.core.errors import ConfigError, DataError, FinetuneError, RunDirError
from finetune.core.files import write_json_atomic
from finetune.core.fingerprint import data_sha256, file_sha256, paths_sha256
from finetune.core.rundir import RunDir
from finetune.route.strong import strong_kind
from finetune.export.converter import gguf_config_problems
from finetune.models.families import family
from finetune.models.loading import check_available
from finetune.tasks import get_task

log = logging.getLogger("finetune")


def _none(cfg: Config, run: RunDir) -> list[Path]:
    return []


def _lazy(target: str) -> Callable[[Config, RunDir], dict]:
    """The stage function at "module:name", imported when the stage runs: a config error is reported
    without first importing training, export and evaluation (~8 s)."""
    module, name = target.split(":")
    return lambda cfg, run: getattr(importlib.import_module(module), name)(cfg, run)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Config, RunDir], dict]
    requires: list[str] = field(default_factory=list)  # stages whose outputs it reads
    config: list[str] = field(default_factory=list)  # config keys (dotted) whose values it depends on
    outputs: Callable[[Config, RunDir], list[Path]] = _none  # what it writes (fingerprinted)
    state: Callable[[Config, RunDir], list[Path]] = _none  # partial work kept for resuming it
    all_ranks: bool = False  # runs in every process (training); the others run on rank 0 only
    always_rerun: bool = False  # describes the run directory as it is now, so never "done"


STAGES: list[Stage] = [
    Stage("data", _lazy("finetune.data.prepare:prepare"),
          config=["task", "model.name", "model.family", "model.chat_template", "method.max_length"],
          outputs=lambda cfg, run: [run.data_dir]),
    Stage("train", _lazy("finetune.train.stage:train"), requires=["data"], config=["model", "method", "device"],
          outputs=lambda cfg, run: [run.adapter_dir], state=lambda cfg, run: [run.checkpoints_dir], all_ranks=True),
    Stage("merge", _lazy("finetune.export.merge:merge"), requires=["train"], config=["model", "export.merge"],
          outputs=lambda cfg, run: [run.merged_dir]),
    Stage("gptq", _lazy("finetune.export.gptq:quantize"), requires=["merge"], config=["export.gptq"],
          outputs=lambda cfg, run: [run.gptq_dir]),
    Stage("gguf", _lazy("finetune.export.gguf:export_gguf"), requires=["merge"],
          config=["export.gguf", "export.verify"],
          outputs=lambda cfg, run: run.gguf_files(cfg.model.name, cfg.task.name)),
    Stage("ollama", _lazy("finetune.export.ollama.modelfile:write_modelfiles"), requires=["gguf"],
          config=["export.ollama", "export.verify", "task.system_prompt", "task.prompt_template", "task.kind",
                  "task.fields", "task.json_schema", "task.labels"],
          outputs=lambda cfg, run: (sorted(run.gguf_dir.glob("Modelfile.*")) if run.gguf_dir.is_dir() else [])
          + [p for p in (run.answer_schema_path, run.answer_grammar_path) if p.is_file()]),
    Stage("evaluate", _lazy("finetune.evaluate.stage:evaluate"), requires=["data"], always_rerun=True),
    # Reads the models (train, gguf), not the evaluation: it answers its own validation and test rows.
    Stage("route", _lazy("finetune.route.stage:route"), requires=["data", "train"],
          config=["route", "evaluate", "export.gguf", "task"],
          outputs=lambda cfg, run: [run.router_path] if cfg.route.strong else []),
]
BY_NAME = {s.name: s for s in STAGES}


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


def check_config(cfg: Config, stages: list[Stage] | None = None) -> None:
    """Everything that can be checked before any stage runs: value ranges, names owned by other layers,
    the models it will load, and what the selected export stages need. ConfigError lists every problem."""
    names = {s.name for s in (stages if stages is not None else STAGES)}
    problems = value_problems(cfg)
    for check in (lambda: family(cfg.model.family), lambda: get_task(cfg.task)):
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    if "gguf" in names and cfg.export.gguf is not None:
        problems += gguf_config_problems(cfg.export.gguf)
    if "gptq" in names and cfg.export.gptq is not None and importlib.util.find_spec("gptqmodel") is None:
        problems.append("export.gptq needs GPTQModel, an optional extra: pip install 'finetune[gptq]' "
                        "(or export=default, which skips GPTQ)")
    if "ollama" in names and cfg.export.ollama is not None and cfg.export.verify and shutil.which("go") is None:
        problems.append("checking the Modelfile TEMPLATE needs Go (Debian: apt-get install golang-go), "
                        "or export.verify=false")
    models = [cfg.model] if names & {"data", "train", "merge", "evaluate"} else []
    strong = strong_kind(cfg.route.strong) if "route" in names and cfg.route.strong else None
    if strong == "registry":
        try:
            models.append(model_config(cfg.route.strong))
        except ConfigError as exc:
            problems.append(f"route.strong: {exc}")
    if strong == "gguf" and not Path(cfg.route.strong).is_file():
        problems.append(f"route.strong={cfg.route.strong}: no such GGUF file")
    if "evaluate" in names:
        for name in cfg.evaluate.compare:
            try:
                models.append(model_config(name))
            except ConfigError as exc:
                problems.append(f"evaluate.compare: {exc}")
    for model in models:
        try:
            check_available(model)
        except FinetuneError as exc:
            problems.append(f"{'evaluate.compare: ' if model is not cfg.model else ''}{exc}")
    if problems:
        raise ConfigError("invalid config, nothing was run:\n" + "\n".join(f"  - {p}" for p in problems))


# ---- fingerprints of finished stages ----------------------------------------------------------


def _config_values(cfg: Config, keys: list[str]) -> dict[str, Any]:
    tree = to_dict(cfg)
    values = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values


def inputs_fingerprint(stage: Stage, cfg: Config, run: RunDir) -> dict:
    """What the stage depends on, as it is now: its config values and the outputs of the stages it requires."""
    return {"config": data_sha256(_config_values(cfg, stage.config)),
            "upstream": {r: paths_sha256(BY_NAME[r].outputs(cfg, run), run.root) for r in stage.requires}}


def outputs_fingerprint(stage: Stage, cfg: Config, run: RunDir) -> str:
    return paths_sha256(stage.outputs(cfg, run), run.root)


def why_not_done(stage: Stage, cfg: Config, run: RunDir) -> str | None:
    """None while the stage's marker can be trusted; else what changed since it finished."""
    if not run.is_done(stage.name):
        return "not run yet"
    marker = run.stage_summary(stage.name)
    recorded = marker.get("fingerprint")
    if recorded is None:  # a marker written without one (an older version, or by hand): taken as it is
        return None
    now = inputs_fingerprint(stage, cfg, run)
    if now["config"] != recorded.get("config"):
        return f"its config ({', '.join(stage.config)}) changed"
    changed = [r for r, h in now["upstream"].items() if recorded.get("upstream", {}).get(r) != h]
    if changed:
        return f"the output of {', '.join(changed)} changed"
    for path, digest in recorded.get("input_files", {}).items():
        if not Path(path).is_file() or file_sha256(Path(path)) != digest:
            return f"its input {path} changed"
    if outputs_fingerprint(stage, cfg, run) != recorded.get("outputs"):
        return "its outputs were changed or removed"
    return None


def downstream(name: str) -> list[str]:
    """Every stage that reads, directly or not, what `name` writes."""
    found: list[str] = []
    for stage in STAGES:
        if any(r == name or r in found for r in stage.requires):
            found.append(stage.name)
    return found


def finish(stage: Stage, cfg: Config, run: RunDir, summary: dict, inputs: dict) -> None:
    input_files = {str(Path(p).resolve()): file_sha256(Path(p)) for p in summary.pop("input_files", [])
                   if Path(p).is_file()}
    summary["fingerprint"] = {**inputs, "input_files": input_files, "outputs": outputs_fingerprint(stage, cfg, run)}
    summary["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.mark_done(stage.name, summary)


def start(stage: Stage, cfg: Config, run: RunDir, inputs: dict) -> None:
    """Before a stage runs: its marker and every downstream marker go; partial work from a start with
    other inputs (checkpoints of another config or data) is removed, so it is never resumed."""
    for name in [stage.name, *downstream(stage.name)]:
        if run.is_done(name) and name != stage.name:
            log.info("[%s] invalidated: %s runs again", name, stage.name)
        run.clear(name)
    started = run.started_marker(stage.name)
    before = json.loads(started.read_text()) if started.is_file() else None
    state = [p for p in stage.state(cfg, run) if p.exists()]
    if state and before is not None and before != inputs:
        log.warning("[%s] removing %s: it was made from other inputs (config or upstream outputs changed)",
                    stage.name, ", ".join(str(p) for p in state))
        for path in state:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run.stages_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, inputs)


def check_run_identity(cfg: Config, run: RunDir, command: str | None = None) -> None:
    """A run directory belongs to one model and one task: continuing it with another is an error.
    `command`: what reproduces the run (default: this process's command line)."""
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
        identity["command"] = command or "python -m finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_json_atomic(path, identity)


def wait_for(run: RunDir, stage: str, timeout_s: float = 3600) -> None:
    """Non-main ranks wait for rank 0 to finish a stage that only rank 0 runs."""
    began = time.time()
    while not run.is_done(stage):
        if time.time() - began > timeout_s:
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


def run_pipeline(composed: DictConfig | Config, root: Path, command: str | None = None, search: bool = False) -> RunDir:
    """Run the selected stages of the composed config in the run directory `root`. `command`: what
    reproduces this run (a trial of a sweep: its own overrides); `search`: the run is a trial of a
    hyper-parameter search, which reads `objective(cfg, run)` afterwards."""
    cfg = composed if isinstance(composed, Config) else to_typed(composed)
    run = RunDir(root)
    stages = selected_stages(cfg)
    cfg.method.metric_examples = metric_examples(cfg.method, search)  # settled: the train stage's fingerprint
    if search:
        check_searchable(cfg, stages)
    if world_size() > 1 and "run_dir=" not in " ".join(sys.argv):
        raise ConfigError(
            "with several processes every rank composes the config and must agree on the run "
            "directory: pass run_dir=outputs/NAME explicitly."
        )
    check_config(cfg, stages)
    run.check_adoptable()
    quiet_progress_bars()
    with run.lock() if is_main_process() else contextlib.nullcontext():
        check_run_identity(cfg, run, command)
        if is_main_process():
            OmegaConf.save(OmegaConf.structured(cfg), run.config_path, resolve=True)
            log.info("run directory: %s", run.root)
            log.info("stages: %s", ", ".join(s.name for s in stages))
        _run_stages(cfg, run, stages)
    return run


def check_searchable(cfg: Config, stages: list[Stage]) -> None:
    """A search maximises what the train stage measures on validation rows: it must train and score them."""
    problems = []
    if "train" not in {s.name for s in stages}:
        problems.append(f"stages={[str(s) for s in cfg.stages]} has no train stage; a trial trains a model and "
                        f"is scored on validation rows: stages=[data,train] (or more)")
    if cfg.method.metric_examples <= 0:
        problems.append(f"method.metric_examples={cfg.method.metric_examples} scores no validation row; "
                        f"the objective needs some (e.g. method.metric_examples=32)")
    if problems:
        raise ConfigError("a hyper-parameter search needs a validation task metric, and this config gives "
                          "none:\n" + "\n".join(f"  - {p}" for p in problems))


def objective(cfg: Config, run: RunDir) -> float:
    """What a hyper-parameter search maximises: the task's headline metric (field_f1, macro_f1, rougeL) on
    method.metric_examples validation rows, as the train stage recorded it for the model it saved. The
    test split is never part of it."""
    metric = get_task(cfg.task).headline_metric
    summary = run.stage_summary("train") if run.is_done("train") else None
    if summary is None:
        raise RunDirError(f"{run.root} has no finished train stage, so no objective: a trial must train "
                          f"(stages=[data,train])")
    validation = summary.get("validation") or {}
    value = validation.get(metric)
    if value is None:
        raise DataError(
            f"the train stage in {run.root} recorded no validation {metric}, so this trial has no objective: it "
            f"scores the first method.metric_examples rows of {run.split_path('validation')}, and there were none. "
            f"Give the data a validation split (task.data.validation_fraction > 0 or task.data.validation_path)")
    if not math.isfinite(value):
        raise DataError(f"the train stage in {run.root} recorded validation {metric} = {value}: not a value a "
                        f"search can compare")
    log.info("objective: validation %s = %s on %s rows", metric, value, validation.get("n"))
    return float(value)


def _run_stages(cfg: Config, run: RunDir, stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    this_run: dict[str, str] = {}

    def note(stage: str, what: str) -> None:
        this_run[stage] = what
        if is_main_process():
            write_json_atomic(run.this_run_path, {"stages": this_run})

    for stage in stages:
        missing = {r: why for r in stage.requires if r not in names
                   and (why := why_not_done(BY_NAME[r], cfg, run)) is not None}
        if missing:
            raise RunDirError(
                f"stage {stage.name!r} needs stage(s) {list(missing)} first, and {run.root} has not run them "
                f"({'; '.join(f'{r}: {w}' for r, w in missing.items())}). "
                f"Add them to stages=[...] or point run_dir at a run that has."
            )
        if not stage.always_rerun and not cfg.force:
            why = why_not_done(stage, cfg, run)
            if why is None:
                finished = run.stage_summary(stage.name).get("finished_at", "earlier")
                log.info("[%s] already done in %s (%s), skipping (force=true re-runs it)", stage.name, run.root,
                         finished)
                note(stage.name, f"reused (finished {finished}, inputs and outputs unchanged)")
                continue
            if run.is_done(stage.name):
                log.info("[%s] done before, but %s: running it again", stage.name, why)
        if not stage.all_ranks and not is_main_process():
            if stage.name == "data":  # training on this rank reads the data rank 0 writes
                wait_for(run, "data")
            continue
        inputs = inputs_fingerprint(stage, cfg, run)
        if is_main_process():
            start(stage, cfg, run, inputs)
        log.info("[%s] starting", stage.name)
        note(stage.name, "running")
        started = time.time()
        try:
            summary = stage.fn(cfg, run) or {}
        except FinetuneError as exc:
            exc.stage = stage.name  # __main__ names the stage in its message
            raise
        summary["seconds"] = round(time.time() - started, 1)
        if is_main_process():
            finish(stage, cfg, run, summary, inputs)
        note(stage.name, f"ran now ({summary['seconds']} s)")
        log.info("[%s] done in %.1fs", stage.name, summary["seconds"])
        if stage.all_ranks and not is_main_process():
            return  # other ranks are finished once the adapter is saved
    if is_main_process():
        log.info("finished: %s", run.root)
