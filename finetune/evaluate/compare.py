"""`finetune-compare RUN_DIR...`: the headline (or any) metric of every evaluated model/artifact, one row
per run directory, from each run's metrics.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.core.errors import FinetuneError, RunDirError
from finetune.evaluate.metrics import SPEED_KEYS, fmt, read_json


def compare_table(run_dirs: list[str], metric: str | None = None) -> list[str]:
    """One row per run, one column per evaluated model/artifact: the headline (or chosen) metric."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        data = read_json(path)
        if not isinstance(data, dict) or "models" not in data:
            raise RunDirError(f"{path} is missing or not a metrics.json; evaluate the run first:\n"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-compare",
        description="Print the headline metric of every evaluated model/artifact across run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metric", help="another metrics.json key instead of each run's headline metric, "
                        "e.g. tokens_per_s or latency_s_mean")
    args = parser.parse_args(argv)
    try:
        print("\n".join(compare_table(args.run_dirs, args.metric)))
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0

