"""Train stage: supervised fine-tuning with TRL's SFTTrainer (QLoRA, LoRA or full), on CPU or CUDA, one or
several processes.

Reads run.data_dir/{train,validation}.jsonl (TRL prompt/completion conversational rows), evaluates the
validation loss every `eval_steps`, keeps resumable checkpoints in run.checkpoints_dir, and writes the final
adapter (the full model for method=full) atomically to run.adapter_dir plus the trainer's log history to
run.train_log_path. Loss is on the completion only; the end-of-turn token is part of the completion,
so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from finetune.core.config import Config, MethodConfig, metric_examples
from finetune.core.distributed import world_size
from finetune.core.errors import ConfigError, DataError, TrainingDiverged
from finetune.core.files import write_json_atomic
from finetune.core.hardware import BF16_MIN_SPEEDUP, bf16_matmul_speedup, cpu_supports_bf16
from finetune.core.rundir import RunDir
from finetune.data.rows import load_split
from finetune.models.loading import device_for, load_tokenizer
from finetune.train import shared_prefix, tracking
from finetune.train.budget import SCHEDULES, TimeBudget, warmup_length
from finetune.train.callbacks import DivergenceGuard, ProgressLog
from finetune.train.checkpoints import resume_checkpoint, save_final
from finetune.train.model import apply_liger, build_model, keep_bf16_copies, resolve_precision, use_liger
from finetune.train.selection import ValidationScorer
from finetune.train.trl_hooks import trainer_class

log = logging.getLogger("finetune")
OPENING_SAMPLE = 256  # training rows read to find the opening they share and their mean length
OPENING_WARN = 0.5  # share of a step's tokens from which a budgeted run warns about the shared opening


def load_datasets(cfg: Config, run: RunDir) -> tuple[Any, Any]:
    from datasets import Dataset

    train_path, val_path = run.split_path("train"), run.split_path("validation")
    if not train_path.is_file():
        raise DataError(f"{train_path} is missing: run the data stage first (stages=[data,train]).")
    train_rows = load_split(train_path, cfg.model)
    if not train_rows:
        raise DataError(f"{train_path} has no examples.")
    val_rows = load_split(val_path, cfg.model) if val_path.is_file() else []
    if cfg.method.eval_examples is not None:
        val_rows = val_rows[: cfg.method.eval_examples]  # the eval loss is a trend: a slice is enough
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
        raise ConfigError(
            f"no training example has the end-of-turn token {eos_token!r} (id {eos_id}) in its loss. "
            f"The model would never learn to stop. Check model.eos_token and the chat template "
            f"(the assistant turn must end with it), or raise method.max_length={max_length}."
        )
    if with_eos < len(dataset):
        log.warning("%d of %d training rows are cut at method.max_length=%d before their end-of-turn token; "
                    "raise max_length to train them whole", len(dataset) - with_eos, len(dataset), max_length)
    return {"rows": len(dataset), "rows_with_eos": with_eos}


def sft_config(cfg: Config, run: RunDir, device: str, precision: str, has_eval: bool, best_metric: str = "") -> Any:
    """TRL's config for this method; `best_metric`: the task metric that picks the checkpoint (best_by=task)."""
    from trl import SFTConfig

    m = cfg.method
    evaluate = has_eval and m.eval_steps > 0
    eval_steps, save_steps = m.eval_steps, m.save_steps
    load_best = evaluate and m.load_best_model_at_end
    if load_best and save_steps % eval_steps:
        log.info("save_steps=%d is not a multiple of eval_steps=%d: saving every %d steps so the best "
                 "evaluated checkpoint exists", save_steps, eval_steps, eval_steps)
        save_steps = eval_steps
    args = dict(
        output_dir=str(run.checkpoints_dir),
        run_name=run.root.name,
        seed=m.seed,
        data_seed=m.seed,  # seeded sampler: the same data order on resume and in every process
        learning_rate=m.lr,
        lr_scheduler_type=m.lr_scheduler,
        warmup_steps=0,  # set from method.warmup_ratio once the number of steps is known (warmup_steps())
        weight_decay=m.weight_decay,
        max_grad_norm=m.max_grad_norm,
        optim=m.optim,
        num_train_epochs=m.epochs,
        max_steps=m.max_steps,
        per_device_train_batch_size=m.batch_size,
        per_device_eval_batch_size=m.batch_size,
        gradient_accumulation_steps=m.grad_accum,
        max_length=None if m.padding_free and not m.packing else m.max_length,
        packing=m.packing,
        padding_free=m.padding_free,
        completion_only_loss=True,
        eos_token=cfg.model.eos_token,
        activation_checkpointing=m.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if m.gradient_checkpointing else None,
        torch_compile=m.torch_compile,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=m.save_total_limit,
        load_best_model_at_end=load_best,
        metric_for_best_model=(f"eval_{best_metric}" if best_metric else "eval_loss") if load_best else None,
        greater_is_better=bool(best_metric) if load_best else None,
        logging_steps=m.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach the divergence guard, not be averaged away
        report_to=tracking.report_to(cfg),
        disable_tqdm=True,  # ProgressLog prints one line per logging step instead
        dataloader_num_workers=0,
    )
    extra = dict(m.sft_args)  # the typed Config holds it as a plain dict
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(SFTConfig)})
    if unknown:
        raise ConfigError(f"method.sft_args has {', '.join(unknown)}: not fields of TRL's SFTConfig "
                          f"(https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig)")
    return SFTConfig(**{**args, **extra})


