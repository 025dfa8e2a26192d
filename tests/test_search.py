"""The recipe search through Hydra's Optuna sweeper (`-m hydra/sweeper=finetune`, conf/hydra/sweeper/finetune.yaml):
real trials of the packaged SmolLM2 with tiny settings, each its own run directory, maximising the validation
task metric that the train stage records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.core.config import compose
from finetune.core.errors import DataError
from finetune.core.rundir import RunDir
from finetune.pipeline import objective
from trainutil import ROOT, TINY, run_finetune

# Few short rows, two validation rows answered with a short answer budget: seconds of work per trial.
# TINY's fixed `method=` is left out: the method is one of the searched dimensions.
SMALL = [*(o for o in TINY if not o.startswith("method=")), "task.data.max_train_examples=16",
         "task.data.max_eval_examples=4", "method.metric_examples=2", "task.max_new_tokens=48"]


def sweep_cmd(sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "-m", "hydra/sweeper=finetune", "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}", *overrides]


def trial_overrides(trial: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text()))


def logged_objective(trial: Path) -> float:
    lines = [line for line in (trial / "__main__.log").read_text().splitlines() if "objective: validation" in line]
    assert len(lines) == 1, lines
    return float(lines[0].split(" = ")[1].split()[0])


@pytest.mark.slow
def test_two_trial_search_returns_each_runs_validation_metric(tmp_path):
    sweep = tmp_path / "sweep"
    run_finetune(sweep_cmd(sweep, "stages=[data,train]", *SMALL), timeout=900)

    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [t.name for t in trials] == ["0", "1"]
    values = {}
    for trial in trials:
        summary = json.loads((trial / "stages" / "train.json").read_text())
        validation = summary["validation"]
        assert validation["n"] == 2 and math.isfinite(validation["field_f1"])
        # What the trial returned to Optuna is the train stage's validation metric of that run.
        assert logged_objective(trial) == pytest.approx(validation["field_f1"], abs=1e-12)
        values[trial.name] = validation["field_f1"]
        overrides = trial_overrides(trial)
        # The sampled config group really selects the method: the run trained what Optuna chose.
        assert overrides["method"] in ("lora", "full")
        assert json.loads((trial / "run.json").read_text())["method"] == overrides["method"] == summary["method"]
        assert float(overrides["method.lr"]) == pytest.approx(
            yaml.safe_load((trial / "config.yaml").read_text())["method"]["lr"])
        # The run records the trial's own overrides: a single run that reproduces it, not the sweep.
        command = json.loads((trial / "run.json").read_text())["command"]
        assert command.startswith("python -m finetune method=") and "hydra/sweeper" not in command
        # Nothing but data and training ran: the test split plays no part in the objective.
        assert list(json.loads((trial / "this_run.json").read_text())["stages"]) == ["data", "train"]
    # The seeded split: every trial trains and is scored on the same rows.
    for split in ("train", "validation", "test"):
        assert (trials[0] / "data" / f"{split}.jsonl").read_bytes() == (trials[1] / "data" / f"{split}.jsonl").read_bytes()

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    assert result["best_value"] == pytest.approx(max(values.values()))
    best = [t for t in trials if values[t.name] == pytest.approx(result["best_value"])]
    searched = set(result["best_params"])
    assert {"method", "method.lr", "method.lora_r", "method.lora_alpha", "method.best_by"} <= searched
    # method.batch_size is fixed on the command line (TINY), which takes it out of the search space.
    assert "method.batch_size" not in searched
    assert any(all(str(trial_overrides(t)[k]) == str(v) for k, v in result["best_params"].items()) for t in best)


@pytest.mark.slow
def test_a_diverged_trial_fails_alone_and_the_search_goes_on(tmp_path):
    # lr=1e6 saturates SmolLM2 at step 2 (tests/test_train.py): every trial diverges, each is recorded as
    # failed and the next one still runs; with no trial completed, Optuna has no best trial to report.
    sweep = tmp_path / "sweep"
    proc = subprocess.run(sweep_cmd(sweep, "stages=[data,train]", *SMALL, "method=lora", "method.lr=1e6",
                                    "method.max_steps=6"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert out.count("error: [train] training diverged at step 2") == 2, out[-4000:]
    assert out.count("Failed experiment: training diverged") == 2, out[-4000:]
    assert "No trials are completed yet" in out
    for trial in ("0", "1"):
        assert (sweep / trial / "stages" / "data.json").is_file()
        assert not (sweep / trial / "stages" / "train.json").exists()
    assert not (sweep / "optimization_results.yaml").exists()


def test_a_search_without_training_stops_at_the_first_trial(tmp_path):
    # The same config error would fail every trial: the sweep ends at once with the config exit code.
    sweep = tmp_path / "sweep"
    proc = subprocess.run(sweep_cmd(sweep, "stages=[data]"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "a hyper-parameter search needs a validation task metric" in proc.stderr
    assert "stages=[data,train]" in proc.stderr
    assert not (sweep / "1").exists() and not (sweep / "0" / "run.json").exists()


def test_a_trial_without_validation_rows_has_no_objective(tmp_path):
    cfg, run = compose([f"run_dir={tmp_path}"]), RunDir(tmp_path)
    run.mark_done("train", {"validation": None})  # what the train stage records when no row was scored
    with pytest.raises(DataError, match=r"no validation field_f1.*validation_fraction"):
        objective(cfg, run)
    run.mark_done("train", {"validation": {"n": 3, "field_f1": 0.5, "exact_match": 0.0}})
    assert objective(cfg, run) == 0.5
