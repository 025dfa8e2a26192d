"""GGUF stage: the merged checkpoint -> GGUF f16 (llama.cpp's own converter) -> each quant type (with
export.gguf.imatrix_samples > 0, the low-bit ones weighted by an importance matrix of the task's training
examples: finetune.export.imatrix).

Files: run.gguf_dir/<model>-<task>-<QUANT>.gguf. Everything is written into a `.tmp-*` folder and
checked there (llama.cpp loads it, tokenizes the task prompt as transformers does, answers it; the
f16 file predicts the merged model's next tokens) before the set replaces the previous GGUFs.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.core.files import TMP_PREFIX, clean_stale
from finetune.core.rundir import RunDir
from finetune.export.checks import check_prompt_tokens, generate, top1_agreement
from finetune.export.converter import convert_hf_to_gguf, normalize_quant_type, quantize_gguf, tensor_types_for
from finetune.export.imatrix import USES_IMATRIX, write_imatrix
from finetune.export.samples import task_prompt
from finetune.models.loading import load_tokenizer, render_prompt
from finetune.runtimes.llamacpp import open_gguf

log = logging.getLogger("finetune")

# Below this the f16 file is compared with the merged model position by position (cheap for small models).
TOP1_CHECK_MAX_BYTES = 4 << 30
TOP1_MIN_AGREEMENT = 0.9


def gguf_model_name(cfg: Config) -> str:
    """general.name of the exported GGUF: base model repository + task, e.g. Phi-3-mini-4k-instruct-extraction."""
    return f"{cfg.model.hub_id.rsplit('/', 1)[-1]}-{cfg.task.name}"


def check_gguf(cfg: Config, path: Path, tokenizer: Any, prompt: list[dict], hf_model: Any = None) -> dict:
    """llama.cpp loads the file, tokenizes the task prompt like transformers and answers it."""
    text = render_prompt(tokenizer, prompt, cfg.model)
    with open_gguf(path, n_ctx=2048, n_threads=cfg.evaluate.n_threads, logits_all=hf_model is not None) as llm:
        ids = check_prompt_tokens(llm, tokenizer, text, path.name)
        info = {"prompt_tokens": len(ids)}
        if hf_model is not None:
            info.update(top1_agreement(llm, hf_model, ids))
            if info["top1_agreement"] < TOP1_MIN_AGREEMENT:
                raise ExportError(
                    f"{path.name}: llama.cpp's next-token predictions agree with the merged model at only "
                    f"{info['top1_agreement']:.0%} of {len(ids)} prompt positions (< {TOP1_MIN_AGREEMENT:.0%}): "
                    f"the conversion is wrong")
            llm.reset()
        info.update(generate(llm, ids, list(cfg.model.stop_tokens), cfg.task.max_new_tokens))
    return info


def _merged_model_if_small(run: RunDir) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    size = sum(p.stat().st_size for p in run.merged_dir.glob("*.safetensors"))
    if size > TOP1_CHECK_MAX_BYTES:
        return None
    return AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32).eval()


def export_gguf(cfg: Config, run: RunDir) -> dict:
    """Stage `gguf`."""
    gcfg = cfg.export.gguf
    if gcfg is None:
        return {"skipped": "export.gguf is not set"}
    if not (run.merged_dir / "config.json").is_file():
        raise ExportError(f"no merged model in {run.merged_dir}: run the merge stage (export.merge=true) first")
    quants = [normalize_quant_type(q) for q in gcfg.quant_types]
    wanted = list(dict.fromkeys(quants + (["F16"] if gcfg.keep_f16 else [])))
    if not wanted:
        raise ExportError("export.gguf.quant_types is empty and keep_f16 is false: nothing to export")
    run.gguf_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(run.gguf_dir)
    tokenizer = load_tokenizer(cfg.model, path=str(run.merged_dir))
    prompt, _ = task_prompt(cfg, run)
    summary: dict[str, Any] = {"files": {}}
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}gguf-", dir=run.gguf_dir))
    try:
        f16 = tmp / run.gguf_path(cfg.model.name, cfg.task.name, "F16").name
        summary["convert_seconds"] = round(convert_hf_to_gguf(run.merged_dir, f16, "f16", gguf_model_name(cfg)), 1)
        log.info("converted %s to GGUF f16 in %.1fs (%.0f MB)", run.merged_dir, summary["convert_seconds"],
                 f16.stat().st_size / 1e6)
        weighted = gcfg.imatrix_samples > 0 and any(q in USES_IMATRIX for q in wanted)
        hf_model = _merged_model_if_small(run) if cfg.export.verify or weighted else None
        if cfg.export.verify:
            summary["f16_check"] = check_gguf(cfg, f16, tokenizer, prompt, hf_model)
        imatrix = None
        if weighted and hf_model is None:
            log.info("GGUF importance matrix skipped: the merged model is over %d GB, too big to run through "
                     "transformers here; the low-bit types are quantized without one", TOP1_CHECK_MAX_BYTES >> 30)
            summary["imatrix"] = {"skipped": f"merged model over {TOP1_CHECK_MAX_BYTES >> 30} GB"}
        elif weighted:
            summary["imatrix"] = write_imatrix(cfg, run, hf_model, tokenizer, tmp / "imatrix.npz")
            imatrix = None if "skipped" in summary["imatrix"] else tmp / "imatrix.npz"
        del hf_model
        gc.collect()
        for quant in wanted:
            path = tmp / run.gguf_path(cfg.model.name, cfg.task.name, quant).name
            info: dict[str, Any] = {}
            if quant != "F16":
                use = imatrix if quant in USES_IMATRIX else None
                types = tensor_types_for(gcfg, quant)
                info["quantize_seconds"] = round(quantize_gguf(f16, path, quant, imatrix=use, tensor_types=types), 1)
                info["imatrix"] = use is not None
                if types:
                    info["tensor_types"] = types
            if cfg.export.verify and quant != "F16":
                info["check"] = check_gguf(cfg, path, tokenizer, prompt)
            elif cfg.export.verify:
                info["check"] = summary["f16_check"]
            info["size_bytes"] = path.stat().st_size
            summary["files"][quant] = info
            log.info("%s: %.0f MB%s", path.name, info["size_bytes"] / 1e6,
                     f", answer {info['check']['answer'][:80]!r}" if "check" in info else "")
        if "F16" not in wanted:
            f16.unlink()
        # All files are complete and checked: replace the previous set (and the ollama stage's files) at once.
        for old in run.gguf_files(cfg.model.name, cfg.task.name) + list(run.gguf_dir.glob("Modelfile.*")):
            old.unlink()
        run.answer_schema_path.unlink(missing_ok=True)
        run.answer_grammar_path.unlink(missing_ok=True)
        for quant in wanted:
            final = run.gguf_path(cfg.model.name, cfg.task.name, quant)
            os.replace(tmp / final.name, final)
            summary["files"][quant]["path"] = str(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
