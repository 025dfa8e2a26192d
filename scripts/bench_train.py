"""Training throughput of our training stage vs a plain TRL SFTTrainer, in one process, alternating.

    .venv/bin/python scripts/bench_train.py [--method lora] [--steps 5] [--rounds 3] [finetune overrides...]
    e.g. ... method.packing=true method.batch_size=1 method.grad_accum=4
    ... --method full --before 'method.optim=adamw_torch method.padding_free=false'  (ours vs ours as it was)
    ... --variant nodrop='method.lora_dropout=0' --variant b64='method.batch_size=64 method.lr=2e-3'
        (more arms of ours, each with its overrides added, against the same baseline in the same process)

    (GPU: bash scripts/gpu_check.sh all DIR, or bench DIR [these arguments])

Arm "ours": finetune.data.prepare + finetune.train.build_trainer on a fresh run dir, i.e. what
`python -m finetune` trains with the configured defaults (the trainer's own eval/checkpoints are turned
off so that only training steps are timed). Arm "plain": TRL's SFTTrainer as the TRL docs write it:
SFTConfig(use_cpu=True on CPU, everything else default) + LoraConfig with the same r/alpha/targets and the
dropout of TRL's PEFT docs (0.05; --baseline-dropout), the same model weights, the same training rows, the same
max_length and the same (effective) batch. Its learning rate is set to ours (--baseline-lr), because TRL's default
2e-5 is meant for full fine-tuning and would make the loss comparison meaningless. On a GPU the plain arm loads
the weights in bf16, and for --method qlora with the NF4 BitsAndBytesConfig of TRL's QLoRA docs.

Both trainers run their real `train()` loop, each in its own thread, gated so that only one runs at a
time: A runs M steps, pauses; B runs M steps, pauses; ... for N rounds. After each round both are
evaluated on the same validation rows (tokenized once, unpacked, completion-only loss, fp32, token-
weighted mean), so the loss is compared at equal trained tokens (linear interpolation).

Two speed-ups are printed: tokens/s (timed rounds), and the time to equal loss: the training seconds
(round 1 included) each arm needs to reach the higher of the two final validation losses. The second is
the one that counts when the arms learn differently per token (batch size, packing, schedule).
Peak CUDA memory is per arm, over its own rounds (both arms' weights are resident).

Tokens/s counts real tokens (attention-mask ones, or every token of a padding-free packed row) of the
timed steps; the first round is warm-up and left out when there is more than one round. With
method.share_prefix a batch computes its rows' common opening once, but tokens (and the FLOPs below) count
every row whole, as the unshared arm computes them: the same rows give the same count in both arms, so the
tokens/s ratio is the rows/s ratio, and the shared arm's GFLOP/s is the work it stands in for.

FLOPs per real token (documented formula, matmuls only):
    N_f = in*out summed over frozen nn.Linear layers except lm_head, N_t = the same over trainable ones,
    N_h = lm_head's in*out, counted only on completion tokens (TRL's fused LM head skips the prompt)
    forward      2 (N_f + N_t)  [+ 2 N_h per completion token]
    backward     2 (N_f - N_b + N_t)  input gradients, through frozen layers too (LoRA: down to its lowest adapter), but
                                not below the lowest trainable weight: N_b = in*out of the decoder layers under
                                it when the embedding is frozen too (method.frozen_layers), whose backward
                                autograd never runs
               + 2 N_t          weight gradients (trainable weights only; full fine-tuning: N_t = all)
                                [+ 2 N_h per completion token]
    attention    4 * d_attn * (T+1)/2 per token of a row of T tokens and layer (QK^T and AV, causal) in the
                 forward of every layer and twice that in the backward of the layers the backward reaches,
                 summed exactly per row of each batch
Utilisation = achieved FLOP/s / the best 2048^3 torch.mm FLOP/s (fp32 and bf16), measured in this
process with the same thread count (on a CPU the bf16 peak where it computes bf16 natively, or with
BENCH_BF16_PEAK=1: scripts/_bench.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402


# ------------------------------------------------------------------ FLOPs
def matmul_params(model) -> tuple[int, int]:
    """(frozen, trainable) sums of in*out over nn.Linear layers (bnb 4-bit layers are nn.Linear too)."""
    import torch

    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            n = module.in_features * module.out_features
            if w.requires_grad:
                trainable += n
            else:
                frozen += n
    return frozen, trainable


def backward_free_layers(model) -> tuple[int, int]:
    """(decoder layers under the lowest trainable weight, in*out of their nn.Linear layers): autograd runs no
    backward through them. (0, 0) when the input embedding trains (the backward then reaches layer 0)."""
    if model.get_input_embeddings().weight.requires_grad:
        return 0, 0
    layers = model.get_decoder().layers  # as finetune.train.model.freeze_layers finds them
    below = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                 len(layers))
    return below, sum(matmul_params(layer)[0] for layer in layers[:below])


def row_lengths(inputs) -> list[int]:
    """Real tokens per training row: attention-mask rows, or the runs of consecutive positions of a padding-free
    row; a run that starts at position p > 0 continues a shared prefix (method.share_prefix) and its row holds
    those p tokens too, so both arms count the same rows' tokens."""
    if "attention_mask" in inputs and inputs["attention_mask"] is not None:
        return [int(x) for x in inputs["attention_mask"].sum(dim=1).tolist()]
    pos = inputs["position_ids"].flatten().tolist()
    lengths: list[int] = []
    for i, p in enumerate(pos):
        if i == 0 or p != pos[i - 1] + 1:
            lengths.append(p + 1)
        else:
            lengths[-1] += 1
    return lengths


