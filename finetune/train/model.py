"""The model training starts from, and the precision it trains in.

    precision: bf16 on CUDA (fp16 where bf16 is missing) and on CPUs with AVX512-BF16, else fp32
    qlora: bitsandbytes NF4 base + LoRA (on CUDA; on a CPU the LoRA trains on the fp32 base unless
           method.cpu_4bit=true); lora: LoRA on the base; full: every weight
"""

from __future__ import annotations

import logging
from typing import Any

from finetune.core.config import Config, MethodConfig
from finetune.core.distributed import local_rank, sharded
from finetune.core.errors import ConfigError
from finetune.core.hardware import cpu_bf16_faster
from finetune.models.loading import load_model

log = logging.getLogger("finetune")


def resolve_precision(method: MethodConfig, device: str) -> str:
    """'bf16' | 'fp16' | 'fp32': the mixed-precision mode of the trainer (weights stay fp32 or 4-bit)."""
    import torch

    precision = str(method.precision)
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_faster() else "fp32"  # measured: some AVX512-BF16 CPUs are faster in fp32
    if precision == "fp16" and device != "cuda":
        raise ConfigError("method.precision=fp16 needs a CUDA GPU; on CPU use bf16 (if supported) or fp32.")
    return precision


def compute_dtype(precision: str) -> Any:
    """The torch dtype of a precision mode (fp32 for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def keep_4bit_layout_for_training(model: Any) -> int:
    """Keep bitsandbytes from repacking 4-bit weights during evaluation on CPUs with AVX512-BF16.

    On such CPUs, the first forward of a Linear4bit in eval mode without gradients converts its weight, for
    good, into a packed CPU layout whose matmuls differ from the unpacked ones in the last bits. A run that
    evaluated at step 2 then trained steps 3.. on packed weights, and the same run resumed from step 2's
    checkpoint trained them on unpacked ones: adapters 2e-4 apart (measured; without evaluation, or on CPUs
    without AVX512-BF16, resume is bit-identical). Training keeps one layout; returns the layers changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def freeze_embeddings(model: Any) -> int:
    """Stop training the input embedding, and with it the output head where the two share one matrix (SmolLM2,
    Qwen2.5 0.5B, Gemma, Llama 3.2): no dense vocabulary-sized gradient to fill and sum, no head weight gradient,
    no Adam state for it. Returns the parameters frozen."""
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(False)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is weight
    log.info("embedding frozen (%s parameters%s)", f"{weight.numel():,}", ", the output head tied to it" if tied else "")
    return weight.numel()


def frozen_layer_count(first: float, layers: int) -> int:
    """method.frozen_layers as a count of a model's first decoder layers: `first` itself (>= 1) or that share of
    `layers` (0 < first < 1, rounded down); a clear error for anything else."""
    count = first >= 1
    n = int(first) if count else int(first * layers)
    if (count and n != first) or not 0 <= n < layers:
        raise ConfigError(f"method.frozen_layers={first}: this model has {layers} decoder layers; give a "
                          f"count from 1 to {layers - 1}, a share between 0 and 1, or 0 to train them all.")
    return n


def freeze_layers(model: Any, first: float) -> int:
    """Stop training the first decoder layers: `first` of them (a count, >= 1) or that share of the model's
    layers (0 < first < 1, rounded down). With the embedding frozen too nothing below the first trained layer
    needs a gradient, so the backward pass stops there (a frozen layer costs its forward only, and holds no Adam
    state); with the embedding trained the backward still runs through them for it. Returns the parameters
    frozen."""
    layers = model.get_decoder().layers
    n = frozen_layer_count(first, len(layers))
    frozen = 0
    for layer in layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    if n:
        log.info("decoder layers 0-%d of %d frozen (%s parameters)", n - 1, len(layers), f"{frozen:,}")
    return frozen


BF16_COPY = "_finetune_bf16_copy"  # attribute of a frozen weight: (version, data pointer, its bf16 copy)


def bf16_weight(weight: Any) -> Any:
    """The bf16 copy of a frozen fp32 CPU weight while CPU autocast runs in bf16, else None. Autocast casts a
    weight in every forward, but it keeps casts only of weights that train: a frozen layer's weight (12 decoder
    layers and SmolLM2's tied head in the CPU default) was cast again on every step. The copy is cast once, and
    again only if the weight is changed in place or replaced; it is the tensor autocast would have made (the same
    rounding), so products, loss and gradients are unchanged, and the fp32 weight stays what is saved."""
    import torch

    if (weight.requires_grad or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16):
        return None
    key = (weight._version, weight.data_ptr())
    cached = getattr(weight, BF16_COPY, None)
    if cached is None or cached[:2] != key:
        cached = (*key, weight.detach().to(torch.bfloat16))
        setattr(weight, BF16_COPY, cached)
    return cached[2]


def _linear_with_bf16_copy(self: Any, x: Any) -> Any:
    import torch.nn.functional as F

    weight = bf16_weight(self.weight)
    return F.linear(x, self.weight if weight is None else weight, self.bias)


