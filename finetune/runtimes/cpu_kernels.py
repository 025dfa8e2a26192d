"""llama.cpp's CPU kernels, chosen for this CPU when the process first opens a GGUF.

On Linux x86-64, scripts/setup.sh builds llama-cpp-python with `GGML_BACKEND_DL` and `GGML_CPU_ALL_VARIANTS`:
one `libggml-cpu-<variant>.so` per x86-64 level (x64 and sse42 up to haswell's AVX2, skylakex and icelake's
AVX-512, cooperlake and zen4's AVX512-BF16, sapphirerapids' AMX), so the wheel pip caches runs on any x86-64
CPU and still uses the widest instructions each one has. ggml installs them where CMake puts executables:
`bin/` at the wheel's root, i.e. site-packages/bin (a `GGML_BACKEND_DIR` inside the `llama_cpp` package is
dropped from the wheel, which takes that folder from the package's sources). ggml scores each variant against
the CPU (`ggml_backend_score`: 0 where an instruction it was built with is missing) and loads the best, but
only from folders it searches by itself (the executable's, the working one), and llama-cpp-python 0.3.36 does
not call its loader (abetlen/llama-cpp-python#2069: "no backends are loaded"). So every GGUF is opened after
`load_cpu_kernels()`, which does what `ggml_backend_load_all()` would do with that folder. A build with the
kernels linked into libggml (no variant files: another OS, or a user's own CMAKE_ARGS) needs nothing.

`GGML_BACKEND_PATH` (ggml's own variable) names one variant file to load instead of the best, e.g. to compare
two of them (scripts/bench_cpu_kernels.py) or to get the same answers on two CPUs: answers are not
bit-identical across variants. A `python -m llama_cpp.server` started outside finetune needs it too
(`python -m finetune.runtimes.cpu_kernels` prints the best variant's path).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path


def variant_dir() -> Path:
    """Where the wheel put llama.cpp's CPU kernel variants: `bin/` beside the `llama_cpp` package."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent.parent / "bin"


def variants() -> list[Path]:
    """The CPU kernel variants the build ships; empty for a build with the kernels linked into libggml."""
    return sorted(variant_dir().glob("libggml-cpu-*.so"))


def variant_name(path: Path) -> str:
    return path.name.removeprefix("libggml-cpu-").removesuffix(".so")


@functools.cache
def best_variant() -> Path | None:
    """The variant ggml's own loader would pick on this CPU: the highest `ggml_backend_score`, or the file
    `GGML_BACKEND_PATH` names. None for a build without variants."""
    import llama_cpp  # noqa: F401  (loads libggml-base, which every variant links against)

    if os.environ.get("GGML_BACKEND_PATH"):
        path = Path(os.environ["GGML_BACKEND_PATH"])
        if not path.is_file():
            raise RuntimeError(f"GGML_BACKEND_PATH={path}: no such file (the CPU variants are in {variant_dir()})")
        return path
    scores = {path: ctypes.CDLL(str(path)).ggml_backend_score() for path in variants()}
    if not scores:
        return None
    best = max(scores, key=lambda p: scores[p])
    if scores[best] <= 0:
        raise RuntimeError(f"none of llama.cpp's CPU kernel variants in {variant_dir()} runs on this CPU "
                           f"({', '.join(variant_name(p) for p in scores)})")
    return best


@functools.cache
def load_cpu_kernels() -> str | None:
    """Register the best CPU variant with ggml, once per process and before the first model is loaded;
    its name ("icelake", "haswell", ...), or None where the kernels are linked in."""
    best = best_variant()
    if best is None:
        return None
    import llama_cpp

    # libggml through libllama's handle: dlsym searches libllama's own dependencies, so this is the copy it
    # uses (the wheel ships libggml.so, .so.0 and .so.0.25.3 as three files: dlopen of another is another ggml)
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if ggml.ggml_backend_reg_count() == 0 and not ggml.ggml_backend_load(str(best).encode()):
        raise RuntimeError(f"ggml could not load llama.cpp's CPU kernels from {best}")
    return variant_name(best)


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a child process that loads GGUFs with llama-cpp-python by itself
    (`python -m llama_cpp.server`): the same CPU variant this process uses."""
    out = dict(os.environ if env is None else env)
    best = best_variant()
    if best is not None:
        out["GGML_BACKEND_PATH"] = str(best)
    return out


if __name__ == "__main__":
    best = best_variant()
    print(best if best is not None else "")
