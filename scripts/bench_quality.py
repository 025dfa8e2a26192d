"""Task quality of what the default run hands a user: headline metric and exact match per model and task.

    .venv/bin/python scripts/bench_quality.py [--tasks extraction classification summarization]
        [--compare qwen2.5-0.5b] [--shots 0 3] [--seeds S ...] [--out outputs/bench_quality] [--rerun]
        [-- OVERRIDES...]

For each task it runs the plain default pipeline (`python -m finetune task=T`, plus OVERRIDES, e.g. the data
of a custom task), then the comparison model on the same test rows, zero-shot and k-shot (a run directory
of its own: the data stage's seeded split gives the same rows; `stages=[data,evaluate]`, the base model
evaluated with the same shots). A run directory that already has its metrics.json is reused (--rerun
runs it again). Prints one JSON line per task and model (headline metric, exact match, stage seconds,
machine) and a table; `--markdown` prints the README's Results table.

Every model sees the same test rows and prompt; the specialist is the task's non-LLM baseline trained on
the train split (extraction also lists usaddress's parser, trained on these very rows: an upper bound).

One training run is one draw: two runs that differ only in the training seed (`method.seed`: the order of the
rows) can differ by several points of field F1 on the same rows (docs/training.md, "Run-to-run noise").
`--seeds 42 1 2` trains the default once per seed (run directories `default-seed<S>`; the test split has its
own seed, `task.data.split_seed`, so every run answers the same rows) and prints each model's mean, standard
deviation and range over the seeds; the comparison model is not trained and answers once. To tell two recipes
apart, run both with the same seeds (a second `--out`, the recipe among the OVERRIDES) and compare the means
against the spreads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

ORDER = ["base", "finetuned", "finetuned-unconstrained", "merged", "gguf-Q8_0", "gguf-Q4_K_M", "gptq"]
EXACT = {"extraction": "exact_match", "classification": "accuracy", "generation": "exact_match"}


def machine_kind() -> str:
    import os

    from finetune.core.hardware import cpu_supports_bf16

    if not Path("/proc/cpuinfo").is_file():
        return "unknown CPU"
    return f"{os.cpu_count()}-core CPU {'with' if cpu_supports_bf16() else 'without'} AVX512-BF16"


def run_finetune(run_dir: Path, args: list[str]) -> float:
    cmd = [sys.executable, "-m", "finetune", f"run_dir={run_dir}", *args]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=_bench.ROOT, check=True)
    return round(time.time() - start, 1)


def stage_seconds(run_dir: Path) -> dict:
    out = {}
    for marker in sorted((run_dir / "stages").glob("*.json")):
        if marker.name.count(".") == 1:  # not the .started markers
            seconds = json.loads(marker.read_text()).get("seconds")
            if seconds is not None:
                out[marker.stem] = seconds
    return out


def rows_of(task: str, run_dir: Path, label: str, wall: float | None) -> list[dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    key = metrics["headline_metric"]
    exact_key = EXACT.get(metrics.get("task_kind", ""), "exact_match")
    models = metrics["models"]
    names = [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER)
    rows = []
    for name in names:
        entry = models[name]
        rows.append({"task": task, "model": f"{name}{label}", "metric": key, "value": entry.get(key),
                     "exact": entry.get(exact_key), "exact_metric": exact_key, "n": entry.get("n"),
                     "runtime": entry.get("runtime"), "constraint": entry.get("constraint"),
                     "error": (entry.get("error") or "")[:80] or None})
    return rows


def over_seeds(runs: list[list[dict]], seeds: list[int]) -> list[dict]:
    """One row per model: the mean of its value and exact match over the seeds' runs, with their spread."""
    rows = []
    for first in runs[0]:
        same = [next((r for r in run if r["model"] == first["model"]), None) for run in runs]
        values = [r["value"] for r in same if r and r["value"] is not None and not r["error"]]
        exact = [r["exact"] for r in same if r and isinstance(r.get("exact"), float) and not r["error"]]
        if not values:
            rows.append({**first, "value": None, "seeds": seeds})
            continue
        counts = sorted({r["n"] for r in same if r})
        error = (f"scored on different row counts {counts}" if len(counts) > 1 else
                 None if len(values) == len(runs) else f"{len(runs) - len(values)} run(s) without a value")
        rows.append({**first, "value": round(statistics.mean(values), 4), "exact": round(statistics.mean(exact), 4)
                     if exact else None, "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "values": values, "seeds": seeds, "error": error})
    return rows


def bench_task(task: str, a: argparse.Namespace) -> list[dict]:
    out = a.out / task
    runs, seconds, walls = [], {}, []
    for seed in a.seeds or [None]:
        run_dir = out / ("default" if seed is None else f"default-seed{seed}")
        wall = None
        if a.rerun or not (run_dir / "metrics.json").is_file():
            seeded = [] if seed is None else [f"method.seed={seed}"]
            wall = run_finetune(run_dir, [f"task={task}", *a.overrides, *seeded])
        runs.append(rows_of(task, run_dir, "", wall))
        seconds[run_dir.name] = stage_seconds(run_dir)
        walls.append(wall or sum(seconds[run_dir.name].values()))
    rows = over_seeds(runs, a.seeds) if a.seeds else runs[0]
    finetuned = next((r["value"] for r in rows if r["model"] == "finetuned"), None)
    for shots in a.shots if a.compare else []:
        run_dir = out / f"compare-{shots}shot"
        if a.rerun or not (run_dir / "metrics.json").is_file():
            run_finetune(run_dir, [f"task={task}", *a.overrides, "stages=[data,evaluate]", "evaluate.specialist=false",
                                   f"evaluate.base={'true' if shots else 'false'}", f"evaluate.base_few_shot={shots}",
                                   f"evaluate.compare=[{','.join(a.compare)}]"])
        rows += [r for r in rows_of(task, run_dir, f" ({shots}-shot)", None) if r["model"] != "specialist"]
    for r in rows:
        if finetuned is not None and r["value"] is not None and r["model"].startswith("gguf-"):
            r["kept_of_finetuned"] = round(r["value"] / finetuned, 4) if finetuned else None
    _bench.emit({"task": task, "machine": machine_kind(), "seeds": a.seeds or None,
                 "stage_seconds": seconds if a.seeds else seconds["default"],
                 "run_seconds": walls if a.seeds else walls[0], "rows": rows})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| task | metric | model | value | exact | kept of fine-tuned |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = "error" if r["error"] else (f"{r['value']:.3f}" if r["value"] is not None else "-")
        exact = f"{r['exact']:.2f}" if isinstance(r.get("exact"), float) else "-"
        kept = f"{100 * r['kept_of_finetuned']:.0f}%" if r.get("kept_of_finetuned") else ""
        lines.append(f"| {r['task']} | {r['metric']} | {r['model']} | {value} | {exact} | {kept} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["extraction", "classification", "summarization"])
    p.add_argument("--compare", nargs="*", default=["qwen2.5-0.5b"], help="registry models, zero/few-shot")
    p.add_argument("--shots", nargs="+", type=int, default=[0, 3])
    p.add_argument("--out", type=Path, default=_bench.ROOT / "outputs" / "bench_quality")
    p.add_argument("--seeds", nargs="+", type=int, default=[],
                   help="train once per seed (method.seed); print each model's mean and spread over them")
    p.add_argument("--rerun", action="store_true", help="run again even where metrics.json exists")
    p.add_argument("--markdown", action="store_true", help="also print the README Results table")
    p.add_argument("overrides", nargs="*", help="overrides for every run (after --), e.g. task.data.path=...")
    a = p.parse_args()
    a.out = a.out.resolve()
    print(f"machine: {machine_kind()}", flush=True)
    rows = [r for task in a.tasks for r in bench_task(task, a)]
    spread = ["sd", "min", "max"] if a.seeds else []
    print(_bench.table(rows, ["task", "model", "metric", "value", *spread, "exact", "kept_of_finetuned", "n",
                              "runtime", "error"]))
    if a.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
