"""GPTQ stage: 4-bit GPTQ of the merged model with GPTQModel, calibrated on the task's own prompts.

The result loads with transformers' GPTQ integration (`AutoModelForCausalLM.from_pretrained(gptq_dir)`)
on GPU servers and, slowly, on CPU. GPTQModel is an extra: `pip install 'finetune[gptq]'` (pinned, so
that it does not replace a CPU torch with a CUDA build).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.core.files import dir_size, staged_dir
from finetune.core.rundir import RunDir
from finetune.export.checks import hf_ids
from finetune.export.samples import calibration_rows, task_prompt
from finetune.models.loading import load_tokenizer, render_prompt

log = logging.getLogger("finetune")

GROUP_SIZES = (128, 64, 32)
# Keys GPTQModel may add to quantization_config that describe this calibration run or this machine (a
# temporary path), not the checkpoint format.
_RUN_KEYS = {"calibration", "calibration_dataset", "dataset", "calibration_data", "samples", "offload_to_disk_path"}


def _import_gptqmodel() -> Any:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(4, os.cpu_count() or 1))))
    try:
        import gptqmodel
    except ImportError as exc:
        raise ExportError(
            "export.gptq needs GPTQModel, which is an optional extra: pip install 'finetune[gptq]' "
            "(gptqmodel==7.6.0 pinned with your torch, e.g. pip install gptqmodel==7.6.0 torch==2.13.0, so that "
            f"a CPU torch stays as it is). Or use export=default, which skips GPTQ. ({exc})") from exc
    return gptqmodel


def choose_group_size(config: Any, requested: int | None) -> int:
    """The requested group size, or the largest of 128/64/32 dividing every linear layer's input size."""
    dims = {int(config.hidden_size), int(config.intermediate_size)}
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    if heads and head_dim:
        dims.add(int(heads) * int(head_dim))
    if requested:
        bad = sorted(d for d in dims if d % int(requested))
        if bad:
            raise ExportError(f"export.gptq.group_size={requested} does not divide the model's layer sizes {bad}; "
                              f"leave it unset (null) to pick one that does")
        return int(requested)
    for size in GROUP_SIZES:
        if all(d % size == 0 for d in dims):
            return size
    raise ExportError(f"no GPTQ group size in {GROUP_SIZES} divides the model's layer sizes {sorted(dims)}")


def strip_run_info(gptq_dir: Path) -> list[str]:
    """Remove what describes the calibration run (data, local paths) from config.json / quantize_config.json."""
    removed = []
    for name in ("config.json", "quantize_config.json"):
        path = gptq_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        qc = data.get("quantization_config", data) if name == "config.json" else data
        for section in (qc, qc.get("meta") or {}):
            for key in [k for k in section if k.lower() in _RUN_KEYS]:
                del section[key]
                removed.append(f"{name}:{key}")
        path.write_text(json.dumps(data, indent=2) + "\n")
    return removed


def check_gptq(cfg: Config, run: RunDir, gptq_dir: Path, tokenizer: Any) -> dict:
    """The checkpoint loads through transformers' GPTQ integration and answers the task prompt."""
    import torch
    from transformers import AutoModelForCausalLM


    model = AutoModelForCausalLM.from_pretrained(gptq_dir, device_map="cpu").eval()
    prompt, _ = task_prompt(cfg, run)
    ids = torch.tensor([hf_ids(tokenizer, render_prompt(tokenizer, prompt, cfg.model))])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=cfg.task.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:]
    seconds = time.perf_counter() - start
    qtype = type(next(m for n, m in model.named_modules() if n.endswith("q_proj"))).__name__
    del model
    gc.collect()
    return {"answer": tokenizer.decode(new, skip_special_tokens=True), "tokens": int(new.numel()),
            "tokens_per_s": round(new.numel() / seconds, 2), "q_proj_class": qtype}


def quantize(cfg: Config, run: RunDir) -> dict:
    """Stage `gptq`: run.merged_dir -> run.gptq_dir (4-bit GPTQ safetensors + tokenizer)."""
    qcfg = cfg.export.gptq
    if qcfg is None:
        return {"skipped": "export.gptq is not set"}
    if not (run.merged_dir / "config.json").is_file():
        raise ExportError(f"no merged model in {run.merged_dir}: run the merge stage (export.merge=true) first")
    gptqmodel = _import_gptqmodel()
    from transformers import AutoConfig

    tokenizer = load_tokenizer(cfg.model, path=str(run.merged_dir))
    group_size = choose_group_size(AutoConfig.from_pretrained(run.merged_dir), qcfg.group_size)
    calibration = calibration_rows(cfg, run, tokenizer, qcfg.calibration_samples, cfg.method.max_length)
    quant_config = gptqmodel.QuantizeConfig(bits=qcfg.bits, group_size=group_size, desc_act=qcfg.desc_act)
    start = time.perf_counter()
    model = gptqmodel.GPTQModel.load(str(run.merged_dir), quant_config)
    # GPTQModel writes its per-layer logs to ./logs: keep them in the run directory, not the user's cwd.
    cwd = os.getcwd()
    os.chdir(run.root)
    try:
        model.quantize(calibration, batch_size=1)
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {"bits": qcfg.bits, "group_size": group_size, "desc_act": qcfg.desc_act,
                            "calibration_samples": len(calibration), "quantize_seconds": round(seconds, 1),
                            "gptqmodel": getattr(gptqmodel, "__version__", "?")}
    with staged_dir(run.gptq_dir) as tmp:
        model.save(str(tmp))
        del model
        gc.collect()
        tokenizer.save_pretrained(tmp)
        info["stripped"] = strip_run_info(tmp)
        if cfg.export.verify:
            info["check"] = check_gptq(cfg, run, tmp, tokenizer)
        info["size_bytes"] = dir_size(tmp)
    info["gptq_dir"] = str(run.gptq_dir)
    log.info("GPTQ %d-bit (group %d) in %s, %.0fs", info["bits"], group_size, run.gptq_dir, seconds)
    return info
