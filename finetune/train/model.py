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


def freeze_layers(model: Any, first: float) -> int:
    """Stop training the first decoder layers: `first` of them (a count, >= 1) or that share of the model's
    layers (0 < first < 1, rounded down). With the embedding frozen too nothing below the first trained layer
    needs a gradient, so the backward pass stops there (a frozen layer costs its forward only, and holds no Adam
    state); with the embedding trained the backward still runs through them for it. Returns the parameters
    frozen."""
    layers = model.get_decoder().layers
    count = first >= 1
    n = int(first) if count else int(first * len(layers))
    if (count and n != first) or not 0 <= n < len(layers):
        raise ConfigError(f"method.frozen_layers={first}: this model has {len(layers)} decoder layers; give a "
                          f"count from 1 to {len(layers) - 1}, a share between 0 and 1, or 0 to train them all.")
    frozen = 0
    for layer in layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    if n:
        log.info("decoder layers 0-%d of %d frozen (%s parameters)", n - 1, len(layers), f"{frozen:,}")
    return frozen


def build_model(cfg: Config, device: str, precision: str) -> tuple[Any, Any]:
    """The base model (4-bit for qlora) and the PEFT LoraConfig (None for method=full)."""
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
    peft_config = LoraConfig(
        r=method.lora_r, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none", task_type="CAUSAL_LM",
    )
    return model, peft_config
