"""Evaluate stage: every model of the run on the held-out test split, scored with the task's metric.

Evaluated, each under one name in metrics.json and predictions/<name>.jsonl (finetune.evaluate.metrics):
  base            the model before fine-tuning (optionally k-shot, so the comparison is fair)
  finetuned       base + the trained adapter (or the full fine-tuned model)
  merged, gptq    the exported Hugging Face checkpoints, through transformers (merged: evaluate.merged=true;
                  the merge stage already proves its logits equal the adapter's)
  gguf-<QUANT>    every GGUF in the run, through llama.cpp (the runtime Ollama uses)
  <registry name> comparison models from conf/model/ (evaluate.compare), zero/few-shot
  specialist      the task's non-LLM baseline (task.specialist), fitted on the train split where it learns
  reference-<b>   each further baseline the task names as a reference point (task.reference_baselines)
so the report shows what fine-tuning gained and what each quantization costs on the task itself.
Every model decodes under the task's answer constraint (evaluate.constrained: the GBNF grammar of
finetune.tasks.grammar, in llama.cpp natively and in transformers through llguidance), and the models
that evaluate.unconstrained names (default: finetuned) once more without it, as <name>-unconstrained; in
transformers, greedy, that pass decodes only the rows whose constrained answer the grammar steered.
A failing artifact or comparison model is recorded with its error and the rest goes on.
"""

from __future__ import annotations

import fnmatch
import functools
import gc
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

from finetune.core.config import Config, ModelConfig, model_config
from finetune.core.errors import ConfigError, DataError
from finetune.core.files import dir_size, write_json_atomic
from finetune.core.hardware import cpu_threads, torch_threads
from finetune.core.rundir import RunDir, quant_of
from finetune.data.rows import read_rows, run_task
from finetune.evaluate.cache import answers_key, load_answers, save_answers
from finetune.evaluate.intervals import against
from finetune.evaluate.metrics import read_json, score, write_predictions
from finetune.evaluate.report import write_report
from finetune.evaluate.served import vllm_artifacts
from finetune.models.loading import (
    device_for,
    has_tokenizer,
    load_model,
    load_tokenizer,
    render_prompt,
    resolve_model,
    saved_tokenizer,
)
from finetune.runtimes.generation import Generation, Sampling, longest_prompt
from finetune.runtimes.llamacpp import generate_llama_cpp
from finetune.runtimes.llamacpp_batch import context_size, generate_llama_cpp_batched
from finetune.runtimes.transformers import generate_transformers, generation_dtype
from finetune.tasks import Task
from finetune.tasks.grammar import describe
from finetune.train.tracking import log_results

log = logging.getLogger("finetune")


# ---------------------------------------------------------------------------------------------
# Inputs


