"""llama.cpp's CPU kernels: setup.sh's build ships one variant per x86-64 level, and the process loads the one
that uses what this CPU has (docs/llamacpp-batching.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from finetune.core.config import compose
from finetune.core.hardware import cpu_flags
from finetune.models.gguf_source import packaged_gguf_path
from finetune.runtimes.cpu_kernels import best_variant, variant_dir, load_cpu_kernels, variant_name, variants
from finetune.runtimes.llamacpp import open_gguf

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the variants are x86-64 levels")

# llama_print_system_info's name for each feature (compiled into the loaded variant) -> /proc/cpuinfo's flag
FEATURES = {"AVX2": "avx2", "FMA": "fma", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
            "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}


def test_the_build_ships_every_x86_64_level():
    names = {variant_name(p) for p in variants()}
    assert {"x64", "sse42", "haswell", "skylakex", "icelake", "cooperlake", "zen4", "sapphirerapids"} <= names, \
        f"{variant_dir()}: {sorted(names)} (scripts/setup.sh builds with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS)"


def test_the_loaded_kernels_use_what_this_cpu_has():
    import llama_cpp

    flags = cpu_flags()
    name = load_cpu_kernels()
    assert name == variant_name(best_variant())
    with open_gguf(packaged_gguf_path(compose([]).model), n_ctx=256) as llm:  # a model loads and answers on them
        assert llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    info = llama_cpp.llama_print_system_info().decode()
    for feature, flag in FEATURES.items():
        assert (f"{feature} = 1" in info) == (flag in flags), \
            f"{name}: llama.cpp reports {feature} {'on' if f'{feature} = 1' in info else 'off'}, the CPU " \
            f"{'has' if flag in flags else 'lacks'} {flag}: {info}"


def test_a_variant_can_be_named_and_a_child_server_gets_the_same(tmp_path):
    """GGML_BACKEND_PATH picks one variant (both in this process's children and in finetune's loader)."""
    haswell = variant_dir() / "libggml-cpu-haswell.so"
    code = ("from finetune.runtimes.cpu_kernels import load_cpu_kernels; import llama_cpp; print(load_cpu_kernels());"
            "print(llama_cpp.llama_print_system_info().decode())")
    env = {**os.environ, "GGML_BACKEND_PATH": str(haswell)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "haswell"
    assert "AVX2 = 1" in out and "AVX512 = 1" not in out
    env["GGML_BACKEND_PATH"] = str(tmp_path / "libggml-cpu-none.so")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "GGML_BACKEND_PATH" in proc.stderr and "no such file" in proc.stderr
