"""Evaluation stage: every model of the run on the held-out test split, scored with the task's metric.

Evaluated, each under one name in metrics.json and predictions/<name>.jsonl:
  base            the model before fine-tuning (optionally k-shot, so the comparison is fair)
  finetuned       base + the trained adapter (or the full fine-tuned model)
  merged, gptq    the exported Hugging Face checkpoints, through transformers
  gguf-<QUANT>    every GGUF in the run, through llama.cpp (the runtime Ollama uses)
  <registry name> comparison models from conf/model/ (evaluate.compare), zero/few-shot
  specialist      the task's non-LLM baseline
so the report shows what fine-tuning gained and what each quantization costs on the task itself.

Outputs (stable for scripts; report.md and finetune-compare read only these):
  metrics.json   {"task", "task_kind", "headline_metric", "model", "method", "n", "generation": {...},
                  "models": {name: {<task metrics, e.g. field_f1>, "n", "latency_s_mean", "tokens_per_s",
                                    "generated_tokens_mean", "stopped_fraction", "seconds", "runtime",
                                    "source", "few_shot", ["size_bytes"]} | {"error": "...", ...}}}
  predictions/<name>.jsonl   id, input, expected, reference, output (raw), the task's score row
                             (parsed, correct, ...), n_tokens, latency_s, stopped
Re-scoring a predictions file with task.score(references, outputs) gives that model's metrics.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from finetune.data import read_rows
from finetune.generate import (
    Generation,
    cpu_threads,
    generate_llama_cpp,
    generate_transformers,
    sampling_from,
    torch_threads,
)
from finetune.models import ModelUnavailable
from finetune.pipeline import RunDir

log = logging.getLogger("finetune")

# Keys of a metrics.json model entry that describe the run, not the task metric (report.py uses them).
SPEED_KEYS = ["latency_s_mean", "tokens_per_s", "generated_tokens_mean", "stopped_fraction", "seconds"]
INFO_KEYS = ["n", "runtime", "source", "few_shot", "batch_size", "n_ctx", "size_bytes", "error"]


# ---------------------------------------------------------------------------------------------
# Inputs


def load_rows(path: Path) -> list[dict]:
    """Rows of a split file written by the data stage (docs/architecture.md), with their references."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: run the data stage first (stages=[data,...]).")
    return read_rows(path, required=("id", "prompt", "completion", "reference"))


def expected_output(row: dict) -> str:
    return row["completion"][-1]["content"]


def with_shots(prompt: list[dict], shots: list[dict]) -> list[dict]:
    """System message, then each shot as a user/assistant exchange, then the question."""
    system = [m for m in prompt if m["role"] == "system"]
    rest = [m for m in prompt if m["role"] != "system"]
    examples = []
    for shot in shots:
        examples += [m for m in shot["prompt"] if m["role"] != "system"] + list(shot["completion"])
    return system + examples + rest


def pick_shots(train_rows: list[dict], k: int, seed: int) -> list[dict]:
    if k <= 0:
        return []
    if len(train_rows) < k:
        raise SystemExit(f"error: evaluate.base_few_shot={k} but the train split has {len(train_rows)} rows")
    return random.Random(seed).sample(train_rows, k)