def load_rows(path: Path) -> list[dict]:
    """Rows of a split file written by the data stage, with their references."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the data stage first (stages=[data,...]).")
    return read_rows(path, required=("id", "prompt", "completion", "reference"))


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
        raise ConfigError(f"evaluate.base_few_shot={k} but the train split has {len(train_rows)} rows")
    return random.Random(seed).sample(train_rows, k)


def sampling_from(cfg: Config) -> Sampling:
    return Sampling(max_new_tokens=cfg.task.max_new_tokens, do_sample=cfg.evaluate.do_sample,
                    temperature=cfg.evaluate.temperature, top_p=cfg.evaluate.top_p,
                    seed=cfg.method.seed)


def gguf_name(path: Path, taken: set[str]) -> str:
    """gguf-Q4_K_M for model-Q4_K_M.gguf; the file stem when no quant type shows; unique among `taken`."""
    quant = quant_of(path) or path.stem
    name, i = f"gguf-{quant}", 2
    while name in taken:
        name, i = f"gguf-{quant}-{i}", i + 1
    return name


def _hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# One evaluation: what every model shares, and each kind of model


class Session:
    """The rows, the task, the settings, and the results so far."""

    def __init__(self, cfg: Config, run: RunDir, task: Task, rows: list[dict], train_rows: list[dict]):
        self.cfg, self.run, self.task, self.rows, self.train_rows = cfg, run, task, rows, train_rows
        self.sampling = sampling_from(cfg)
        self.device = device_for(cfg.device)
        self.dtype = generation_dtype(str(cfg.evaluate.precision), self.device)
        self.models: dict[str, dict] = {}
        self.predictions: dict[str, list[dict]] = {}
        self.outputs: dict[str, list[Generation]] = {}  # each model's answers as generated (finetune.route)
        constraint = task.answer_constraint() if cfg.evaluate.constrained else None
        self.constraint = describe(constraint, copies_input=task.per_input)
        self.grammar = task.answer_grammar() if constraint is not None else None  # as metrics.json records it
        # What decoding follows: that grammar, or one per row where values must copy the row's input.
        self.grammars = (task.answer_grammars([task.input_of(r) for r in rows]) if constraint is not None
                         else None)

    def passes(self, name: str) -> list[tuple[str, str | list | None, str]]:
        """(name, grammar or one per row, constraint kind) of each generation pass of a model: constrained,
        and unconstrained as well when evaluate.unconstrained names it."""
        kind = self.constraint["kind"]
        out = [(name, self.grammars, kind)]
        if self.grammars is not None and any(fnmatch.fnmatchcase(name, p) for p in self.cfg.evaluate.unconstrained):
            out.append((f"{name}-unconstrained", None, "none"))
        return out

    def shots(self) -> list[dict]:
        return pick_shots(self.train_rows, self.cfg.evaluate.base_few_shot, self.cfg.method.seed)

    def prompts(self, tokenizer: Any, model_cfg: ModelConfig, shots: list[dict]) -> list[str]:
        return [render_prompt(tokenizer, with_shots(r["prompt"], shots), model_cfg) for r in self.rows]

    def record(self, name: str, outputs: list[Generation], info: dict, wall_seconds: float | None = None,
               reused: set[int] = frozenset()) -> None:
        """Score and keep one pass's answers; `reused`: rows taken from another pass, left out of its tokens/s."""
        entry, predictions = score(self.task, self.rows, outputs, info, wall_seconds)
        if reused:
            made, seconds = sum(g.n_tokens for i, g in enumerate(outputs) if i not in reused), entry["seconds"]
            entry["tokens_per_s"] = round(made / seconds, 2) if made and seconds > 0 else None
        self.models[name], self.predictions[name], self.outputs[name] = entry, predictions, outputs
        log.info("[evaluate] %-16s %s=%s  %s s in all, %.2f s mean latency, %s tok/s", name,
                 self.task.headline_metric, entry.get(self.task.headline_metric), entry.get("seconds"),
                 entry["latency_s_mean"], entry["tokens_per_s"])

    def guarded(self, name: str, info: dict, fn: Callable[[], None]) -> None:
        """Artifacts and comparison models: a failure is reported in metrics.json, not fatal."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded and shown in the report
            log.exception("[evaluate] %s failed", name)
            self.models[name] = {**info, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            gc.collect()

    def transformers(self, name: str, model: Any, tokenizer: Any, model_cfg: ModelConfig, info: dict,
                     shots: list[dict] = (), cache_dir: str | None = None) -> None:
        """Answers of `model` (a torch module, or a function loading it, called only if needed) on the rows. With `cache_dir` (a model
        that does not change between runs) answers come from the cross-run cache when everything they depend
        on is the same (finetune.evaluate.cache)."""
        import torch

        prompts = self.prompts(tokenizer, model_cfg, list(shots))
        batch_size = self.cfg.evaluate.batch_size
        for pass_name, grammar, kind in self.passes(name):
            key = None
            if cache_dir and self.cfg.evaluate.cache:
                key = answers_key(cache_dir, {
                    "prompts": prompts, "stop_tokens": list(model_cfg.stop_tokens), "grammar": grammar,
                    "sampling": self.sampling.decides_answers(), "batch_size": batch_size, "dtype": str(self.dtype),
                    "device": self.device, "threads": torch.get_num_threads()})
            outputs = load_answers(key)
            cached = outputs is not None
            # The unconstrained pass takes the constrained answers the grammar never steered (unsteered()).
            reused = set(unsteered(self.outputs.get(name), self.sampling)) if grammar is None and not cached else set()
            if not cached:
                if not isinstance(model, torch.nn.Module):  # a loader: the model is loaded only when needed
                    model = model()
                todo = [i for i in range(len(prompts)) if i not in reused]
                start = time.perf_counter()
                fresh = generate_transformers(model, tokenizer, [prompts[i] for i in todo],
                                              list(model_cfg.stop_tokens), self.sampling, batch_size=batch_size,
                                              grammar=grammar) if todo else []
                wall = time.perf_counter() - start
                outputs = list(self.outputs[name]) if reused else [None] * len(prompts)
                for i, answer in zip(todo, fresh):
                    outputs[i] = answer
                save_answers(key, outputs, {"model": model_cfg.name, "task": self.task.name, "pass": pass_name})
            extra = {"cached": True} if cached else {"answers_reused": len(reused)} if reused else {}
            self.record(pass_name, outputs, {"runtime": "transformers", "constraint": kind, "few_shot": len(shots),
                                             "batch_size": batch_size, **info, **extra},
                        wall if reused else None, reused)

    def hf_checkpoint(self, name: str, path: Path, info: dict) -> None:
        model_cfg = self.cfg.model
        tokenizer = saved_tokenizer(model_cfg, path)
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
        n_ctx = context_size(longest_prompt(tokenizer, prompts), self.sampling.max_new_tokens)
        parallel = self.cfg.evaluate.llama_cpp_parallel
        for pass_name, grammar, kind in self.passes(name):
            common = dict(n_ctx=n_ctx, n_threads=self.cfg.evaluate.n_threads, bos_token=tokenizer.bos_token,
                          grammar=grammar)
            start = time.perf_counter()
            if parallel > 1:  # many sequences per llama_decode (docs/llamacpp-batching.md)
                outputs = generate_llama_cpp_batched(path, prompts, list(model_cfg.stop_tokens), self.sampling,
                                                     parallel=parallel, **common)
                wall = time.perf_counter() - start  # answers overlap in time: tokens/s over the whole call
            else:
                outputs, wall = generate_llama_cpp(path, prompts, list(model_cfg.stop_tokens), self.sampling,
                                                   **common), None
            self.record(pass_name, outputs, {"runtime": "llama.cpp", "constraint": kind, "few_shot": 0,
                                             "n_ctx": n_ctx, "parallel": parallel, **info}, wall)

    def other_model(self, name: str) -> None:
        """A registry model (evaluate.compare), zero/few-shot like the base model."""
        other_cfg = model_config(name)
        loader = lambda: load_model(other_cfg, dtype=self.dtype).to(self.device)  # noqa: E731 - not when cached
        self.transformers(name, loader, load_tokenizer(other_cfg), other_cfg, {"source": name}, self.shots(),
                          cache_dir=resolve_model(other_cfg))


# ---------------------------------------------------------------------------------------------
# The stage


def unsteered(constrained: list[Generation] | None, sampling: Any) -> list[int]:
    """Rows whose greedy answer under the grammar never left the raw argmax: the unconstrained pass would
    write the same tokens (the same prefix gives the same logits), so it takes those answers and decodes only
    the others. Nothing when any row's steering was not recorded, or when sampling."""
    if not constrained or not sampling.greedy or any(g.steered is None for g in constrained):
        return []
    return [i for i, g in enumerate(constrained) if not g.steered]


