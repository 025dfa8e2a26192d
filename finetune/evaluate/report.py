"""The run's report (report.md + plots) from metrics.json and the run directory.

report.md is written for people; metrics.json is the stable interface for scripts. Every number in
the report's results table is printed from metrics.json (4 decimals for metrics, 2 for speeds).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.files import write_text_atomic
from finetune.core.rundir import RunDir
from finetune.data.rows import run_task
from finetune.evaluate.metrics import (
    INFO_KEYS,
    SPEED_KEYS,
    cell,
    fmt,
    human_size,
    md_table,
    read_json,
    read_predictions,
)
from finetune.evaluate.plots import plot_confusion, plot_loss

MAX_LISTED = 12  # validation-report list items and wrong predictions shown
PER_LABEL_INLINE = 6  # per-label F1 columns the results table keeps; more get a table of their own, a row per label


def metric_columns(metrics: dict) -> list[str]:
    """The headline metric first, then the task's other numeric metrics, in the task's order."""
    skip = set(SPEED_KEYS) | set(INFO_KEYS)
    cols = [metrics["headline_metric"]]
    for entry in metrics["models"].values():
        for key, value in entry.items():
            if key not in skip and key not in cols and isinstance(value, (int, float)) and not isinstance(value, bool):
                cols.append(key)
    return cols


def per_label_columns(metrics: dict) -> list[str]:
    """The per-label F1 columns (classification's `f1_<label>`, extraction's `f1_<field>`) when there are too
    many to read across the results table; otherwise none (they stay in it)."""
    per_label = [c for c in metric_columns(metrics) if c.startswith("f1_")]
    return per_label if len(per_label) > PER_LABEL_INLINE else []


def results_table(metrics: dict) -> list[str]:
    apart = set(per_label_columns(metrics))
    cols = [c for c in metric_columns(metrics) if c not in apart]
    head = metrics["headline_metric"]
    tuned = metrics["models"].get("finetuned", {}).get(head)
    delta = [f"Δ {head}"] if isinstance(tuned, (int, float)) else []
    header = ["model", "runtime", "constraint", "few-shot", "n", *cols, *delta, "stopped", "s/example", "tokens/s",
              "size"]
    rows = []
    for name, e in metrics["models"].items():
        if "error" in e:
            continue
        size = human_size(e["size_bytes"]) if e.get("size_bytes") else "—"
        value = e.get(head)
        change = []
        if delta:
            bounds = e.get("vs_finetuned_95")
            change = [f"{value - tuned:+.4f}" + (f" ({bounds[0]:+.3f}..{bounds[1]:+.3f})" if bounds else "")
                      if isinstance(value, (int, float)) and name != "finetuned" else ""]
        rows.append(
            [name, e.get("runtime", ""), fmt(e.get("constraint")), fmt(e.get("few_shot")), fmt(e.get("n"))]
            + [fmt(e.get(c)) for c in cols]
            + change
            + [fmt(e.get("stopped_fraction")), fmt(e.get("latency_s_mean"), 2), fmt(e.get("tokens_per_s"), 2), size]
        )
    return md_table(header, rows)


def per_label_table(metrics: dict, train_counts: dict | None = None, test_counts: dict | None = None) -> list[str]:
    """F1 per label, or per field of an extraction answer (a row each, a model per column, the training rows and
    the scored test rows that hold it beside it), for sets too large for the results table's columns; in the
    task's order."""
    cols = per_label_columns(metrics)
    if not cols:
        return []
    noun = "field" if metrics.get("task_kind") == "extraction" else "label"
    models = [(name, e) for name, e in metrics["models"].items() if "error" not in e]
    train, test = train_counts or {}, test_counts or {}
    rows = [[cell(c[len("f1_"):]), fmt(train.get(c[len("f1_"):])), fmt(test.get(c[len("f1_"):]))]
            + [fmt(e.get(c)) for _, e in models] for c in cols]
    return [f"### F1 per {noun} ({len(cols)} {noun}s)", ""] + md_table(
        [noun, "train rows", "test rows", *(name for name, _ in models)], rows) + [""]