def model_config(name: str) -> DictConfig:
    """A registry model's ModelConfig, composed from conf/model/NAME.yaml onto the schema."""
    from finetune.config import CONF_DIR, ModelConfig

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise SystemExit(f"error: evaluate.compare: no model {name!r} in {path.parent}; known: {', '.join(known)}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))


def gguf_name(path: Path, taken: set[str]) -> str:
    """gguf-Q4_K_M for model-Q4_K_M.gguf / model.q8_0.gguf; the file stem when no quant type shows."""
    last = re.split(r"[-.]", path.stem)[-1]
    quant = last.upper() if re.fullmatch(r"(?i)(i?q\d\w*|bf16|f16|f32)", last) else path.stem
    name, i = f"gguf-{quant}", 2
    while name in taken:
        name, i = f"gguf-{quant}-{i}", i + 1
    return name


def _hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Scoring and writing


def score(task: Any, rows: list[dict], outputs: list[Generation], info: dict) -> tuple[dict, list[dict]]:
    """Task metrics + speed for one model, and its prediction rows (re-scorable from the file)."""
    metrics, scored = task.score([r["reference"] for r in rows], [g.text for g in outputs])
    predictions = []
    for row, gen, s in zip(rows, outputs, scored):
        predictions.append(
            {
                "id": row["id"],
                "input": task.input_of(row),
                "expected": expected_output(row),
                "reference": row["reference"],
                "output": gen.text,
                **s,
                "n_tokens": gen.n_tokens,
                "latency_s": round(gen.latency_s, 4),
                "stopped": gen.stopped,
            }
        )
    seconds = sum({g.batch: g.latency_s for g in outputs}.values())
    tokens = sum(g.n_tokens for g in outputs)
    entry = {
        **metrics,
        "n": len(rows),
        "latency_s_mean": round(sum(g.latency_s for g in outputs) / max(len(outputs), 1), 4),
        "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds > 0 else None,
        "generated_tokens_mean": round(tokens / max(len(outputs), 1), 2),
        "stopped_fraction": round(sum(g.stopped for g in outputs) / max(len(outputs), 1), 4),
        "seconds": round(seconds, 2),
        **info,
    }
    return entry, predictions


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_predictions(run: RunDir, name: str, predictions: list[dict]) -> Path:
    path = run.predictions_dir / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for p in predictions:
            fh.write(json.dumps(p, default=str, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The stage


class _Session:
    """What every model's evaluation shares: the rows, the task, the settings, the results so far."""

    def __init__(self, cfg: DictConfig, run: RunDir, task: Any, rows: list[dict], train_rows: list[dict]):
        import torch

        from finetune.models import device_for

        self.cfg, self.run, self.task, self.rows, self.train_rows = cfg, run, task, rows, train_rows
        self.sampling = sampling_from(cfg)
        self.device = device_for(cfg)
        cuda_bf16 = self.device == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        self.models: dict[str, dict] = {}
        self.predictions: dict[str, list[dict]] = {}

    def prompts(self, tokenizer: Any, model_cfg: DictConfig, shots: list[dict]) -> list[str]:
        from finetune.models import render_prompt

        return [render_prompt(tokenizer, with_shots(r["prompt"], shots), model_cfg) for r in self.rows]

    def record(self, name: str, outputs: list[Generation], info: dict) -> None:
        entry, predictions = score(self.task, self.rows, outputs, info)
        self.models[name], self.predictions[name] = entry, predictions
        headline = entry.get(self.task.headline_metric)
        log.info("[evaluate] %-16s %s=%s  %.2f s/example  %s tok/s", name, self.task.headline_metric,
                 headline, entry["latency_s_mean"], entry["tokens_per_s"])

    def guarded(self, name: str, info: dict, fn: Callable[[], None]) -> None:
        """Artifacts and comparison models: a failure is reported in metrics.json, not fatal."""
        try:
            fn()
        except (Exception, ModelUnavailable) as exc:  # noqa: BLE001 - recorded and shown in the report
            log.exception("[evaluate] %s failed", name)
            self.models[name] = {**info, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            gc.collect()

    def transformers(self, name: str, model: Any, tokenizer: Any, model_cfg: DictConfig, info: dict,
                     shots: list[dict] = ()) -> None:
        prompts = self.prompts(tokenizer, model_cfg, list(shots))
        outputs = generate_transformers(model, tokenizer, prompts, list(model_cfg.stop_tokens), self.sampling,
                                        batch_size=int(self.cfg.evaluate.batch_size))
        self.record(name, outputs, {"runtime": "transformers", "few_shot": len(shots),
                                    "batch_size": int(self.cfg.evaluate.batch_size), **info})

    def hf_checkpoint(self, name: str, path: Path, info: dict) -> None:
        from finetune.models import load_model, load_tokenizer

        model_cfg = self.cfg.model
        tokenizer = load_tokenizer(model_cfg, path=str(path) if _has_tokenizer(path) else None)
        if name == "gptq":  # the dtype its quantization config asks for, as a GPTQ server loads it
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), device_map=self.device)
        else:
            model = load_model(model_cfg, path=str(path), dtype=self.dtype).to(self.device)
        self.transformers(name, model, tokenizer, model_cfg, info)
        del model

    def gguf(self, name: str, path: Path, tokenizer: Any, info: dict) -> None:
        model_cfg = self.cfg.model
        prompts = self.prompts(tokenizer, model_cfg, [])
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        n_ctx = -(-(longest + self.sampling.max_new_tokens + 16) // 256) * 256
        outputs = generate_llama_cpp(path, prompts, list(model_cfg.stop_tokens), self.sampling, n_ctx=n_ctx,
                                     n_threads=self.cfg.evaluate.n_threads or cpu_threads(),
                                     bos_token=tokenizer.bos_token)
        self.record(name, outputs, {"runtime": "llama.cpp", "few_shot": 0, "n_ctx": n_ctx, **info})


def evaluate(cfg: DictConfig, run: RunDir) -> dict:
    """Stage `evaluate`: see the module docstring. Writes metrics.json, predictions/, report.md, plots/."""
    with torch_threads(cfg.evaluate.n_threads):
        return _evaluate(cfg, run)


def _evaluate(cfg: DictConfig, run: RunDir) -> dict:
    from finetune.models import load_model, load_tokenizer
    from finetune.tasks import get_task

    task = get_task(cfg.task)
    rows = load_rows(run.data_dir / "test.jsonl")
    if cfg.evaluate.max_examples:
        rows = rows[: int(cfg.evaluate.max_examples)]
    if not rows:
        raise SystemExit(f"error: {run.data_dir / 'test.jsonl'} has no rows to evaluate")
    train_path = run.data_dir / "train.jsonl"
    train_rows = load_rows(train_path) if train_path.is_file() else []
    s = _Session(cfg, run, task, rows, train_rows)
    ev = cfg.evaluate
    log.info("[evaluate] %d test examples, max_new_tokens=%d, %s", len(rows), s.sampling.max_new_tokens,
             "sampling" if s.sampling.do_sample else "greedy")

    adapter = run.adapter_dir
    has_adapter = (adapter / "adapter_config.json").is_file()
    # Base and adapter share one load of the base weights: PEFT wraps the model evaluated as base.
    # A QLoRA adapter is applied to the full-precision base, as the merge stage does (FACTS.md).
    if ev.base or has_adapter:
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dtype=s.dtype).to(s.device)
        if ev.base:
            shots = pick_shots(train_rows, int(ev.base_few_shot), int(cfg.method.seed))
            s.transformers("base", model, tokenizer, cfg.model, {"source": cfg.model.name}, shots)
        if has_adapter:
            from peft import PeftModel

            if _has_tokenizer(adapter):
                tokenizer = load_tokenizer(cfg.model, path=str(adapter))
            # Folded into the weights in memory (fp32: logits within 1e-4 of the unmerged adapter): the same
            # model, generated ~2x faster than through PEFT's extra LoRA matmuls in every layer.
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            s.transformers("finetuned", model, tokenizer, cfg.model, {"source": str(adapter)})
        del model
        gc.collect()
    if not has_adapter and _hf_dir(adapter):  # method=full saves the whole model where the adapter would be
        s.hf_checkpoint("finetuned", adapter, {"source": str(adapter)})

    if ev.artifacts:
        for name, path in (("merged", run.merged_dir), ("gptq", run.gptq_dir)):
            if _hf_dir(path):
                info = {"source": str(path), "size_bytes": _dir_size(path)}
                s.guarded(name, info, lambda n=name, p=path, i=info: s.hf_checkpoint(n, p, i))
        ggufs = sorted(run.gguf_dir.glob("*.gguf")) if run.gguf_dir.is_dir() else []
        if ggufs:
            # The prompt text the Modelfile's TEMPLATE renders (export checks that the two agree).
            src = next((d for d in (adapter, run.merged_dir) if _has_tokenizer(d)), None)
            gguf_tokenizer = load_tokenizer(cfg.model, path=str(src) if src else None)
            for path in ggufs:
                name = gguf_name(path, set(s.models))
                info = {"source": str(path), "size_bytes": path.stat().st_size}
                s.guarded(name, info, lambda n=name, p=path, i=info: s.gguf(n, p, gguf_tokenizer, i))

    for other in ev.compare:
        if other == cfg.model.name:
            log.warning("[evaluate] evaluate.compare: %s is this run's base model; skipped", other)
            continue

        def run_other(other: str = other) -> None:
            other_cfg = model_config(other)
            tok = load_tokenizer(other_cfg)
            model = load_model(other_cfg, dtype=s.dtype).to(s.device)
            shots = pick_shots(train_rows, int(ev.base_few_shot), int(cfg.method.seed))
            s.transformers(other, model, tok, other_cfg, {"source": other}, shots)

        s.guarded(other, {"source": other}, run_other)

    if ev.specialist:
        t0 = time.perf_counter()
        outputs = task.specialist_baseline(train_rows, rows)
        if outputs is not None:
            per = (time.perf_counter() - t0) / max(len(rows), 1)
            gens = [Generation(o, 0, per, stopped=True, batch=i) for i, o in enumerate(outputs)]
            s.record("specialist", gens, {"runtime": "python", "few_shot": 0})
            s.models["specialist"].update(tokens_per_s=None, generated_tokens_mean=None, stopped_fraction=None)

    metrics = {
        "task": cfg.task.name,
        "task_kind": str(getattr(cfg.task.kind, "value", cfg.task.kind)),
        "headline_metric": task.headline_metric,
        "model": cfg.model.name,
        "method": str(getattr(cfg.method.name, "value", cfg.method.name)),
        "n": len(rows),
        "generation": {
            "max_new_tokens": s.sampling.max_new_tokens,
            "do_sample": s.sampling.do_sample,
            **({"temperature": s.sampling.temperature, "top_p": s.sampling.top_p} if s.sampling.do_sample else {}),
            "device": s.device,
            "threads": int(cfg.evaluate.n_threads or cpu_threads()),
        },
        "models": s.models,
    }
    run.predictions_dir.mkdir(parents=True, exist_ok=True)
    for old in run.predictions_dir.glob("*.jsonl"):  # evaluate describes the run as it is now
        old.unlink()
    prediction_files = {name: str(write_predictions(run, name, p)) for name, p in s.predictions.items()}
    _write_json(run.metrics_path, metrics)

    from finetune.report import write_report

    report_files = write_report(cfg, run, metrics)
    exported = {n: e["source"] for n, e in s.models.items() if "size_bytes" in e}
    if run.adapter_dir.is_dir():
        exported["adapter"] = str(run.adapter_dir)
    _log_to_tracker(cfg, run, metrics, s.predictions, {**exported, **prediction_files, **report_files})
    return {
        "n": len(rows),
        "headline_metric": task.headline_metric,
        "results": {k: v.get(task.headline_metric, v.get("error")) for k, v in s.models.items()},
    }


def _log_to_tracker(cfg: DictConfig, run: RunDir, metrics: dict, tables: dict, artifacts: dict) -> None:
    try:
        from finetune.tracking import log_results
    except ImportError:
        return
    log_results(cfg, run, metrics, tables, artifacts)
