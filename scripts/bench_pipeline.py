"""Wall time of each stage of the default pipeline (`python -m finetune` in a subprocess, fresh run dir).

    .venv/bin/python scripts/bench_pipeline.py [--run-dir DIR] [finetune overrides...]
    e.g. ... method.max_steps=4 'stages=[data,train,merge]'

Reads run_dir/stages/<stage>.json (each has "seconds", written by finetune.pipeline) after the run and
prints them with the total and the process's wall time (imports, model resolution and Hydra included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from finetune.pipeline import stage_names  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None, help="default: a new temporary directory")
    p.add_argument("--log", default=None, help="file for the pipeline's output (default: run_dir/bench.log)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="bench_pipeline_")) / "run"
    cmd = [sys.executable, "-m", "finetune", f"run_dir={run_dir}", *a.overrides]
    log_path = Path(a.log) if a.log else run_dir.parent / "bench.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print("running:", " ".join(cmd), f"(log: {log_path})", flush=True)
    start = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, cwd=_bench.ROOT, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - start
    stages_dir = run_dir / "stages"
    rows = []
    for stage in stage_names():
        marker = stages_dir / f"{stage}.json"
        if marker.is_file():
            summary = json.loads(marker.read_text())
            rows.append({"stage": stage, "seconds": summary.get("seconds")})
    total = round(sum(r["seconds"] or 0 for r in rows), 1)
    for r in rows:
        r["share"] = f"{100 * (r['seconds'] or 0) / total:.0f}%" if total else "-"
    rows.append({"stage": "TOTAL (stages)", "seconds": total})
    rows.append({"stage": "process wall", "seconds": round(wall, 1)})
    print(_bench.table(rows, ["stage", "seconds", "share"]))
    machine = _bench.machine()
    print(f"exit code {proc.returncode}; load average before {[round(x, 2) for x in load_before]}, "
          f"after {machine['load_avg']}; run dir {run_dir}")
    if proc.returncode:
        print("last lines of the log:\n" + "\n".join(log_path.read_text().splitlines()[-15:]))
    _bench.emit({"run_dir": str(run_dir), "exit_code": proc.returncode, "overrides": a.overrides,
                 "stages": {r["stage"]: r["seconds"] for r in rows[:-2]}, "total_s": total,
                 "wall_s": round(wall, 1), "load_before": load_before, "machine": machine})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
