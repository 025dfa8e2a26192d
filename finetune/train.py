"""Supervised fine-tuning with TRL's SFTTrainer: QLoRA, LoRA or full, on CPU or CUDA, one or several processes.

Reads run.data_dir/{train,validation}.jsonl (TRL prompt/completion conversational rows), evaluates the
validation loss every `eval_steps`, keeps resumable checkpoints in run.checkpoints_dir, and writes the final
adapter (the full model for method=full) atomically to run.adapter_dir plus the trainer's log history to
run.root/train_log.json. Loss is on the completion only; the end-of-turn token is part of the completion,
so the model learns to stop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from finetune import tracking
from finetune.callbacks import DivergenceGuard, ProgressLog, TrainingDiverged
from finetune.checkpoints import last_complete_checkpoint, resume_checkpoint, save_final
from finetune.data import read_rows
from finetune.data_sources import DataError
from finetune.models import adapt_messages, device_for, load_model, load_tokenizer
from finetune.pipeline import world_size

log = logging.getLogger("finetune")

__all__ = ["train", "build_trainer", "trainer_class", "TrainingDiverged", "resolve_precision", "load_split", "last_complete_checkpoint"]

TRAIN_LOG = "train_log.json"


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


# ---------------------------------------------------------------- precision and device
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 / AMX): there bf16 autocast is about 2x faster (FACTS)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(method: DictConfig, device: str) -> str:
    """'bf16' | 'fp16' | 'fp32': the mixed-precision mode of the trainer (weights stay fp32 or 4-bit)."""
    import torch

    precision = _value(method.precision)
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise SystemExit("error: method.precision=fp16 needs a CUDA GPU; on CPU use bf16 (if supported) or fp32.")
    return precision


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _sharded() -> bool:
    """FSDP or DeepSpeed ZeRO-3 (set by `accelerate launch`): the model must not be placed with a device_map."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )


# ---------------------------------------------------------------- data
def load_split(path: Path, model_cfg: DictConfig) -> list[dict]:
    """Prompt/completion rows of one split, with the prompt adapted to the model family (e.g. no system role)."""
    rows = []
    for lineno, row in enumerate(read_rows(path), 1):
        try:
            clean = [[{"role": str(m["role"]), "content": str(m["content"])} for m in row[k]]
                     for k in ("prompt", "completion")]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: row {lineno}: every message needs 'role' and 'content' ({exc!r})") from None
        rows.append({"prompt": adapt_messages(clean[0], model_cfg), "completion": clean[1]})
    return rows


def load_datasets(cfg: DictConfig, run) -> tuple[Any, Any]:
    from datasets import Dataset

    train_path, val_path = run.data_dir / "train.jsonl", run.data_dir / "validation.jsonl"
    if not train_path.is_file():
        raise SystemExit(f"error: {train_path} is missing: run the data stage first (stages=[data,train]).")
    train_rows = load_split(train_path, cfg.model)
    if not train_rows:
        raise SystemExit(f"error: {train_path} has no examples.")
    val_rows = load_split(val_path, cfg.model) if val_path.is_file() else []
    if cfg.method.eval_examples is not None:
        val_rows = val_rows[: int(cfg.method.eval_examples)]  # the eval loss is a trend: a slice is enough
    if not val_rows:
        log.warning("no validation examples in %s: no evaluation loss, no best-checkpoint selection", val_path)
    return Dataset.from_list(train_rows), (Dataset.from_list(val_rows) if val_rows else None)


def check_eos_trained(dataset: Any, tokenizer: Any, eos_token: str, max_length: int) -> dict:
    """The end-of-turn token must carry loss in the training rows, or the model never learns to stop."""
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if "labels" not in dataset.column_names:  # packed rows carry labels too; anything else is unexpected
        return {"rows": len(dataset), "rows_with_eos": None}
    with_eos = sum(1 for labels in dataset["labels"] if eos_id in labels)
    if with_eos == 0:
        raise SystemExit(
            f"error: no training example has the end-of-turn token {eos_token!r} (id {eos_id}) in its loss. "
            f"The model would never learn to stop. Check model.eos_token and the chat template "
            f"(the assistant turn must end with it), or raise method.max_length={max_length}."
        )
    if with_eos < len(dataset):
        log.warning("%d of %d training rows are cut at method.max_length=%d before their end-of-turn token; "
                    "raise max_length to train them whole", len(dataset) - with_eos, len(dataset), max_length)
    return {"rows": len(dataset), "rows_with_eos": with_eos}


