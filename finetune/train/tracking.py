"""Experiment trackers (tracking=wandb | tensorboard | mlflow | none), every file inside the run directory.

Training reports through the Trainer's own integrations (`report_to`); `tracker()` prepares them: the
environment they read, and for W&B and MLflow a run whose id is kept in run.root/tracking.json so that
a resumed training and the later evaluation stage (`log_results`) log into the same run.

    wandb        run.root/wandb/           online when logged in (WANDB_API_KEY or ~/.netrc), else offline
    tensorboard  run.root/tensorboard/     event files
    mlflow       run.root/mlruns/          file store (MLFLOW_ALLOW_FILE_STORE=true)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from finetune.core.config import Config, to_dict
from finetune.core.distributed import is_main_process
from finetune.core.errors import ConfigError
from finetune.core.files import write_json_atomic
from finetune.core.rundir import RunDir

log = logging.getLogger("finetune")

WANDB_HOST = "api.wandb.ai"


def tracker_name(cfg: Config) -> str:
    return str(cfg.tracking.name)


def report_to(cfg: Config) -> list[str]:
    """For TrainingArguments.report_to: the one integration the run logs to, or ["none"]."""
    return [tracker_name(cfg)]


# ---------------------------------------------------------------- W&B
def wandb_logged_in() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://" + WANDB_HOST).split("://")[-1].split("/")[0].split(":")[0]
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: Config) -> str:
    """online | offline | disabled. mode=auto: WANDB_MODE if the user set it, else online when logged in."""
    mode = cfg.tracking.mode
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").lower()
        if env in ("online", "offline", "disabled"):
            return env
        return "online" if wandb_logged_in() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"tracking.mode={mode!r}: expected auto, online, offline or disabled")
    return mode


# ---------------------------------------------------------------- run ids kept in the run directory
def _ids(run: RunDir) -> dict:
    path = run.tracking_path
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(run: RunDir, key: str, value: str) -> None:
    ids = {**_ids(run), key: value}
    run.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.tracking_path, ids)


def _wandb_run_id(run: RunDir) -> str:
    run_id = _ids(run).get("wandb_run_id")
    if not run_id:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"  # the form of W&B's own run ids
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        _save_id(run, "wandb_run_id", run_id)
    return run_id


def _mlflow_uri(run: RunDir) -> str:
    return (run.root / "mlruns").resolve().as_uri()


def _mlflow_run_id(cfg: Config, run: RunDir) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(run))
    run_id = _ids(run).get("mlflow_run_id")
    if run_id:
        return run_id
    experiment = client.get_experiment_by_name(cfg.tracking.project)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.project)
    tags = {"mlflow.runName": run.root.name, **{t: "true" for t in cfg.tracking.tags}}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    _save_id(run, "mlflow_run_id", run_id)
    client.log_dict(run_id, to_dict(cfg), "config.json")
    return run_id


def _env(cfg: Config, run: RunDir) -> dict[str, str]:
    name = tracker_name(cfg)
    if name == "wandb":
        return {"WANDB_DIR": str(run.root), "WANDB_PROJECT": cfg.tracking.project, "WANDB_MODE": wandb_mode(cfg),
                "WANDB_RUN_ID": _wandb_run_id(run), "WANDB_RESUME": "allow"}
    if name == "tensorboard":
        return {"TENSORBOARD_LOGGING_DIR": str(run.root / "tensorboard")}
    if name == "mlflow":
        return {"MLFLOW_TRACKING_URI": _mlflow_uri(run), "MLFLOW_ALLOW_FILE_STORE": "true",
                "MLFLOW_EXPERIMENT_NAME": cfg.tracking.project}
    return {}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracker(cfg: Config, run: RunDir) -> Iterator[None]:
    """Around training: the tracker's environment (restored afterwards) and, on rank 0, its run."""
    name = tracker_name(cfg)
    if name == "none" or not is_main_process():
        yield
        return
    run.root.mkdir(parents=True, exist_ok=True)
    env = _env(cfg, run)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environ(env))
        if name == "mlflow":
            import mlflow

            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # not a URI left over from an earlier run
            # The Trainer's MLflowCallback attaches to this run instead of starting its own.
            stack.enter_context(_environ({"MLFLOW_RUN_ID": _mlflow_run_id(cfg, run)}))
        wandb_run = None
        if name == "wandb":
            import wandb

            # Started here so the full Hydra config is logged; the Trainer's WandbCallback reuses this run.
            wandb_run = wandb.init(project=cfg.tracking.project, id=env["WANDB_RUN_ID"], resume="allow",
                                   dir=str(run.root), mode=env["WANDB_MODE"], name=run.root.name,
                                   tags=list(cfg.tracking.tags), job_type="train",
                                   config=to_dict(cfg))
            log.info("W&B run %s (%s) in %s", wandb_run.id, env["WANDB_MODE"], run.root / "wandb")
        try:
            yield
        finally:
            if wandb_run is not None:
                wandb_run.finish()
            if name == "mlflow":
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.end_run()
            where = {"tensorboard": run.root / "tensorboard", "mlflow": run.root / "mlruns"}.get(name)
            if where:
                log.info("%s logs in %s", name, where)