def scored_counts(cfg: Config, run: RunDir, metrics: dict) -> dict | None:
    """How many of the scored test rows hold each label (field): from the first model's predictions, so the
    rows evaluate.max_examples kept; None when no model has predictions."""
    name = next((n for n, e in metrics["models"].items() if "error" not in e), None)
    references = [p["reference"] for p in read_predictions(run, name) if "reference" in p] if name else []
    return run_task(cfg.task, run).label_counts(references) if references else None


def baseline_lines(metrics: dict) -> list[str]:
    """One line per evaluated baseline: what it is and what it learnt from, so a reference point that has
    seen the test rows is not read as a competitor."""
    lines = []
    for name, e in metrics["models"].items():
        if "baseline" not in e:
            continue
        trained = ""
        if isinstance(e.get("train_rows"), int):
            trained = f"; trained on {e['train_rows']} rows of this run's train split"
            if e.get("train_rows_left_out"):
                trained += f" ({e['train_rows_left_out']} left out: answer values that are not spans of the input)"
        lines.append(f"- `{name}`: {e['baseline']}, {e.get('note') or 'a non-LLM baseline'}{trained}.")
    return lines


def constraint_lines(metrics: dict) -> list[str]:
    """How answers were constrained, and what the constraint changed for each model also run without it."""
    constraint = metrics.get("generation", {}).get("constraint") or {}
    kind = constraint.get("kind", "none")
    if kind == "none":
        return ["Decoding was not constrained (evaluate.constrained=false, or a free-text task).", ""]
    what = ("the task's JSON schema (keys from its field list, in that order)" if kind == "json_schema"
            else f"one of the labels {constraint.get('labels')}")
    if constraint.get("values_copied_from_input"):
        what += (", each string value made of pieces copied from the row's input (a JSON-schema `pattern` per "
                 "row, task.copy_values)")
    lines = [f"Answers were constrained to {what}: llama.cpp's GBNF grammar of it, in llama.cpp natively and in "
             f"transformers through llguidance (`generation.grammar` in metrics.json).", ""]
    head, models = metrics["headline_metric"], metrics["models"]
    for name, entry in models.items():
        free = models.get(f"{name}-unconstrained", {}).get(head)
        held = entry.get(head)
        if isinstance(free, (int, float)) and isinstance(held, (int, float)):
            lines.append(f"- Constraints moved {name}'s {head} from {fmt(free)} (unconstrained) to {fmt(held)} "
                         f"({held - free:+.4f}).")
    return lines + [""] if lines[-1] else lines


def parse_results_table(text: str) -> dict[str, dict[str, str]]:
    """The results table of a report.md back as {model: {column: cell}} (for scripts and tests)."""
    lines = text.split("\n## Results\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    out = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        out[cells[0]] = dict(zip(header, cells))
    return out


# ---------------------------------------------------------------------------------------------
# Inputs from the run directory


def train_log(run: RunDir) -> list[dict]:
    """The trainer's log_history (train_log.json holds the list, or {"log_history": [...]})."""
    data = read_json(run.train_log_path)
    if isinstance(data, dict):
        data = data.get("log_history")
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else fmt(value)


def _scalars(obj: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in obj.items() if isinstance(v, (str, int, float, bool)) or v is None]


def summary_lines(obj: Any, depth: int = 0) -> list[str]:
    """A JSON summary (validation report, stage summary) as a nested bullet list, long lists cut."""
    pad = "  " * depth
    lines = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (dict, list)) and value:
                if isinstance(value, dict) and len(value) <= 6 and len(_scalars(value)) == len(value):
                    lines.append(f"{pad}- {key}: " + ", ".join(f"{k}={_short(v)}" for k, v in value.items()))
                else:
                    lines.append(f"{pad}- {key}:" + (f" ({len(value)} items)" if isinstance(value, list) else ""))
                    lines += summary_lines(value, depth + 1)
            else:
                lines.append(f"{pad}- {key}: {_short(value)}")
    elif isinstance(obj, list):
        for item in obj[:MAX_LISTED]:
            if isinstance(item, dict):
                lines.append(f"{pad}- " + ", ".join(f"{k}={cell(_short(v), 80)}" for k, v in item.items()))
            else:
                lines.append(f"{pad}- {cell(fmt(item))}")
        if len(obj) > MAX_LISTED:
            lines.append(f"{pad}- … {len(obj) - MAX_LISTED} more")
    return lines


