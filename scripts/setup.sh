#!/usr/bin/env bash
# Set up finetune in ./.venv. Used by the README's two commands and by CI.
#   bash scripts/setup.sh         the package and everything the default pipeline needs
#   bash scripts/setup.sh --dev   the same plus the test tools
# Safe to re-run: each step is skipped when already done. The first run builds llama-cpp-python
# from source (about 15 minutes on 2 cores: llama.cpp's CPU kernels once per x86-64 level); pip caches the
# wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
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

echo "finetune is set up in $VENV (torch $TORCH_NOW)"
