"""The run's report (report.md + plots) from metrics.json and the run directory, and finetune-compare.

report.md is written for people; metrics.json is the stable interface for scripts. Every number in
the report's results table is printed from metrics.json (4 decimals for metrics, 2 for speeds).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from finetune.evaluate import INFO_KEYS, SPEED_KEYS
from finetune.pipeline import RunDir

MAX_LISTED = 12  # validation-report list items and wrong predictions shown


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


def _cell(text: Any, limit: int = 120) -> str:
    text = str(text).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def metric_columns(metrics: dict) -> list[str]:
    """The headline metric first, then the task's other numeric metrics, in the task's order."""
    skip = set(SPEED_KEYS) | set(INFO_KEYS)
    cols = [metrics["headline_metric"]]
    for entry in metrics["models"].values():
        for key, value in entry.items():
            if key not in skip and key not in cols and isinstance(value, (int, float)) and not isinstance(value, bool):
                cols.append(key)
    return cols


def results_table(metrics: dict) -> list[str]:
    cols = metric_columns(metrics)
    head = metrics["headline_metric"]
    tuned = metrics["models"].get("finetuned", {}).get(head)
    delta = [f"Δ {head}"] if isinstance(tuned, (int, float)) else []
    header = ["model", "runtime", "few-shot", "n", *cols, *delta, "stopped", "s/example", "tokens/s", "size"]
    rows = []
    for name, e in metrics["models"].items():
        if "error" in e:
            continue
        size = human_size(e["size_bytes"]) if e.get("size_bytes") else "—"
        value = e.get(head)
        change = []
        if delta:
            change = [f"{value - tuned:+.4f}" if isinstance(value, (int, float)) and name != "finetuned" else ""]
        rows.append(
            [name, e.get("runtime", ""), fmt(e.get("few_shot")), fmt(e.get("n"))]
            + [fmt(e.get(c)) for c in cols]
            + change
            + [fmt(e.get("stopped_fraction")), fmt(e.get("latency_s_mean"), 2), fmt(e.get("tokens_per_s"), 2), size]
        )
    return md_table(header, rows)


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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def train_log(run: RunDir) -> list[dict]:
    """The trainer's log_history (train_log.json holds the list, or {"log_history": [...]})."""
    data = read_json(run.root / "train_log.json")
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
                lines.append(f"{pad}- " + ", ".join(f"{k}={_cell(_short(v), 80)}" for k, v in item.items()))
            else:
                lines.append(f"{pad}- {_cell(fmt(item))}")
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
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: Path) -> Path | None:
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "training loss", "-"), (val, "validation loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(predictions: list[dict], labels: list[str], title: str, path: Path) -> Path | None:
    if not predictions:
        return None
    other = "(other)"
    names = list(labels) or sorted({str(p["reference"]) for p in predictions})
    names = names + [other]
    index = {n: i for i, n in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for p in predictions:
        truth = index.get(str(p["reference"]), index[other])
        guess = index.get(str(p.get("parsed")), index[other])
        counts[truth][guess] += 1
    plt = _pyplot()
    size = 2 + 0.5 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(title)
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", color="black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# report.md


def write_report(cfg: DictConfig, run: RunDir, metrics: dict) -> dict[str, str]:
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
        preds = _read_predictions(run, name) if name else []
        confusion = plot_confusion(preds, list(cfg.task.labels), f"{name} on {metrics['task']}",
                                   run.plots_dir / "confusion_matrix.png")
        if confusion:
            files["confusion_matrix"] = str(confusion)

    lines = _report_lines(cfg, run, metrics, history, loss_png, confusion)
    tmp = run.report_path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(run.report_path)
    files["report"] = str(run.report_path)
    return files


def _read_predictions(run: RunDir, name: str) -> list[dict]:
    path = run.predictions_dir / f"{name}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _report_lines(cfg: DictConfig, run: RunDir, metrics: dict, history: list[dict],
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

    delta = (f"`Δ {head}`: difference to the fine-tuned model (what fine-tuning gained, what an export costs). "
             if isinstance(tuned, (int, float)) else "")
    lines += ["## Results", ""] + results_table(metrics) + [
        "",
        delta + "`few-shot`: training examples in the prompt. `stopped`: share of answers that ended on a stop "
        "token (the rest hit max_new_tokens). `s/example`: wall time until an answer was ready (a whole batch "
        "for transformers). `tokens/s`: generated tokens (up to each answer's stop) per second of generation; "
        "a transformers batch runs until its longest answer ends, llama.cpp answers one prompt at a time as a "
        "server does.",
        "",
    ]
    errors = [(n, e["error"]) for n, e in models.items() if "error" in e]
    if errors:
        lines += ["Could not be evaluated:", ""] + [f"- {n}: `{_cell(err, 300)}`" for n, err in errors] + [""]
    lines += ["Predictions: `predictions/<model>.jsonl` (id, input, expected, output, parsed, correct).", ""]

    worst = next((n for n in ("finetuned", "merged") if n in models and "error" not in models[n]), None)
    wrong = [p for p in _read_predictions(run, worst) if not p.get("correct")] if worst else []
    if wrong:
        lines += [f"### Examples `{worst}` got wrong ({len(wrong)} of {models[worst]['n']}, first "
                  f"{min(len(wrong), MAX_LISTED // 2)})", ""]
        lines += md_table(["id", "input", "expected", "output"],
                          [[_cell(p["id"]), _cell(p["input"]), _cell(p["expected"]), _cell(p["output"])]
                           for p in wrong[: MAX_LISTED // 2]]) + [""]
    if confusion:
        lines += [f"![confusion matrix]({confusion.relative_to(run.root)})", ""]

    lines += ["## Data", ""]
    validation = read_json(run.data_dir / "validation_report.json")
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

    lines += ["## Exported files", ""]
    exported = exported_files(run)
    lines += (md_table(["file", "size", "contents"], exported) if exported else ["Nothing exported in this run."]) + [""]

    lines += ["## Reproduce", ""]
    command = (read_json(run.root / "run.json") or {}).get("command")
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


# ---------------------------------------------------------------------------------------------
# finetune-compare


def compare_table(run_dirs: list[str], metric: str | None = None) -> list[str]:
    """One row per run, one column per evaluated model/artifact: the headline (or chosen) metric."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        data = read_json(path)
        if not isinstance(data, dict) or "models" not in data:
            raise SystemExit(f"error: {path} is missing or not a metrics.json; evaluate the run first:\n"
                             f"  python -m finetune stages=[evaluate] run_dir={d}")
        runs.append((d, data))
    names: list[str] = []
    for _, data in runs:
        names += [n for n in data["models"] if n not in names]
    rows = []
    for d, data in runs:
        key = metric or data["headline_metric"]
        cells = []
        for n in names:
            entry = data["models"].get(n)
            digits = 2 if key in SPEED_KEYS else 4
            cells.append("" if entry is None else "error" if "error" in entry else fmt(entry.get(key), digits))
        rows.append([d, data.get("task", ""), data.get("model", ""), key, str(data.get("n", ""))] + cells)
    header = ["run", "task", "model", "metric", "n"] + names
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    pad = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [pad(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [pad(r) for r in rows]


def compare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-compare",
        description="Print the headline metric of every evaluated model/artifact across run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metric", help="another metrics.json key instead of each run's headline metric, "
                        "e.g. tokens_per_s or latency_s_mean")
    args = parser.parse_args(argv)
    print("\n".join(compare_table(args.run_dirs, args.metric)))
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
