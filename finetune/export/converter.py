"""llama.cpp's export tools: find (or fetch once) its HF -> GGUF converter, and quantize GGUFs.

The converter `convert_hf_to_gguf.py` must match the llama.cpp that runs the result, and it needs the
`gguf-py` next to it (PyPI's `gguf` lags behind and fails with it). Both ship in the sdist of the
installed llama-cpp-python under vendor/llama.cpp/; we extract just the converter, its `conversion/`
package and `gguf-py/gguf` into a cache directory, once.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.core.cache import cache_root, file_lock
from finetune.core.errors import ExportError
from finetune.core.hardware import cpu_threads
from finetune.core.fingerprint import file_sha256, paths_sha256
from finetune.core.processes import run_child

log = logging.getLogger("finetune")

DEFAULT_VERSION = "0.3.36"
# sha256 of the llama-cpp-python sdists whose vendored converter we run (the files PyPI serves).
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
CONVERTER = "convert_hf_to_gguf.py"
# What the converter imports from its own checkout (the rest of llama.cpp is C++ we do not need).
_KEEP = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE")

# Quant type names (as llama.cpp's `llama-quantize` spells them) -> llama_cpp.LLAMA_FTYPE_* constants.
QUANT_TYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def converter_dir(version: str | None = None, fetch: bool = True) -> Path:
    """Directory holding convert_hf_to_gguf.py + conversion/ + gguf-py/ for this llama-cpp-python.

    Looked up in $FINETUNE_LLAMA_CPP_DIR (a llama.cpp checkout), then the cache
    ($FINETUNE_CACHE or ~/.cache/finetune)/llama.cpp-<version>; fetched into the cache if missing.
    """
    override = os.environ.get("FINETUNE_LLAMA_CPP_DIR")
    if override:
        path = Path(override).expanduser()
        if not (path / CONVERTER).is_file():
            raise ExportError(f"FINETUNE_LLAMA_CPP_DIR={path} has no {CONVERTER}")
        return path
    version = version or llama_cpp_version()
    dest = cache_root() / f"llama.cpp-{version}"
    if intact(dest):
        return dest
    if not fetch:
        raise ExportError(f"llama.cpp's converter is not in {dest}; run scripts/fetch_llama_cpp_converter.py")
    with file_lock(dest.parent / f".llama.cpp-{version}.lock"):
        if not intact(dest):
            if dest.exists():
                log.warning("%s does not match the manifest written when it was extracted: fetching it again", dest)
            fetch_converter(version, dest)
    return dest


MANIFEST = "MANIFEST.sha256"


def _tree_sha256(folder: Path) -> str:
    return paths_sha256([p for p in folder.iterdir() if p.name != MANIFEST], folder)


def intact(folder: Path) -> bool:
    """The extracted converter is what was extracted from the verified sdist (its manifest matches)."""
    manifest = folder / MANIFEST
    return (folder / CONVERTER).is_file() and manifest.is_file() and manifest.read_text().strip() == _tree_sha256(folder)


def download_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python sdist, checked against its pinned sha256 before anything in it is used:
    $FINETUNE_LLAMA_CPP_SDIST if set, else `pip download` (no build)."""
    given = os.environ.get("FINETUNE_LLAMA_CPP_SDIST")
    if given:
        return verified_sdist(Path(given).expanduser(), version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into)]
    log.info("fetching llama.cpp's converter (once): %s", " ".join(cmd))
    proc = run_child(cmd)
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ExportError(
            f"could not download the llama-cpp-python=={version} sdist that carries llama.cpp's converter:\n"
            f"{proc.stderr[-2000:]}\nDownload it where you have network and set FINETUNE_LLAMA_CPP_SDIST=/path/to/"
            f"llama_cpp_python-{version}.tar.gz, or FINETUNE_LLAMA_CPP_DIR=/path/to/llama.cpp (a checkout).")
    return verified_sdist(found[0], version)


def verified_sdist(path: Path, version: str) -> Path:
    """`path` if its sha256 is the one pinned for this version (SDIST_SHA256, or $FINETUNE_LLAMA_CPP_SDIST_SHA256
    for a version we have not pinned); ExportError otherwise: the converter runs as code on this machine."""
    expected = os.environ.get("FINETUNE_LLAMA_CPP_SDIST_SHA256") or SDIST_SHA256.get(version)
    if expected is None:
        raise ExportError(f"no pinned sha256 for the llama-cpp-python=={version} sdist (pinned: {sorted(SDIST_SHA256)}); "
                          f"check the file yourself and set FINETUNE_LLAMA_CPP_SDIST_SHA256=<its sha256>")
    got = file_sha256(path)
    if got != expected:
        raise ExportError(f"{path}: sha256 {got} is not the pinned {expected} of llama-cpp-python=={version}; "
                          f"refusing to run the converter from it")
    return path