def exported_files(run: RunDir) -> list[list[str]]:
    rows = []
    for label, path in (("adapter", run.adapter_dir), ("merged", run.merged_dir), ("gptq", run.gptq_dir)):
        if path.is_dir() and any(path.iterdir()):
            files = [p for p in path.rglob("*") if p.is_file()]
            rows.append([f"`{path.name}/`", human_size(sum(p.stat().st_size for p in files)), f"{len(files)} files"])
    if run.gguf_dir.is_dir():
        for path in sorted(run.gguf_dir.iterdir()):
            if path.is_file():
                rows.append([f"`{run.gguf_dir.name}/{path.name}`", human_size(path.stat().st_size), ""])
    return rows


# ---------------------------------------------------------------------------------------------
# report.md


def write_report(cfg: Config, run: RunDir, metrics: dict) -> dict[str, str]:
    """Write report.md and the plots; returns {artifact name: path}."""
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(run.metrics_path)}
    history = train_log(run)
    loss_png = plot_loss(history, run.plots_dir / "loss.png")
    if loss_png:
        files["loss_curve"] = str(loss_png)
    confusion = None
    if metrics.get("task_kind") == "classification":
        ok = [n for n, e in metrics["models"].items() if "error" not in e]
        name = next((n for n in ("finetuned", "merged", "base") if n in ok), ok[0] if ok else None)
        preds = read_predictions(run, name) if name else []
        confusion = plot_confusion(preds, list(run_task(cfg.task, run).labels), f"{name} on {metrics['task']}",
                                   run.plots_dir / "confusion_matrix.png")
        if confusion:
            files["confusion_matrix"] = str(confusion)

    lines = _report_lines(cfg, run, metrics, history, loss_png, confusion)
    write_text_atomic(run.report_path, "\n".join(lines) + "\n")
    files["report"] = str(run.report_path)
    return files


