"""Trackers: files inside the run directory, read back with each tool's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainutil import tiny_run

from finetune.core.config import compose
from finetune.train.stage import train
from finetune.train.tracking import flatten_metrics, log_results, report_to, table_columns, wandb_logged_in, wandb_mode

METRICS = {"models": {"finetuned": {"field_f1": 0.75, "n": 4}, "base": {"field_f1": 0.25, "n": 4}}, "note": "x"}
TABLES = {"finetuned": [{"id": "extraction-000020", "output": '{"A": 1}', "parsed": {"A": 1}, "correct": True}]}


# Two optimizer steps, an evaluation after each: enough to see losses arrive in every tracker.
SHORT = ["method=lora", "method.max_steps=2", "method.eval_steps=1", "method.save_steps=2"]


def _artifacts(run) -> dict:
    return {"adapter": str(run.adapter_dir), "gguf_q4_k_m": str(run.gguf_dir / "model-Q4_K_M.gguf")}


# ---------------------------------------------------------------- fast


@pytest.mark.parametrize("name", ["none", "wandb", "tensorboard", "mlflow"])
def test_report_to_names_the_tracker(name):
    assert report_to(compose([f"tracking={name}"])) == [name]


def test_wandb_mode_auto_is_online_only_when_logged_in(tmp_path, monkeypatch):
    cfg = compose(["tracking=wandb"])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in() and wandb_mode(cfg) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert wandb_logged_in() and wandb_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's explicit choice wins
    assert wandb_mode(cfg) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(cfg) == "online"
    cfg.tracking.mode = "offline"
    assert wandb_mode(cfg) == "offline"


def test_results_are_flattened_for_trackers():
    assert flatten_metrics(METRICS) == {"models/finetuned/field_f1": 0.75, "models/finetuned/n": 4.0,
                                 "models/base/field_f1": 0.25, "models/base/n": 4.0}
    columns, data = table_columns(TABLES["finetuned"])
    assert columns == ["id", "output", "parsed", "correct"] and data[0][2] == '{"A": 1}'


# ---------------------------------------------------------------- slow: a tiny real training per tracker


def _wandb_records(run_file: Path) -> list:
    """Every protobuf Record of a .wandb file.

    wandb >= 0.2x writes the file from its Go core and no longer ships a Python reader, so this reads the
    documented format directly: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB log
    records in 32 KiB blocks (crc32 seeded with the type byte, uint16 length, type FULL/FIRST/MIDDLE/LAST).
    """
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer: zero padding
            pos += 32768 - pos % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        assert checksum == zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad record at {pos}"
        pos += 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_values(records: list, kind: str) -> dict:
    """{key: [json values]} of the history (kind='history') or summary (kind='summary') records."""
    out: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            items = record.history.item if kind == "history" else record.summary.update
            for item in items:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append(json.loads(item.value_json))
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_losses_and_results(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, run = tiny_run(tmp_path, [*SHORT, "tracking=wandb", "tracking.tags=[test]"], n_validation=2)
    train(cfg, run)
    run_id = json.loads((run.root / "tracking.json").read_text())["wandb_run_id"]
    files = sorted((run.root / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    history = _wandb_values(records, "history")
    assert len(history["train/loss"]) == 2 and all(v > 0 for v in history["train/loss"])
    assert len(history["eval/loss"]) == 2
    keys = {item.key for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    keys |= {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"model", "method", "task", "learning_rate"} <= keys  # the Hydra config and the trainer's args

    log_results(cfg, run, METRICS, TABLES, _artifacts(run))
    files = sorted((run.root / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the same run id, resumed by the evaluation stage
    summary = _wandb_values(_wandb_records(files[-1]), "summary")
    assert summary["results/models/finetuned/field_f1"][-1] == 0.75
    assert summary["artifacts/adapter"][-1] == str(run.adapter_dir)
    assert summary["results/finetuned/_type"][-1] == "table-file"
    table = json.loads((files[-1].parent / "files" / summary["results/finetuned/path"][-1]).read_text())
    assert table["columns"] == ["id", "output", "parsed", "correct"] and table["data"][0][0] == "extraction-000020"


@pytest.mark.slow
def test_tensorboard_events_hold_losses_and_results(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run = tiny_run(tmp_path, [*SHORT, "tracking=tensorboard"], n_validation=2)
    train(cfg, run)
    log_results(cfg, run, METRICS, TABLES, _artifacts(run))
    events = EventAccumulator(str(run.root / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2]
    assert events.Scalars("results/models/finetuned/field_f1")[0].value == pytest.approx(0.75)
    assert "results/models/base/field_f1" in scalars
    texts = {t: events.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in events.Tags()["tensors"]}
    assert str(run.adapter_dir) in texts["artifacts/text_summary"]
    assert "extraction-000020" in texts["results/finetuned/text_summary"]


@pytest.mark.slow
def test_mlflow_file_store_holds_losses_and_results(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg, run = tiny_run(tmp_path, [*SHORT, "tracking=mlflow"], n_validation=2)
    train(cfg, run)
    log_results(cfg, run, METRICS, TABLES, _artifacts(run))
    run_id = json.loads((run.root / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=(run.root / "mlruns").as_uri())
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert len(client.get_metric_history(run_id, "eval_loss")) == 2
    logged = client.get_run(run_id).data
    assert logged.metrics["results/models/finetuned/field_f1"] == 0.75
    assert logged.params["learning_rate"] == str(cfg.method.lr)
    assert logged.tags["artifact.adapter"] == str(run.adapter_dir)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "results")}
    assert {"config.json", "artifacts.json", "results/finetuned.json"} <= artifacts