# ---------------------------------------------------------------- model
def build_model(cfg: DictConfig, device: str, precision: str) -> tuple[Any, Any]:
    """The base model (4-bit for qlora) and the PEFT LoraConfig (None for method=full)."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training

    method = cfg.method
    name = _value(method.name)
    compute_dtype = _dtype(precision)
    device_map = {"": local_rank()} if device == "cuda" and not _sharded() else None
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
            bnb_4bit_use_double_quant=bool(method.bnb_4bit_use_double_quant),
            bnb_4bit_compute_dtype=compute_dtype,
            # FSDP / ZeRO-3 shard the 4-bit weights only when they are stored in a float dtype.
            bnb_4bit_quant_storage=compute_dtype if _sharded() else torch.uint8,
        )
        # On CPU bitsandbytes quantizes at load when the weights are placed on the CPU explicitly.
        model = load_model(cfg.model, dtype=compute_dtype if device == "cuda" else torch.float32,
                           quantization_config=bnb, device_map=device_map or {"": "cpu"})
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(method.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # LoRA on CUDA keeps the frozen base in bf16/fp16; full fine-tuning keeps fp32 master weights
        # (the trainer autocasts), as does everything on CPU.
        dtype = compute_dtype if (name == "lora" and device == "cuda") else torch.float32
        model = load_model(cfg.model, dtype=dtype, device_map=device_map)
    if name == "full":
        return model, None
    targets = list(cfg.model.lora_target_modules)
    peft_config = LoraConfig(
        r=int(method.lora_r), lora_alpha=int(method.lora_alpha), lora_dropout=float(method.lora_dropout),
        target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none", task_type="CAUSAL_LM",
    )
    return model, peft_config


# ---------------------------------------------------------------- trainer
_COMPACT = threading.local()


def _install_compact_lm_head() -> bool:
    """Let TRL's fused LM head score only the completion positions on every device, not only on Triton ones.

    TRL 1.16 projects through the 49k-vocabulary head (log-probs, entropy, top-1, in chunks) only where the label
    is not -100 on CUDA/XPU, but at EVERY position elsewhere, to keep tile shapes static for Neuron's compiler.
    On a CPU that is prompt and padding too: py-spy put 26% of a training step in that forward alone, with
    completion tokens ~37% of the real ones. The loss and the logged metrics are the same either way (masked
    positions are zeroed); only our trainer turns it on (a thread-local flag around compute_loss), so a plain
    SFTTrainer in the same process (scripts/bench_train.py's baseline) keeps TRL's behaviour.
    Returns False, and changes nothing, if TRL no longer decides it through trl.trainer.utils._use_triton.
    """
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_finetune_compact_lm_head", False):
        return True
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.debug("trl.trainer.utils._use_triton is gone: LM head scored as TRL decides")
        return False

    def use_compact(device) -> bool:
        return original(device) or getattr(_COMPACT, "on", False)

    trl_utils._use_triton = use_compact
    trl_utils._finetune_compact_lm_head = True
    return True


def trainer_class() -> type:
    """SFTTrainer whose loss scores only completion positions through the LM head (see _install_compact_lm_head)."""
    from trl import SFTTrainer

    global _TRAINER
    if _TRAINER is None:
        _install_compact_lm_head()

        class FinetuneSFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                _COMPACT.on = True
                try:
                    return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                                num_items_in_batch=num_items_in_batch)
                finally:
                    _COMPACT.on = False

        _TRAINER = FinetuneSFTTrainer
    return _TRAINER


_TRAINER: type | None = None


def sft_config(cfg: DictConfig, run, device: str, precision: str, has_eval: bool) -> Any:
    from trl import SFTConfig

    m = cfg.method
    evaluate = has_eval and m.eval_steps > 0
    eval_steps, save_steps = int(m.eval_steps), int(m.save_steps)
    load_best = evaluate and bool(m.load_best_model_at_end)
    if load_best and save_steps % eval_steps:
        log.info("save_steps=%d is not a multiple of eval_steps=%d: saving every %d steps so the best "
                 "evaluated checkpoint exists", save_steps, eval_steps, eval_steps)
        save_steps = eval_steps
    return SFTConfig(
        output_dir=str(run.checkpoints_dir),
        run_name=run.root.name,
        seed=int(m.seed),
        data_seed=int(m.seed),  # seeded sampler: the same data order on resume and in every process
        learning_rate=float(m.lr),
        lr_scheduler_type=str(m.lr_scheduler),
        warmup_steps=0,  # set from method.warmup_ratio once the number of steps is known (warmup_steps())
        weight_decay=float(m.weight_decay),
        max_grad_norm=float(m.max_grad_norm),
        optim=str(m.optim),
        num_train_epochs=float(m.epochs),
        max_steps=int(m.max_steps),
        per_device_train_batch_size=int(m.batch_size),
        per_device_eval_batch_size=int(m.batch_size),
        gradient_accumulation_steps=int(m.grad_accum),
        max_length=int(m.max_length),
        packing=bool(m.packing),
        completion_only_loss=True,
        eos_token=str(cfg.model.eos_token),
        activation_checkpointing=bool(m.gradient_checkpointing),  # transformers 5 name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if m.gradient_checkpointing else None,
        torch_compile=bool(m.torch_compile),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=int(m.save_total_limit),
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss" if load_best else None,
        greater_is_better=False if load_best else None,
        logging_steps=int(m.logging_steps),
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach the divergence guard, not be averaged away
        report_to=tracking.report_to(cfg),
        disable_tqdm=True,  # ProgressLog prints one line per logging step instead
        dataloader_num_workers=0,
    )


def planned_steps(method: DictConfig, train_rows: int, world: int) -> int:
    """Optimizer steps the trainer will run: max_steps, or epochs over the (possibly packed) training rows."""
    if int(method.max_steps) > 0:
        return int(method.max_steps)
    per_epoch = max(math.ceil(train_rows / (int(method.batch_size) * max(world, 1))) // int(method.grad_accum), 1)
    return math.ceil(per_epoch * float(method.epochs))


def warmup_steps(method: DictConfig, steps: int) -> int:
    """Linear warm-up length: warmup_ratio of the steps, rounded DOWN.

    transformers rounds a ratio up and starts the warm-up at lr 0, so a 30-step run with ratio 0.03 spent its
    first optimizer step (3% of the run, 1/6 of a 6-step benchmark) at lr 0. Rounded down, a short run has
    no warm-up and a long one keeps the usual ratio (1,000 steps x 0.03 = 30 steps).
    """
    return int(math.floor(float(method.warmup_ratio) * steps + 1e-9))


def build_trainer(cfg: DictConfig, run, callbacks: list | None = None) -> tuple[Any, dict]:
    """The SFTTrainer for this run and what was decided on the way (device, precision, data sizes)."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback

    device = device_for(cfg)
    precision = resolve_precision(cfg.method, device)
    train_ds, eval_ds = load_datasets(cfg, run)
    args = sft_config(cfg, run, device, precision, has_eval=eval_ds is not None)
    tokenizer = load_tokenizer(cfg.model)
    model, peft_config = build_model(cfg, device, precision)
    callbacks = [ProgressLog(), DivergenceGuard(cfg.method, precision), *(callbacks or [])]
    if cfg.method.early_stopping_patience:
        if args.load_best_model_at_end:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(cfg.method.early_stopping_patience)))
        else:
            log.warning("early_stopping_patience needs a validation split and load_best_model_at_end: ignored")
    trainer = trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    steps = planned_steps(cfg.method, len(trainer.train_dataset), args.world_size)
    args.warmup_steps = warmup_steps(cfg.method, steps)
    # TRL casts the LoRA weights of a 4-bit model to bf16, but resuming reloads them in fp32 (PEFT's
    # adapter autocast), so a resumed run would continue in another precision. Keep them fp32 throughout:
    # the trainer's autocast still runs the matmuls in bf16 where enabled.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    info = {"device": device, "precision": precision, "world_size": args.world_size,
            "planned_steps": steps, "warmup_steps": args.warmup_steps,
            "base_4bit": getattr(model, "hf_quantizer", None) is not None,
            "train_examples": len(train_ds), "validation_examples": len(eval_ds) if eval_ds is not None else 0,
            **check_eos_trained(trainer.train_dataset, tokenizer, str(cfg.model.eos_token), int(cfg.method.max_length))}
    return trainer, info


