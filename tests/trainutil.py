"""Shared by the training, tracking and distributed tests: tiny data in the data stage's row format, tiny
settings, and a run directory whose data stage is marked done (so `stages=[train]` runs on its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune.core.config import compose
from finetune.core.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You extract the parts of a US postal address. Answer with one JSON object."
STREETS = ["Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Lake", "Hill", "Park", "River", "Mill", "Church"]
CITIES = [("Springfield", "IL"), ("Portland", "OR"), ("Austin", "TX"), ("Madison", "WI"), ("Dayton", "OH")]

# A few optimizer steps on short rows: seconds per run on 2 CPU cores, but every real component.
TINY = [
    "method=qlora",  # the product's default method for bigger models (SmolLM2's own default is full; tested apart)
    "method.max_steps=4",
    "method.batch_size=2",
    "method.max_length=128",
    "method.eval_steps=2",
    "method.save_steps=2",
    "method.logging_steps=1",
    "method.warmup_ratio=0",
]


def example(i: int) -> dict:
    street, (city, state) = STREETS[i % len(STREETS)], CITIES[i % len(CITIES)]
    number = str(100 + 7 * i)
    answer = {"AddressNumber": number, "StreetName": street, "StreetNamePostType": "St",
              "PlaceName": city, "StateName": state}
    return {
        "id": f"extraction-{i:06d}",
        "prompt": [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": f"Address: {number} {street} St, {city} {state}"}],
        "completion": [{"role": "assistant", "content": json.dumps(answer)}],
        "reference": answer,
    }


def write_data(run: RunDir, n_train: int = 16, n_validation: int = 4) -> None:
    run.data_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(n_train), "validation": range(n_train, n_train + n_validation),
              "test": range(n_train + n_validation, n_train + 2 * n_validation)}
    for split, ids in splits.items():
        with open(run.data_dir / f"{split}.jsonl", "w") as fh:
            for i in ids:
                fh.write(json.dumps(example(i)) + "\n")
    run.mark_done("data", {"note": "written by the test"})


def tiny_run(tmp_path: Path, overrides: list[str], n_train: int = 16, n_validation: int = 4):
    """(cfg, run) for a run directory with data in place."""
    run = RunDir(tmp_path)
    write_data(run, n_train, n_validation)
    cfg = compose([*TINY, *overrides, f"run_dir={tmp_path}"])
    return cfg, run


def finetune_cmd(run_dir: Path, overrides: list[str], launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "finetune", "stages=[train]", *TINY, *overrides,
            f"run_dir={run_dir}"]


def run_finetune(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    return proc


def read_adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))