# ---------------------------------------------------------------- results after evaluation
def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {'a/b/c': value}."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def table_columns(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """A table of scalars: columns in first-seen order, anything nested as JSON text."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cell = lambda v: v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)  # noqa: E731
    return columns, [[cell(row.get(c)) for c in columns] for row in rows]


def _last_step(run: RunDir) -> int:
    path = run.train_log_path
    try:
        history = json.loads(path.read_text())
        history = history.get("log_history", []) if isinstance(history, dict) else history
        return max((int(h.get("step", 0)) for h in history), default=0)
    except (OSError, ValueError):
        return 0


def log_results(cfg: Config, run: RunDir, metrics: dict, tables: dict[str, list[dict]], artifacts: dict[str, str]) -> None:
    """Log the evaluation (metrics, per-example tables, paths of the exported artifacts) to the run's tracker."""
    name = tracker_name(cfg)
    if name == "none" or not is_main_process():
        return
    flat = {f"results/{k}": v for k, v in flatten_metrics(metrics).items()}
    artifacts = {k: str(v) for k, v in artifacts.items()}
    with _environ(_env(cfg, run)):
        if name == "wandb":
            _wandb_results(cfg, run, flat, tables, artifacts)
        elif name == "tensorboard":
            _tensorboard_results(run, flat, tables, artifacts)
        elif name == "mlflow":
            _mlflow_results(cfg, run, flat, tables, artifacts)
    log.info("logged evaluation results to %s", name)


def _wandb_results(cfg, run: RunDir, flat, tables, artifacts) -> None:
    import wandb

    wrun = wandb.init(project=cfg.tracking.project, id=_wandb_run_id(run), resume="allow", dir=str(run.root),
                      mode=wandb_mode(cfg), name=run.root.name, tags=list(cfg.tracking.tags))
    try:
        payload: dict[str, Any] = dict(flat)
        for table_name, rows in tables.items():
            columns, data = table_columns(rows)
            payload[f"results/{table_name}"] = wandb.Table(columns=columns, data=data)
        wrun.log(payload)
        wrun.summary.update({**flat, **{f"artifacts/{k}": v for k, v in artifacts.items()}})
        wrun.config.update({"artifacts": artifacts}, allow_val_change=True)
    finally:
        wrun.finish()


def _tensorboard_results(run, flat, tables, artifacts) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step = _last_step(run)
    writer = SummaryWriter(log_dir=str(run.root / "tensorboard"))
    try:
        for key, value in flat.items():
            writer.add_scalar(key, value, step)
        for table_name, rows in tables.items():
            columns, data = table_columns(rows[:200])
            md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            md += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |" for r in data]
            writer.add_text(f"results/{table_name}", "\n".join(md), step)
        writer.add_text("artifacts", "\n".join(f"- {k}: `{v}`" for k, v in artifacts.items()), step)
    finally:
        writer.close()


def _mlflow_results(cfg, run: RunDir, flat, tables, artifacts) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(run))
    run_id = _mlflow_run_id(cfg, run)
    step = _last_step(run)
    for key, value in flat.items():
        client.log_metric(run_id, key, value, step=step)
    for table_name, rows in tables.items():
        columns, data = table_columns(rows)
        client.log_table(run_id, {c: [r[i] for r in data] for i, c in enumerate(columns)}, f"results/{table_name}.json")
    client.log_dict(run_id, artifacts, "artifacts.json")
    for key, value in artifacts.items():
        client.set_tag(run_id, f"artifact.{key}", value[:5000])