def _report_lines(cfg: Config, run: RunDir, metrics: dict, history: list[dict],
                  loss_png: Path | None, confusion: Path | None) -> list[str]:
    head, models = metrics["headline_metric"], metrics["models"]
    gen = metrics.get("generation", {})
    lines = [
        f"# {metrics['model']} fine-tuned for {metrics['task']} ({metrics.get('method', '')})",
        "",
        f"Run directory: `{run.root}`. Test examples: {metrics['n']}. Headline metric: **{head}**. "
        f"Decoding: {'sampling' if gen.get('do_sample') else 'greedy'}, max_new_tokens={gen.get('max_new_tokens')}, "
        f"device {gen.get('device')}, threads: {gen.get('threads')}.",
        "",
    ]
    base, tuned = models.get("base", {}).get(head), models.get("finetuned", {}).get(head)
    if isinstance(base, (int, float)) and isinstance(tuned, (int, float)):
        lines += [f"Fine-tuning moved {head} from {fmt(base)} (base) to {fmt(tuned)} ({tuned - base:+.4f}).", ""]
    lines += constraint_lines(metrics)

    delta = (f"`Δ {head}`: difference to the fine-tuned model (what fine-tuning gained, what an export costs), "
             f"in brackets its 95% interval (a paired bootstrap over the {metrics['n']} test rows, "
             "finetune/evaluate/intervals.py): an interval that holds 0 is a difference these rows cannot tell "
             "from none; `evaluate.max_examples=null` scores every test row. "
             if isinstance(tuned, (int, float)) else "")
    lines += ["## Results", ""] + results_table(metrics) + [
        "",
        delta + "`constraint`: what decoding was held to (json_schema: the task's JSON schema; labels: one of "
        "the task's labels; none: free). `few-shot`: training examples in the prompt. `stopped`: share of answers that ended on a stop "
        "token (the rest hit max_new_tokens). `s/example`: wall time until an answer was ready (a whole batch "
        "for transformers). `tokens/s`: generated tokens (up to each answer's stop) per second of generation; "
        "a transformers batch runs until its longest answer ends, llama.cpp answers one prompt at a time as a "
        "server does.",
        "",
    ]
    validation = read_json(run.validation_report_path)
    if per_label_columns(metrics):
        train_counts = (validation or {}).get("label_counts_train")
        lines += per_label_table(metrics, train_counts, scored_counts(cfg, run, metrics))
    baselines = baseline_lines(metrics)
    if baselines:
        lines += ["Baselines (no language model):", ""] + baselines + [""]
    errors = [(n, e["error"]) for n, e in models.items() if "error" in e]
    if errors:
        lines += ["Could not be evaluated:", ""] + [f"- {n}: `{cell(err, 300)}`" for n, err in errors] + [""]
    if not cfg.evaluate.vllm:
        why = ("on a CPU vLLM answers no faster than this stage's own batching" if gen.get("device") == "cpu"
               else "it needs its own environment")
        lines += [f"Not served with vLLM (`evaluate.vllm=[]`, the default: {why}; docs/vllm.md): "
                  "`scripts/setup.sh --vllm`, then `evaluate.vllm=[merged,gptq]` scores those checkpoints in it.", ""]
    lines += ["Predictions: `predictions/<model>.jsonl` (id, input, expected, output, parsed, correct).", ""]

    worst = next((n for n in ("finetuned", "merged") if n in models and "error" not in models[n]), None)
    wrong = [p for p in read_predictions(run, worst) if not p.get("correct")] if worst else []
    if wrong:
        lines += [f"### Examples `{worst}` got wrong ({len(wrong)} of {models[worst]['n']}, first "
                  f"{min(len(wrong), MAX_LISTED // 2)})", ""]
        lines += md_table(["id", "input", "expected", "output"],
                          [[cell(p["id"]), cell(p["input"]), cell(p["expected"]), cell(p["output"])]
                           for p in wrong[: MAX_LISTED // 2]]) + [""]
    if confusion:
        lines += [f"![confusion matrix]({confusion.relative_to(run.root)})", ""]
    if metrics.get("route"):
        from finetune.evaluate.routing import routing_lines

        lines += routing_lines(metrics["route"], head)

    lines += ["## Data", ""]
    lines += (summary_lines(validation) if validation else ["No `data/validation_report.json` in this run."]) + [""]

    lines += ["## Training", ""]
    if run.is_done("train"):
        lines += [f"- {k}: {_short(v)}" for k, v in _scalars(run.stage_summary("train"))]
    train_points = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    if train_points:
        lines.append(f"- training loss: {fmt(train_points[0]['loss'])} (step {train_points[0].get('step')}) "
                     f"-> {fmt(train_points[-1]['loss'])} (step {train_points[-1].get('step')})")
    if evals:
        best = min(evals, key=lambda e: e["eval_loss"])
        lines.append(f"- validation loss: last {fmt(evals[-1]['eval_loss'])} (step {evals[-1].get('step')}), "
                     f"best {fmt(best['eval_loss'])} (step {best.get('step')})")
    if not run.is_done("train") and not history:
        lines.append("This run has no training record (stage train not run here).")
    if loss_png:
        lines += ["", f"![loss curve]({loss_png.relative_to(run.root)})"]
    lines.append("")

    stages = (read_json(run.this_run_path) or {}).get("stages", {})
    if stages:
        lines += ["## Stages of this invocation", ""] + [f"- {name}: {what}" for name, what in stages.items()] + [
            "", "A reused stage's inputs (config values, upstream outputs, data files) and outputs were checked "
            "against the fingerprints recorded when it finished.", ""]
    lines += ["## Exported files", ""]
    exported = exported_files(run)
    lines += (md_table(["file", "size", "contents"], exported) if exported else ["Nothing exported in this run."]) + [""]

    lines += ["## Reproduce", ""]
    command = (read_json(run.run_json) or {}).get("command")
    if command:
        lines += ["The run:", "", "```", command, "```", ""]
    lines += ["This evaluation and report, on the run as it is now:", "", "```", reevaluate_command(run, command),
              "```", ""]
    return lines


def reevaluate_command(run: RunDir, command: str | None) -> str:
    """The run's own command with its overrides (model, task, ...) but only the evaluate stage."""
    args = shlex.split(command)[3:] if command and command.startswith("python -m finetune") else []
    keep = [a for a in args if not a.split("=", 1)[0].lstrip("+~") in ("stages", "run_dir")]
    return " ".join(["python -m finetune", *map(shlex.quote, keep), shlex.quote("stages=[evaluate]"),
                     f"run_dir={shlex.quote(str(run.root))}"])