def keep_bf16_copies(model: Any) -> int:
    """Frozen torch Linear layers (a LoRA's base layers, full fine-tuning's frozen layers and tied head) compute
    with bf16_weight's copy under CPU bf16 autocast, and exactly as before otherwise. Returns the parameters."""
    import types

    import torch

    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            module.forward = types.MethodType(_linear_with_bf16_copy, module)
            count += module.weight.numel()
    return count


def build_model(cfg: Config, device: str, precision: str) -> tuple[Any, Any]:
    """The base model (4-bit for qlora) and the PEFT LoraConfig (None for method=full); method.frozen_layers
    freezes full fine-tuning's first decoder layers and keeps LoRA's adapters off them."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training

    method = cfg.method
    name = str(method.name)
    dtype_4bit = compute_dtype(precision)
    device_map = {"": local_rank()} if device == "cuda" and not sharded() else None
    if name == "qlora" and device != "cuda" and not method.cpu_4bit:
        # On a CPU, 4-bit buys nothing at these sizes: activations and logits, not weights, fill the RAM,
        # bitsandbytes' CPU path is ~10% slower per step (73 vs 66 tok/s, docs/training.md), and NF4 on
        # top of a GGUF-derived base starts from a higher loss. The same LoRA trains on the fp32 base.
        log.warning("method=qlora on CPU: training the LoRA adapter on the full-precision base (4-bit "
                    "saves no RAM at this size and bitsandbytes' CPU path is slower); "
                    "method.cpu_4bit=true forces 4-bit")
        name = "lora"
    if name == "qlora":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=method.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype_4bit,
            # FSDP / ZeRO-3 shard the 4-bit weights only when they are stored in a float dtype.
            bnb_4bit_quant_storage=dtype_4bit if sharded() else torch.uint8,
        )
        # On CPU bitsandbytes quantizes at load when the weights are placed on the CPU explicitly.
        model = load_model(cfg.model, dtype=dtype_4bit if device == "cuda" else torch.float32,
                           quantization_config=bnb, device_map=device_map or {"": "cpu"})
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=method.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if device == "cpu":
            keep_4bit_layout_for_training(model)
    else:
        # LoRA on CUDA keeps the frozen base in bf16/fp16; full fine-tuning keeps fp32 master weights
        # (the trainer autocasts), as does everything on CPU.
        dtype = dtype_4bit if (name == "lora" and device == "cuda") else torch.float32
        model = load_model(cfg.model, dtype=dtype, device_map=device_map)
    if name == "full":
        if not method.train_embeddings:
            freeze_embeddings(model)
        if method.frozen_layers:
            freeze_layers(model, method.frozen_layers)
        return model, None
    targets = list(cfg.model.lora_target_modules)
    layers = len(model.get_decoder().layers) if method.frozen_layers else 0
    first = frozen_layer_count(method.frozen_layers, layers) if layers else 0
    if first:
        log.info("LoRA on decoder layers %d-%d of %d (the first %d without adapters)", first, layers - 1, layers, first)
    peft_config = LoraConfig(
        r=method.lora_r, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none", task_type="CAUSAL_LM",
        layers_to_transform=list(range(first, layers)) if first else None,
    )
    return model, peft_config


LIGER_KERNELS = {"rms_norm": True, "swiglu": True, "geglu": True, "rope": False, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def use_liger(method: MethodConfig, device: str) -> bool:
    """method.liger_kernel, checked: Liger's kernels are Triton, so they need a CUDA GPU and liger-kernel."""
    import importlib.util

    if not method.liger_kernel:
        return False
    installed = importlib.util.find_spec("liger_kernel") is not None
    if device != "cuda" or not installed:
        raise ConfigError("method.liger_kernel=true needs a CUDA GPU and `pip install liger-kernel` (Triton "
                          f"kernels); this run has device={device}, liger-kernel "
                          f"{'installed' if installed else 'missing'}. Leave it false (the default).")
    return True


def apply_liger(model: Any) -> list[str]:
    """Liger's fused Triton kernels (RMSNorm, SwiGLU/GeGLU MLP) on this model's modules, nothing else.

    Each fused norm or MLP is one kernel where PyTorch runs several, but a 135M-0.5B model on a GPU is bound by
    launching them from Python, and a Triton launch costs more than a PyTorch one: on the H200 Liger was no
    faster at batch 16 (docs/training.md), so it is opt-in. Liger's own entry point also swaps the modeling
    module's classes and its rotary-embedding function for the whole process (every model built later, a CPU one
    too, where Triton cannot run); those module globals are put back, so only this instance changes. Its
    cross-entropy stays off: TRL's fused LM head computes the loss. Returns the kernels applied ([]: a family
    Liger does not know)."""
    import inspect
    import sys

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("liger-kernel has no kernels for model type %s: not applied", base.config.model_type)
        return []
    module = sys.modules[type(base).__module__]
    saved = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=base, **LIGER_KERNELS)
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    takes = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[base.config.model_type]).parameters
    applied = [k for k, on in LIGER_KERNELS.items() if on and k in takes]
    log.info("liger-kernel: fused %s on the %s model's layers", " + ".join(applied), base.config.model_type)
    return applied
