"""The evaluation's files: metrics.json (per model: task metrics, speed, info) and predictions/<name>.jsonl,
how a model's answers become them (score), and the formatting every table of them uses.

    metrics.json   {"task", "task_kind", "headline_metric", "model", "method", "n", "generation": {...},
                    "models": {name: {<task metrics, e.g. field_f1>, "n", "latency_s_mean", "tokens_per_s",
                                      "generated_tokens_mean", "stopped_fraction", "seconds", "runtime",
                                      "constraint" (json_schema | labels | none), "source", "few_shot",
                                      ["size_bytes"], baselines: ["baseline", "note", "train_rows",
                                      "train_rows_left_out"]} | {"error": "...", ...}}}
    predictions/<name>.jsonl   id, input, expected, reference, output (raw), the task's score row
                               (parsed, correct, ...), n_tokens, latency_s, stopped
Re-scoring a predictions file with task.score(references, outputs) gives that model's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.core.files import write_jsonl_atomic
from finetune.core.rundir import RunDir
from finetune.runtimes.generation import Generation

# Keys of a metrics.json model entry that describe the run, not the task metric.
SPEED_KEYS = ["latency_s_mean", "tokens_per_s", "generated_tokens_mean", "stopped_fraction", "seconds"]
INFO_KEYS = ["n", "runtime", "constraint", "source", "few_shot", "batch_size", "n_ctx", "size_bytes", "error",
             "baseline", "note", "train_rows", "train_rows_left_out", "cached", "parallel"]


def expected_output(row: dict) -> str:
    return row["completion"][-1]["content"]


def score(task: Any, rows: list[dict], outputs: list[Generation], info: dict, wall_seconds: float | None = None) -> tuple[dict, list[dict]]:
    """Task metrics + speed for one model, and its prediction rows (re-scorable from the file)."""
    metrics, scored = task.score([r["reference"] for r in rows], [g.text for g in outputs])
    predictions = []
    for row, gen, s in zip(rows, outputs, scored):
        predictions.append(
            {
                "id": row["id"],
                "input": task.input_of(row),
                "expected": expected_output(row),
                "reference": row["reference"],
                "output": gen.text,
                **s,
                "n_tokens": gen.n_tokens,
                "latency_s": round(gen.latency_s, 4),
                "stopped": gen.stopped,
            }
        )
    # Batches run one after another (their latencies add up); answers decoded together overlap, so a runtime
    # that interleaves them (continuous batching) passes the wall time of the whole call instead.
    seconds = wall_seconds if wall_seconds is not None else sum({g.batch: g.latency_s for g in outputs}.values())
    tokens = sum(g.n_tokens for g in outputs)
    entry = {
        **metrics,
        "n": len(rows),
        "latency_s_mean": round(sum(g.latency_s for g in outputs) / max(len(outputs), 1), 4),
        "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds > 0 else None,
        "generated_tokens_mean": round(tokens / max(len(outputs), 1), 2),
        "stopped_fraction": round(sum(g.stopped for g in outputs) / max(len(outputs), 1), 4),
        "seconds": round(seconds, 2),
        **info,
    }
    return entry, predictions


def write_predictions(run: RunDir, name: str, predictions: list[dict]) -> Path:
    path = run.predictions_dir / f"{name}.jsonl"
    write_jsonl_atomic(path, predictions)
    return path


def read_predictions(run: RunDir, name: str) -> list[dict]:
    path = run.predictions_dir / f"{name}.jsonl"
    if not path.is_file():
        return []
    # "\n" only: splitlines() would also cut a line at an unescaped U+0085 or U+2028 inside a JSON string.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def cell(text: Any, limit: int = 120) -> str:
    text = str(text).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