def planned_steps(method: MethodConfig, train_rows: int, world: int) -> int:
    """Optimizer steps the trainer will run: max_steps, or epochs over the (possibly packed) training rows."""
    if method.max_steps > 0:
        return method.max_steps
    per_epoch = max(math.ceil(train_rows / (method.batch_size * max(world, 1))) // method.grad_accum, 1)
    return math.ceil(per_epoch * method.epochs)


def warmup_steps(method: MethodConfig, steps: int) -> int:
    """Linear warm-up length: warmup_ratio of the steps, rounded DOWN.

    transformers rounds a ratio up and starts the warm-up at lr 0, so a 30-step run with ratio 0.03 spent its
    first optimizer step (3% of the run, 1/6 of a 6-step benchmark) at lr 0. Rounded down, a short run has
    no warm-up and a long one keeps the usual ratio (1,000 steps x 0.03 = 30 steps).
    """
    return warmup_length(method.warmup_ratio, steps)


def build_trainer(cfg: Config, run: RunDir, callbacks: list | None = None) -> tuple[Any, dict]:
    """The SFTTrainer for this run and what was decided on the way (device, precision, data sizes)."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback

    device = device_for(cfg.device)
    precision = resolve_precision(cfg.method, device)
    train_ds, eval_ds = load_datasets(cfg, run)
    scorer = ValidationScorer(cfg, run) if metric_examples(cfg.method) > 0 else None
    by_task = cfg.method.best_by == "task" and bool(scorer)
    args = sft_config(cfg, run, device, precision, has_eval=eval_ds is not None,
                      best_metric=scorer.metric if by_task else "")
    tokenizer = load_tokenizer(cfg.model)
    model, peft_config = build_model(cfg, device, precision)
    callbacks = [ProgressLog(), DivergenceGuard(cfg.method, precision), *(callbacks or [])]
    budget = time_budget(cfg.method, device, run)
    if budget is not None:
        callbacks.append(budget)
    if cfg.method.early_stopping_patience:
        if args.load_best_model_at_end:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.method.early_stopping_patience))
        else:
            log.warning("early_stopping_patience needs a validation split and load_best_model_at_end: ignored")
    trainer = trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    liger = apply_liger(trainer.model) if use_liger(cfg.method, device) else []
    collator = None
    if _shares_prefix(cfg.method, device):
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        collator = shared_prefix.enable(base, trainer.data_collator, cfg.method.max_length)
        trainer.data_collator = collator or trainer.data_collator
    opening = {} if cfg.method.packing else opening_report(trainer.train_dataset, cfg.method,
                                                           shared=bool(collator), budgeted=budget is not None)
    trainer.validation_scorer, trainer.select_by_task = (scorer or None), by_task
    steps = planned_steps(cfg.method, len(trainer.train_dataset), args.world_size)
    args.warmup_steps = warmup_steps(cfg.method, steps)
    # TRL casts the LoRA weights of a 4-bit model to bf16, but resuming reloads them in fp32 (PEFT's
    # adapter autocast), so a resumed run would continue in another precision. Keep them fp32 throughout:
    # the trainer's autocast still runs the matmuls in bf16 where enabled.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if device == "cpu" and precision == "bf16":
        copied = keep_bf16_copies(trainer.model)
        if copied:
            log.info("frozen weights (%s parameters) cast to bf16 once for autocast, not on every step", f"{copied:,}")
    info = {"device": device, "precision": precision, "world_size": args.world_size,
            "planned_steps": steps, "warmup_steps": args.warmup_steps,
            "base_4bit": getattr(model, "hf_quantizer", None) is not None, "liger_kernels": liger,
            "train_examples": len(train_ds), "validation_examples": len(eval_ds) if eval_ds is not None else 0,
            **opening,
            **check_eos_trained(trainer.train_dataset, tokenizer, cfg.model.eos_token, cfg.method.max_length)}
    if device == "cpu" and str(cfg.method.precision) == "auto" and cpu_supports_bf16():  # what chose fp32 or bf16
        info["bf16_matmul_speedup"] = round(bf16_matmul_speedup(), 2)
        log.info("precision %s: this CPU's bf16 matmul runs %.2fx fp32's speed (bf16 from %.1fx)", precision,
                 info["bf16_matmul_speedup"], BF16_MIN_SPEEDUP)
    return trainer, info


def opening_report(dataset: Any, method: MethodConfig, shared: bool, budgeted: bool) -> dict:
    """shared_prefix.opening_cost over the first OPENING_SAMPLE training rows; a warning where the opening is
    most of what a step computes and training runs for a time budget, so every token of it costs steps."""
    sample = dataset.select(range(min(len(dataset), OPENING_SAMPLE)))
    cost = shared_prefix.opening_cost([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in sample],
                                      method.batch_size, shared)
    if budgeted and cost["opening_share_of_step"] >= OPENING_WARN:
        log.warning("every training row begins with the same %d tokens (task.system_prompt and the chat template's "
                    "opening), %.0f%% of what a training step computes: within the %g-minute budget a shorter "
                    "task.system_prompt trains more steps (on 50 question types, a 38-token opening instead of one "
                    "of 161 that listed the labels trained 1.5x the steps: accuracy 0.882 against 0.852; "
                    "docs/tasks.md, 'Example: many labels')",
                    cost["opening_tokens"], 100 * cost["opening_share_of_step"], method.budget_minutes)
    return cost


def _shares_prefix(method: MethodConfig, device: str) -> bool:
    """method.share_prefix applies to padding-free batches (not packing) on a CPU, where it was measured."""
    if not method.share_prefix:
        return False
    if not method.padding_free or method.packing:
        log.info("method.share_prefix needs method.padding_free=true and method.packing=false: not used")
        return False
    if device != "cpu":
        log.info("method.share_prefix applies on a CPU (not measured on %s): not used", device)
        return False
    return True


def time_budget(method: MethodConfig, device: str, run: RunDir) -> TimeBudget | None:
    """The callback that sizes training by method.budget_minutes (CPU only: a GPU trains whole epochs)."""
    if method.budget_minutes is None:
        return None
    if method.max_steps > 0:  # a step count given by the user is what they get
        log.info("method.max_steps=%d: trained as given, method.budget_minutes=%s not applied", method.max_steps,
                 method.budget_minutes)
        return None
    if device != "cpu":
        log.info("method.budget_minutes=%s applies on a CPU; on %s training runs method.epochs / max_steps",
                 method.budget_minutes, device)
        return None
    if method.lr_scheduler not in SCHEDULES:
        raise ConfigError(f"method.lr_scheduler={method.lr_scheduler} cannot be fitted to a time budget: use one of "
                          f"{', '.join(SCHEDULES)}, or method.budget_minutes=null")
    return TimeBudget(method.budget_minutes, method.lr_scheduler, method.warmup_ratio, run.budget_path)


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


def train(cfg: Config, run: RunDir) -> dict:
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
        validation = None
        scorer = trainer.validation_scorer
        if main and scorer:  # the model as saved (the best checkpoint when one was loaded)
            validation = scorer.score(trainer.model, trainer.processing_class)
            log.info("validation %s = %.4f on %d rows (%.1fs)", scorer.metric, validation[scorer.metric],
                     len(scorer.rows), validation["seconds"])
        history = trainer.state.log_history
        if main:
            write_json_atomic(run.train_log_path, history, indent=1)
        progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressLog))
        summary = {
            "method": str(cfg.method.name),
            "adapter_dir": str(run.adapter_dir),
            **info,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_per_second": progress.tokens_per_second(),
            "validation": validation,  # the task metric on validation rows (method.metric_examples)
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
