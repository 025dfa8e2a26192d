"""Task metric of the exported artifacts of a finished run: merged fp vs GGUF Q8_0 / Q4_K_M vs GPTQ.

    .venv/bin/python scripts/bench_quant.py RUN_DIR [--evaluate] [finetune overrides for the evaluate stage...]

Reads RUN_DIR/metrics.json (written by the evaluate stage on the test split). When it lacks the merged
model or any artifact present in the run dir (merged/, gptq/, gguf/*.gguf), or with --evaluate, it first
runs `python -m finetune stages=[evaluate] run_dir=RUN_DIR` (the run's own model/task/method are taken
from RUN_DIR/run.json). Prints the headline metric, size and generation speed of each, with the delta
against the merged full-precision model (the finetuned adapter model when there is no merged one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

ORDER = ["base", "finetuned", "merged", "gguf-F16", "gguf-Q8_0", "gguf-Q4_K_M", "gptq"]


def expected_models(run_dir: Path) -> set[str]:
    from finetune.evaluate.stage import gguf_name

    want, taken = set(), set()
    if (run_dir / "merged" / "config.json").is_file():
        want.add("merged")
    if (run_dir / "gptq" / "config.json").is_file():
        want.add("gptq")
    for path in sorted((run_dir / "gguf").glob("*.gguf")) if (run_dir / "gguf").is_dir() else []:
        name = gguf_name(path, taken)
        taken.add(name)
        want.add(name)
    return want


def run_evaluate(run_dir: Path, overrides: list[str]) -> None:
    ident = json.loads((run_dir / "run.json").read_text())
    cmd = [sys.executable, "-m", "finetune", f"run_dir={run_dir}", "stages=[evaluate]", f"model={ident['model']}",
           f"task={ident['task']}", f"method={ident['method']}", "evaluate.merged=true", *overrides]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=_bench.ROOT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--evaluate", action="store_true", help="re-run the evaluate stage first")
    p.add_argument("overrides", nargs="*", help="overrides for the evaluate stage, e.g. evaluate.max_examples=50")
    a = p.parse_args()
    run_dir = a.run_dir.resolve()
    metrics_path = run_dir / "metrics.json"
    want = expected_models(run_dir)
    have = set(json.loads(metrics_path.read_text()).get("models", {})) if metrics_path.is_file() else set()
    if a.evaluate or not metrics_path.is_file() or not want <= have:
        if want - have:
            print(f"metrics.json lacks {sorted(want - have)}: running the evaluate stage", flush=True)
        run_evaluate(run_dir, a.overrides)
    metrics = json.loads(metrics_path.read_text())
    key = metrics["headline_metric"]
    models = metrics.get("models", {})
    ref_name = "merged" if "merged" in models else "finetuned"
    ref = models.get(ref_name, {}).get(key)
    names = [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER)
    rows = []
    for name in names:
        m = models[name]
        value = m.get(key)
        rows.append({"model": name, key: value,
                     f"delta_vs_{ref_name}": round(value - ref, 4) if value is not None and ref is not None else None,
                     "n": m.get("n"), "size_MB": round(m["size_bytes"] / 2**20, 1) if m.get("size_bytes") else None,
                     "tokens_per_s": m.get("tokens_per_s"), "runtime": m.get("runtime"),
                     "error": (m.get("error") or "")[:60] or None})
    print(f"task {metrics.get('task')} ({key}, test split, n={metrics.get('n')}), model {metrics.get('model')}, "
          f"method {metrics.get('method')}")
    print(_bench.table(rows, ["model", key, f"delta_vs_{ref_name}", "n", "size_MB", "tokens_per_s", "runtime", "error"]))
    _bench.emit({"run_dir": str(run_dir), "headline_metric": key, "reference": ref_name, "rows": rows})


if __name__ == "__main__":
    main()