def base_and_finetuned(s: Session) -> None:
    """Base and adapter share one load of the base weights: PEFT wraps the model evaluated as base.
    A QLoRA adapter is applied to the full-precision base, as the merge stage does."""
    cfg, adapter = s.cfg, s.run.adapter_dir
    has_adapter = (adapter / "adapter_config.json").is_file()
    if cfg.evaluate.base or has_adapter:
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dtype=s.dtype).to(s.device)
        if cfg.evaluate.base:
            s.transformers("base", model, tokenizer, cfg.model, {"source": cfg.model.name}, s.shots(),
                           cache_dir=resolve_model(cfg.model))
        if has_adapter:
            from peft import PeftModel

            if has_tokenizer(adapter):
                tokenizer = load_tokenizer(cfg.model, path=str(adapter))
            # Folded into the weights in memory (fp32: logits within 1e-4 of the unmerged adapter): the same
            # model, generated ~2x faster than through PEFT's extra LoRA matmuls in every layer.
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            s.transformers("finetuned", model, tokenizer, cfg.model, {"source": str(adapter)})
        del model
        gc.collect()
    if not has_adapter and _hf_dir(adapter):  # method=full saves the whole model where the adapter would be
        s.hf_checkpoint("finetuned", adapter, {"source": str(adapter)})


def artifacts(s: Session) -> None:
    """Every exported artifact in the runtime that serves it."""
    run = s.run
    for name, path in (("merged", run.merged_dir), ("gptq", run.gptq_dir)):
        if name == "merged" and not s.cfg.evaluate.merged:
            continue
        if _hf_dir(path):
            info = {"source": str(path), "size_bytes": dir_size(path)}
            s.guarded(name, info, functools.partial(s.hf_checkpoint, name, path, info))
    ggufs = sorted(run.gguf_dir.glob("*.gguf")) if run.gguf_dir.is_dir() else []
    if ggufs:
        # The prompt text the Modelfile's TEMPLATE renders (export checks that the two agree).
        tokenizer = saved_tokenizer(s.cfg.model, run.adapter_dir, run.merged_dir)
        for path in ggufs:
            name = gguf_name(path, set(s.models))
            info = {"source": str(path), "size_bytes": path.stat().st_size}
            s.guarded(name, info, functools.partial(s.gguf, name, path, tokenizer, info))
    vllm_artifacts(s)