def fetch_converter(version: str, dest: Path) -> Path:
    """Extract the converter and its gguf-py from the sdist into `dest`, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-llama.cpp-", dir=dest.parent) as tmp:
        sdist = download_sdist(version, Path(tmp))
        out = Path(tmp) / "extract"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                    continue
                rel = parts[1][len("vendor/llama.cpp/"):]
                if (m.isfile() or m.isdir()) and any(rel == k or rel.startswith(k) for k in _KEEP):
                    m.name = rel
                    members.append(m)
            tar.extractall(out, members=members, filter="data")
        if not (out / CONVERTER).is_file() or not (out / "gguf-py" / "gguf").is_dir():
            raise ExportError(f"{sdist.name} has no vendor/llama.cpp/{CONVERTER} with gguf-py")
        (out / "SOURCE.txt").write_text(f"Extracted from {sdist.name} (vendor/llama.cpp), MIT licence.\n")
        (out / MANIFEST).write_text(_tree_sha256(out) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    log.info("llama.cpp converter ready in %s", dest)
    return dest


def vendored_env(conv: Path) -> dict:
    """Environment for a child that imports the vendored gguf-py (and the converter's own modules) first."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(conv / "gguf-py"), str(conv)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the converter's folder stays as extracted (its manifest)
    return env


def convert_hf_to_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", model_name: str | None = None) -> float:
    """Run llama.cpp's converter in a subprocess (vendored gguf-py first on the path); returns seconds.

    `model_name` becomes the GGUF's general.name (else the converter takes the folder name). llama.cpp reads
    tokenizer rules from it: only a model named like Phi-3 gets Phi-3's whitespace stripping after chat tokens."""
    conv = converter_dir()
    env = vendored_env(conv)
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, str(conv / CONVERTER), str(model_dir), "--outfile", str(out_path), "--outtype", outtype]
    if model_name:
        cmd += ["--model-name", model_name]
    start = time.perf_counter()
    proc = run_child(cmd, env=env)
    if proc.returncode != 0 or not out_path.is_file():
        raise ExportError(
            f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}):\n"
            f"$ {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - start


def normalize_quant_type(name: str, where: str = "export.gguf.quant_types") -> str:
    key = str(name).upper()
    if key not in QUANT_TYPES:
        raise ExportError(f"{where}: unknown quant type {name!r}; known: {', '.join(QUANT_TYPES)}")
    return key


def gguf_config_problems(gcfg: Any) -> list[str]:
    """What is wrong in export.gguf before anything runs: unknown quant types (exported or overridden), a
    regex that does not compile, a ggml type that does not exist. Overrides of a known type that is not
    exported are left unused (the default carries Q4_K_M's; export.gguf.quant_types=[Q8_0] must still run)."""
    import gguf

    problems = []
    named = [(quant, "export.gguf.quant_types") for quant in gcfg.quant_types]
    named += [(quant, f"export.gguf.tensor_types.{quant}") for quant in gcfg.tensor_types or {}]
    for quant, where in named:
        try:
            normalize_quant_type(quant, where)
        except ExportError as exc:
            problems.append(str(exc))
    for quant, overrides in (gcfg.tensor_types or {}).items():
        where = f"export.gguf.tensor_types.{quant}"
        for pattern, ggml_type in (overrides or {}).items():
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{where}: {pattern!r} is not a regular expression ({exc})")
            if str(ggml_type).upper() not in gguf.GGMLQuantizationType.__members__:
                problems.append(f"{where}.{pattern}: unknown ggml type {ggml_type!r}; e.g. Q4_K, Q5_K, Q6_K, Q8_0, F16")
    return problems


def tensor_types_for(gcfg: Any, quant: str) -> dict[str, str]:
    """export.gguf.tensor_types of one quant type (any spelling of its name), types upper-cased."""
    found = next((v for k, v in (gcfg.tensor_types or {}).items() if str(k).upper() == quant.upper()), None)
    return {str(pattern): str(t).upper() for pattern, t in (found or {}).items()}


def quantize_gguf(src: Path, dst: Path, quant_type: str, n_threads: int | None = None,
                  imatrix: Path | None = None, tensor_types: dict[str, str] | None = None) -> float:
    """llama.cpp's quantizer (llama-cpp-python's binding, in a child process: finetune.export.llama_quantize),
    with an importance matrix (finetune.export.imatrix) and per-tensor type overrides ({tensor-name regex:
    ggml type}, as `llama-quantize --tensor-type`) when given; returns seconds."""
    ftype = QUANT_TYPES[normalize_quant_type(quant_type)]
    cmd = [sys.executable, "-m", "finetune.export.llama_quantize", str(src), str(dst), ftype,
           str(n_threads or cpu_threads())]
    env = None
    if imatrix is not None:  # the GGUF's tensor names come from the vendored gguf-py, as in the converter
        cmd += ["--imatrix", str(imatrix)]
        env = vendored_env(converter_dir())
    if tensor_types:
        cmd += ["--tensor-types", json.dumps(tensor_types)]
    start = time.perf_counter()
    proc = run_child(cmd, env=env)
    if proc.returncode != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant_type} (return code "
                          f"{proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start
