"""Several processes: `accelerate launch` configs, and 2 CPU processes over gloo training like 1 process
at the doubled batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from trainutil import ROOT, finetune_cmd, read_adapter, run_finetune, write_data

from finetune.core.rundir import RunDir

CONFIGS = ROOT / "conf" / "accelerate"
EXPECTED = {
    "ddp.yaml": "MULTI_GPU",
    "cpu_ddp.yaml": "MULTI_GPU",  # the multi-process launcher; the code picks gloo on CPU
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[name]
    assert config.num_processes >= 2 and not config.use_cpu  # use_cpu would start ONE process
    raw = yaml.safe_load((CONFIGS / name).read_text())
    if name.startswith("deepspeed"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-6])
    if name == "fsdp.yaml":
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def _losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "train_log.json").read_text()) if "loss" in h]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_at_the_doubled_batch(tmp_path):
    # fp32 and no dropout: the only difference left is the order of floating-point sums (at lr 2e-4, where
    # the tolerances below were measured; a larger lr scales the weight differences up).
    common = ["method=lora", "method.lr=2e-4", "method.lora_dropout=0", "method.precision=fp32", "method.max_steps=3",
              "method.eval_steps=3", "method.save_steps=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir in (one, two):
        write_data(RunDir(run_dir), n_train=16, n_validation=4)
    run_finetune(finetune_cmd(one, [*common, "method.batch_size=4"]))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(CONFIGS / "cpu_ddp.yaml"), "--num_processes", "2", "--main_process_port", "29533"]
    run_finetune(finetune_cmd(two, [*common, "method.batch_size=2"], launcher=launcher), env={"OMP_NUM_THREADS": "1"})

    summary = RunDir(two).stage_summary("train")
    assert summary["world_size"] == 2 and RunDir(one).stage_summary("train")["world_size"] == 1
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert not (two / ".adapter.tmp").exists()
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    # Measured on 2 CPU cores: the training losses agree to 1.2e-7 relative (float32 summation order);
    # the adapters to 3.5e-6 absolute (weights up to 0.04). The eval loss is not compared: the Trainer
    # averages per-batch means, and 2 ranks make 2 batches of the rows 1 process sees in 1 batch.
    assert b == pytest.approx(a, rel=1e-5), (a, b)
    wa, wb = read_adapter(one / "adapter"), read_adapter(two / "adapter")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-5