def comparison_models(s: Session) -> None:
    for other in s.cfg.evaluate.compare:
        if other == s.cfg.model.name:
            log.warning("[evaluate] evaluate.compare: %s is this run's base model; skipped", other)
            continue
        s.guarded(other, {"source": other}, functools.partial(s.other_model, other))


def baselines(s: Session) -> None:
    """The task's specialist and its reference baselines: no model, answers computed in Python."""
    task = s.task
    named = [("specialist", task.specialist)] if task.specialist != "none" else []
    named += [(f"reference-{b}", b) for b in task.reference_baselines]
    for entry, name in named:
        info = {"runtime": "python", "few_shot": 0, "baseline": name, "note": task.baseline_notes.get(name, "")}
        s.guarded(entry, info, functools.partial(_baseline, s, entry, name, info))


def _baseline(s: Session, entry: str, name: str, info: dict) -> None:
    t0 = time.perf_counter()
    result = s.task.baseline(name, s.train_rows, s.rows)
    if result is None:  # does not apply to this data; the task logged why
        return
    outputs, extra = result
    per = (time.perf_counter() - t0) / max(len(s.rows), 1)
    s.record(entry, [Generation(o, 0, per, stopped=True, batch=i) for i, o in enumerate(outputs)], {**info, **extra})
    s.models[entry].update(tokens_per_s=None, generated_tokens_mean=None, stopped_fraction=None)


def evaluate(cfg: Config, run: RunDir) -> dict:
    """Stage `evaluate`: see the module docstring. Writes metrics.json, predictions/, report.md, plots/."""
    task = run_task(cfg.task, run)
    rows = load_rows(run.split_path("test"))
    if cfg.evaluate.max_examples:
        rows = rows[: cfg.evaluate.max_examples]
    if not rows:
        raise DataError(f"{run.split_path('test')} has no rows to evaluate")
    train_path = run.split_path("train")
    s = Session(cfg, run, task, rows, load_rows(train_path) if train_path.is_file() else [])
    log.info("[evaluate] %d test examples, max_new_tokens=%d, %s", len(rows), s.sampling.max_new_tokens,
             "sampling" if s.sampling.do_sample else "greedy")
    with torch_threads(cfg.evaluate.n_threads):
        base_and_finetuned(s)
        if cfg.evaluate.artifacts:
            artifacts(s)
        comparison_models(s)
        if cfg.evaluate.specialist:
            baselines(s)
    return write_results(s)


def write_results(s: Session) -> dict:
    cfg, run, task = s.cfg, s.run, s.task
    for name, bounds in against(task, s.predictions).items():  # the Δ column's 95% interval in report.md
        s.models[name]["vs_finetuned_95"] = bounds
    metrics = {
        "task": cfg.task.name,
        "task_kind": str(cfg.task.kind),
        "headline_metric": task.headline_metric,
        "model": cfg.model.name,
        "method": str(cfg.method.name),
        "n": len(s.rows),
        "generation": {
            "max_new_tokens": s.sampling.max_new_tokens,
            "do_sample": s.sampling.do_sample,
            **({"temperature": s.sampling.temperature, "top_p": s.sampling.top_p} if s.sampling.do_sample else {}),
            "device": s.device,
            "dtype": str(s.dtype).removeprefix("torch."),  # of the models transformers generates with
            "threads": int(cfg.evaluate.n_threads or cpu_threads()),
            "constraint": s.constraint,  # what "constraint": <kind> in a model's entry enforced
            **({"grammar": s.grammar} if s.grammar is not None else {}),
        },
        "models": s.models,
    }
    router = read_json(run.router_path)  # the route stage's results stay in the evaluation's files
    if router is not None and router.get("task") == cfg.task.name:
        from finetune.evaluate.routing import summary

        metrics["route"] = summary(router)
    run.predictions_dir.mkdir(parents=True, exist_ok=True)
    for old in run.predictions_dir.glob("*.jsonl"):  # evaluate describes the run as it is now
        old.unlink()
    prediction_files = {name: str(write_predictions(run, name, p)) for name, p in s.predictions.items()}
    write_json_atomic(run.metrics_path, metrics)
    report_files = write_report(cfg, run, metrics)
    exported = {n: e["source"] for n, e in s.models.items() if "size_bytes" in e}
    if run.adapter_dir.is_dir():
        exported["adapter"] = str(run.adapter_dir)
    log_results(cfg, run, metrics, s.predictions, {**exported, **prediction_files, **report_files})
    return {
        "n": len(s.rows),
        "headline_metric": task.headline_metric,
        "results": {k: v.get(task.headline_metric, v.get("error")) for k, v in s.models.items()},
    }