def _check_finite(trainer: Any) -> None:
    """Last line of defence before saving: no NaN/inf in the trained weights."""
    import torch

    bad = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"training finished but {len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]}): nothing was saved. "
            f"Lower method.lr (now {trainer.args.learning_rate:g}) or use method.precision=fp32, and start over "
            f"with resume=false.")


def _summary_metrics(history: list[dict]) -> dict:
    train_losses = [h["loss"] for h in history if "loss" in h]
    evals = [(h["eval_loss"], h["step"]) for h in history if "eval_loss" in h]
    out: dict[str, Any] = {"first_loss": train_losses[0] if train_losses else None,
                           "last_loss": train_losses[-1] if train_losses else None}
    if evals:
        out["best_eval_loss"], out["best_eval_step"] = min(evals)
        out["last_eval_loss"] = evals[-1][0]
    return out


def train(cfg: DictConfig, run) -> dict:
    """Fine-tune cfg.model on the run's data with cfg.method; returns a JSON-able summary."""
    with tracking.tracker(cfg, run):
        trainer, info = build_trainer(cfg, run)
        main = trainer.is_world_process_zero()
        checkpoint = resume_checkpoint(cfg, run)
        if checkpoint is not None:
            log.info("resuming from %s", checkpoint)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        _check_finite(trainer)
        save_final(trainer, run)
        history = trainer.state.log_history
        if main:
            tmp = run.root / (TRAIN_LOG + ".tmp")
            tmp.write_text(json.dumps(history, indent=1))
            tmp.replace(run.root / TRAIN_LOG)
        progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressLog))
        summary = {
            "method": _value(cfg.method.name),
            "adapter_dir": str(run.adapter_dir),
            **info,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_per_second": progress.tokens_per_second(),
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            **_summary_metrics(history),
        }
    if main:
        log.info("adapter saved to %s (%s, %d steps, best eval_loss %s)", run.adapter_dir, summary["method"],
                 summary["global_step"], summary.get("best_eval_loss"))
    if world_size() > 1:
        _leave_process_group()
    return summary


def _leave_process_group() -> None:
    """Rank 0 goes on to export and evaluate alone: close the process group so nothing waits on the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