class Arm:
    """One trainer, run in its own thread, paused every `steps` optimizer steps."""

    def __init__(self, name: str, trainer, steps: int, text_config):
        self.name, self.trainer, self.steps = name, trainer, steps
        self.go, self.paused = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.tokens = self.label_tokens = 0
        self.attn_token_ctx = 0.0  # sum over real tokens of (T+1)/2
        self.round_start = 0.0
        self.cuda_peak_mb = 0.0  # peak allocated during this arm's rounds (both arms' weights are resident)
        self.rounds: list[dict] = []
        self.round_tokens = self.round_label_tokens = self.round_attn = 0
        frozen, trainable = matmul_params(trainer.model)
        self.n_frozen, self.n_trainable = frozen, trainable
        head = trainer.model.get_output_embeddings()
        # a frozen lm_head runs on completion tokens only (TRL's fused LM head); a trained one on every token
        self.n_head = 0 if head.weight.requires_grad else head.in_features * head.out_features
        heads = getattr(text_config, "num_attention_heads")
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        self.d_attn, self.layers = heads * head_dim, text_config.num_hidden_layers
        self.layers_no_backward, self.n_no_backward = backward_free_layers(trainer.model)
        self._wrap_training_step()
        from transformers import TrainerCallback

        arm = self

        class Gate(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % arm.steps == 0:
                    arm.pause(state.global_step)

        trainer.add_callback(Gate())
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _wrap_training_step(self) -> None:
        inner = self.trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            lengths = row_lengths(inputs)
            self.round_tokens += sum(lengths)
            self.round_attn += sum(t * (t + 1) / 2 for t in lengths)
            if "labels" in inputs:
                self.round_label_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            elif "completion_mask" in inputs:
                self.round_label_tokens += int(inputs["completion_mask"][:, 1:].sum())
            return inner(model, inputs, *args, **kwargs)

        self.trainer.training_step = training_step

    def _run(self) -> None:
        self.go.wait()
        self.go.clear()
        self._cuda_reset()
        self.round_start = time.perf_counter()
        try:
            self.trainer.train()
        except BaseException as exc:  # reported by the coordinator
            self.error = exc
        self.paused.set()

    def _cuda_reset(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def pause(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak_mb = max(self.cuda_peak_mb, torch.cuda.max_memory_allocated() / 2**20)
        seconds = time.perf_counter() - self.round_start
        self.tokens += self.round_tokens
        self.label_tokens += self.round_label_tokens
        self.rounds.append({"step": step, "seconds": seconds, "tokens": self.round_tokens,
                            "label_tokens": self.round_label_tokens, "attn": self.round_attn,
                            "tokens_total": self.tokens})
        self.round_tokens = self.round_label_tokens = self.round_attn = 0
        self.paused.set()
        self.go.wait()
        self.go.clear()
        self._cuda_reset()
        self.round_start = time.perf_counter()

    def run_round(self) -> None:
        self.paused.clear()
        if not self.thread.is_alive() and not self.rounds:
            self.thread.start()
        self.go.set()
        self.paused.wait()
        if self.error is not None:
            raise RuntimeError(f"arm {self.name} failed: {self.error!r}") from self.error

    def flops_per_second(self, rounds: list[dict]) -> float:
        tokens = sum(r["tokens"] for r in rounds)
        label_tokens = sum(r["label_tokens"] for r in rounds)
        attn = sum(r["attn"] for r in rounds)
        seconds = sum(r["seconds"] for r in rounds)
        linear = (tokens * (4 * (self.n_frozen - self.n_head + self.n_trainable) + 2 * self.n_trainable
                            - 2 * self.n_no_backward)
                  + label_tokens * 4 * self.n_head)
        attention = 4 * self.d_attn * attn * (self.layers + 2 * (self.layers - self.layers_no_backward))
        return (linear + attention) / seconds


# ------------------------------------------------------------------ validation loss
def validation_loss(model, rows: list[dict]) -> float:
    """Token-weighted mean completion loss over tokenized rows, fp32, no autocast, one row at a time."""
    import torch

    was_training = model.training
    model.eval()
    total = count = 0.0
    with torch.no_grad(), torch.autocast(model.device.type, enabled=False):
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor(row["labels"][1:], device=model.device)  # -100 on the prompt
            mask = labels != -100
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            total += float(nll[mask].sum())
            count += float(mask.sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """Loss at x trained tokens on the piecewise-linear curve [(tokens, loss)]."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return curve[-1][1] if curve and abs(curve[-1][0] - x) < 1e-9 else None


def seconds_to_loss(curve: list[tuple[float, float]], target: float) -> float | None:
    """First training time at which the piecewise-linear (seconds, loss) curve reaches `target`; None if never."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1) if y0 > target else x0
    return None


# ------------------------------------------------------------------ the two trainers
def build_ours(cfg, root: Path):
    from finetune.core.rundir import RunDir
    from finetune.data.prepare import prepare
    from finetune.train.stage import build_trainer

    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)
    prepare(cfg, run)
    trainer, info = build_trainer(cfg, run)
    return run, trainer, info


def build_plain(cfg, run, out_dir: Path, batch_size: int, lr: float, total_steps: int, fp32: bool = False,
                dropout: float = 0.05):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from finetune.data.rows import load_split
    from finetune.models.loading import load_model, load_tokenizer

    train_rows = load_split(run.data_dir / "train.jsonl", cfg.model)
    m = cfg.method
    method = str(m.name)
    args = SFTConfig(output_dir=str(out_dir), use_cpu=not torch.cuda.is_available(), learning_rate=lr,
                     per_device_train_batch_size=batch_size, max_length=int(m.max_length), max_steps=total_steps,
                     save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10_000, seed=int(m.seed),
                     **({"bf16": False} if fp32 else {}))
    targets = list(cfg.model.lora_target_modules)
    peft_config = None
    if method != "full":
        peft_config = LoraConfig(r=int(m.lora_r), lora_alpha=int(m.lora_alpha), lora_dropout=dropout,
                                 target_modules="all-linear" if targets == ["all-linear"] else targets,
                                 task_type="CAUSAL_LM")
    if torch.cuda.is_available():
        # As the TRL docs write it for a GPU: the checkpoint's bf16 weights; for QLoRA the docs' 4-bit config.
        kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
        if method == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        model = load_model(cfg.model, **kwargs)
    else:
        model = load_model(cfg.model, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         processing_class=load_tokenizer(cfg.model), peft_config=peft_config)
    return trainer


def tokenized_validation(cfg, run, trainer, n: int) -> list[dict]:
    """Validation rows tokenized the way TRL does (prompt/completion, unpacked, completion mask) for the
    shared eval loss; uses an existing trainer only for TRL's dataset preparation."""
    from datasets import Dataset

    from finetune.data.rows import load_split

    rows = load_split(run.data_dir / "validation.jsonl", cfg.model)[:n]
    ds = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, packing=False,
                                  formatting_func=None, dataset_name="bench-validation")
    return [dict(r) for r in ds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--method", default="lora",
                   help="lora (default here) | qlora | full; the project default is qlora, whose bitsandbytes "
                        "CPU fallback is far slower (see the recorded results)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per round (M)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (N)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--baseline-batch", type=int, default=None, help="default: our batch_size * grad_accum")
    p.add_argument("--baseline-lr", type=float, default=None, help="default: our method.lr")
    p.add_argument("--baseline-fp32", action="store_true",
                   help="plain TRL with bf16=False (TRL's default is bf16 autocast, even on a CPU without bf16 units)")
    p.add_argument("--baseline-dropout", type=float, default=0.05,
                   help="plain TRL's LoRA dropout: 0.05 as TRL's PEFT docs write it (ours: method.lora_dropout)")
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--arms", default="ours,plain", help="ours,plain | ours | plain (memory of one arm alone)")
    p.add_argument("--before", default=None, metavar="OVERRIDES",
                   help="instead of plain TRL, the baseline arm is ours with these overrides added (today's path), "
                        "e.g. --before 'method.optim=adamw_torch method.padding_free=false'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="one more arm of ours with these overrides added (repeatable), timed against the same "
                        "baseline, e.g. --variant nodrop='method.lora_dropout=0'")
    p.add_argument("overrides", nargs="*", help="finetune overrides, e.g. method.packing=true")
    a = p.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from finetune.core.config import compose
    from finetune.pipeline import quiet_progress_bars

    quiet_progress_bars()
    from finetune.core.memory import keep_freed_memory

    keep_freed_memory()  # as `python -m finetune` does at start-up (finetune/core/memory.py)
    total_steps = a.steps * a.rounds
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    overrides = [f"method={a.method}", f"run_dir={tmp / 'run'}", f"method.max_steps={total_steps}",
                 "method.eval_steps=0", "method.save_steps=100000", "method.logging_steps=10000",
                 "tracking=none"]
    overrides += [f"model={a.model}"] if a.model else []
    overrides += [f"task={a.task}"] if a.task else []
    overrides += [f"method.max_length={a.max_length}"] if a.max_length else []
    overrides += a.overrides
    cfg = compose(overrides)
    m = cfg.method

    gemm = _bench.gemm_peak()
    t0 = time.time()
    run, ours, info = build_ours(cfg, tmp / "run")
    print(f"ours built in {time.time() - t0:.0f}s", flush=True)
    arms_wanted = a.arms.split(",")
    base_name = "before" if a.before else "plain"
    before_cfg = compose(overrides + [f"run_dir={tmp / 'before'}", *a.before.split()]) if a.before else None
    batch = a.baseline_batch or int(m.batch_size) * int(m.grad_accum)
    lr = a.baseline_lr if a.baseline_lr is not None else float(m.lr)
    if before_cfg is not None:
        _, baseline, before_info = build_ours(before_cfg, tmp / "before")
    else:
        baseline = (build_plain(cfg, run, tmp / "plain", batch, lr, total_steps, a.baseline_fp32, a.baseline_dropout)
                    if "plain" in arms_wanted else None)
    print(f"{base_name} built at {time.time() - t0:.0f}s", flush=True)
    variants = []  # (name, cfg, trainer, info)
    for spec in a.variant:
        name, _, extra = spec.partition("=")
        vcfg = compose(overrides + [f"run_dir={tmp / name}", *extra.split()])
        _, vtrainer, vinfo = build_ours(vcfg, tmp / name)
        variants.append((name, vcfg, vtrainer, vinfo))
        print(f"variant {name} built at {time.time() - t0:.0f}s", flush=True)
    val = tokenized_validation(cfg, run, baseline or ours, a.eval_rows)
    setup_s = time.time() - t0
    text_config = ours.model.config.get_text_config()
    arms = []
    if "ours" in arms_wanted:
        arms.append(Arm("ours", ours, a.steps, text_config))
    arms += [Arm(name, trainer, a.steps, text_config) for name, _, trainer, _ in variants]
    if baseline is not None:
        arms.append(Arm(base_name, baseline, a.steps, text_config))

    def our_settings(m, info) -> dict:
        return {"method": str(m.name.value), "precision": info["precision"], "batch_size": int(m.batch_size),
                "grad_accum": int(m.grad_accum), "packing": bool(m.packing), "padding_free": bool(m.padding_free),
                "optim": str(m.optim), "max_length": int(m.max_length), "lr": float(m.lr),
                "scheduler": str(m.lr_scheduler), "grad_ckpt": bool(m.gradient_checkpointing),
                "compile": bool(m.torch_compile), "warmup_steps": info["warmup_steps"],
                "lora_dropout": float(m.lora_dropout), "liger": ",".join(info.get("liger_kernels") or []) or "-",
                "sft_args": dict(m.sft_args or {})}

    settings = {"ours": our_settings(m, info)}
    settings.update({name: our_settings(vcfg.method, vinfo) for name, vcfg, _, vinfo in variants})
    if before_cfg is not None:
        settings["before"] = our_settings(before_cfg.method, before_info)
    elif baseline is not None:
        pa = baseline.args
        settings["plain"] = {"precision": "bf16" if pa.bf16 else "fp16" if pa.fp16 else "fp32",
                             "batch_size": batch, "grad_accum": 1, "packing": bool(pa.packing),
                             "padding_free": bool(pa.padding_free), "optim": str(getattr(pa.optim, "value", pa.optim)),
                             "max_length": pa.max_length, "lr": lr, "scheduler": str(pa.lr_scheduler_type.value),
                             "grad_ckpt": bool(pa.gradient_checkpointing),
                             "compile": bool(pa.torch_compile), "warmup_steps": pa.get_warmup_steps(total_steps),
                             "lora_dropout": a.baseline_dropout, "liger": "-"}
    curves = {arm.name: [] for arm in arms}
    time_curves = {arm.name: [] for arm in arms}  # (training seconds incl. round 1, loss)
    base_loss = validation_loss(arms[0].trainer.model, val)
    for arm in arms:
        curves[arm.name].append((0.0, base_loss))
        time_curves[arm.name].append((0.0, base_loss))
    print(f"setup {setup_s:.0f}s; validation loss before training {base_loss:.4f} ({len(val)} rows); "
          f"load {_bench.machine()['load_avg']}", flush=True)
    for r in range(a.rounds):
        for arm in arms:
            arm.run_round()
            last = arm.rounds[-1]
            loss = validation_loss(arm.trainer.model, val)
            curves[arm.name].append((float(arm.tokens), loss))
            time_curves[arm.name].append((sum(x["seconds"] for x in arm.rounds), loss))
            print(f"round {r + 1}/{a.rounds} {arm.name:8s} steps {last['step']:3d} | {last['tokens']:6d} tok "
                  f"in {last['seconds']:6.1f}s = {last['tokens'] / last['seconds']:6.1f} tok/s | val loss {loss:.4f} "
                  f"| rss {_bench.rss_mb():.0f} MB | load {_bench.machine()['load_avg'][0]}", flush=True)
    for arm in arms:
        arm.go.set()
        arm.thread.join(timeout=120)

    results = []
    common = min(curves[arm.name][-1][0] for arm in arms)
    for arm in arms:
        timed = arm.rounds[1:] if len(arm.rounds) > 1 else arm.rounds
        tokens = sum(r["tokens"] for r in timed)
        seconds = sum(r["seconds"] for r in timed)
        flops = arm.flops_per_second(timed)
        per_round = [r["tokens"] / r["seconds"] for r in timed]
        results.append({
            "arm": arm.name, **settings[arm.name],
            "tok_s": round(tokens / seconds, 1),
            "tok_s_rounds": [round(x, 1) for x in per_round],
            "round1_s": round(arm.rounds[0]["seconds"], 1),  # warm-up (and compilation): not in tok_s
            "label_tok_s": round(sum(r["label_tokens"] for r in timed) / seconds, 1),
            "tokens_per_step": round(arm.tokens / arm.rounds[-1]["step"], 1),
            "gflop_s": round(flops / 1e9, 1),
            "util_fp32": round(flops / 1e9 / gemm["fp32"], 3) if gemm["fp32"] else None,
            "util_bf16": round(flops / 1e9 / gemm["bf16"], 3) if gemm["bf16"] else None,
            "cuda_peak_mb": round(arm.cuda_peak_mb) if torch.cuda.is_available() else None,
            "val_loss_end": round(curves[arm.name][-1][1], 4),
            "tokens_end": int(curves[arm.name][-1][0]),
            "val_loss_at_equal_tokens": round(interpolate(curves[arm.name], common), 4),
            "matmul_params_frozen": arm.n_frozen, "matmul_params_trainable": arm.n_trainable,
            "layers_without_backward": arm.layers_no_backward,
        })
    by = {r["arm"]: r for r in results}
    # Time to equal loss: the training seconds (round 1 included) each arm needs to reach the higher of the
    # two final validation losses (each arm of ours against the baseline). The ratio is the speed-up that counts
    # when the arms differ in how much they learn per token (batch size, packing, schedule).
    if base_name in by:
        for r in results:
            if r["arm"] == base_name:
                continue
            target = max(curves[r["arm"]][-1][1], curves[base_name][-1][1])
            t_ours, t_base = (seconds_to_loss(time_curves[k], target) for k in (r["arm"], base_name))
            r["tok_s_vs_base"] = round(r["tok_s"] / by[base_name]["tok_s"], 2)
            r["loss_target"] = round(target, 4)
            r["seconds_to_loss"] = round(t_ours, 1) if t_ours is not None else None
            r["base_seconds_to_loss"] = round(t_base, 1) if t_base is not None else None
            r["time_to_loss_vs_base"] = round(t_base / t_ours, 2) if t_ours and t_base else None
    ours_row = by.get("ours", {})
    ratio, time_ratio, target = (ours_row.get(k) for k in ("tok_s_vs_base", "time_to_loss_vs_base", "loss_target"))
    out = {"machine": _bench.machine(), "gemm_peak_gflop_s": gemm, "peak_rss_mb_process": _bench.peak_rss_mb(),
           "steps_per_round": a.steps, "rounds": a.rounds, "equal_tokens": int(common),
           "baseline_arm": base_name, "before_overrides": a.before,
           "ratio_ours_over_plain_tok_s": ratio, "loss_target": round(target, 4) if target else None,
           "ratio_plain_over_ours_seconds_to_loss": time_ratio, "overrides": a.overrides, "arms": results,
           "curves": {k: [(int(t), round(l, 4)) for t, l in v] for k, v in curves.items()},
           "time_curves": {k: [(round(t, 1), round(l, 4)) for t, l in v] for k, v in time_curves.items()}}
    print()
    print(_bench.table(results, ["arm", "method", "precision", "batch_size", "grad_accum", "lr", "lora_dropout",
                                 "liger", "packing", "padding_free", "optim", "grad_ckpt", "compile", "max_length",
                                 "round1_s", "tok_s", "label_tok_s", "tokens_per_step", "gflop_s", "util_fp32", "util_bf16",
                                 "val_loss_at_equal_tokens", "val_loss_end", "seconds_to_loss", "tok_s_vs_base",
                                 "time_to_loss_vs_base"]
                        + (["cuda_peak_mb"] if torch.cuda.is_available() else [])))
    if time_ratio is not None:
        print(f"\ntime to validation loss {target:.4f} (the higher final loss; training seconds, round 1 included): "
              f"{base_name}/ours = {time_ratio}")
    print(f"\nours/{base_name} tokens/s: {ratio}   (loss compared at {int(common)} trained tokens; first round = warm-up, "
          f"not timed)   GEMM peak {gemm} GFLOP/s   peak RSS (process, both arms) {out['peak_rss_mb_process']} MB   "
          f"load {out['machine']['load_avg']}")
    _bench.emit(out)


if __name__ == "__main__":
    main()
