"""Route stage: when to send a request to a strong model instead of answering it with the fine-tuned one.

With `route.strong` set, for the validation rows (route.validation_examples) and the test rows the evaluate
stage scores (evaluate.max_examples), the stage answers every row with each form of the fine-tuned model in
`route.small` (finetuned in transformers, gguf-Q4_K_M in llama.cpp as served; token log-probabilities kept)
and with the strong model (finetune.route.strong). Then, per small model:
  1. each answer's signals (finetune.route.signals) and the scorer: each single signal, and a logistic
     combiner scored by 5-fold cross-validation, on the validation rows only; the one whose validation
     curve has the highest mean quality wins (the combiner is refitted on all validation rows);
  2. the threshold, chosen on the validation curve for the target (finetune.route.curves.choose);
  3. on the untouched test rows: the curve, RouteLLM's APGR and CPT(50%)/CPT(80%), the quality and share
     escalated at the chosen threshold, and the calls and strong-model tokens saved against always strong.
Writes router.json (what finetune-route serves: the first GGUF of route.small), plots/route.png, the
"Routing" section of report.md and metrics.json's "route" summary. The task's specialist (from the
evaluate stage's metrics.json, same test rows) is shown as a point: it is a model that needs no router.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ConfigError, DataError
from finetune.core.files import write_json_atomic
from finetune.core.fingerprint import data_sha256, file_sha256
from finetune.core.hardware import torch_threads
from finetune.core.rundir import RunDir, quant_of
from finetune.data.rows import run_task
from finetune.evaluate.metrics import read_json
from finetune.evaluate.stage import Session, base_and_finetuned, load_rows, with_shots
from finetune.models.loading import saved_tokenizer
from finetune.route import curves
from finetune.route.signals import SIGNALS, Scorer, features, fit_logistic
from finetune.route.strong import endpoint_answers, gguf_answers, strong_kind

log = logging.getLogger("finetune")
FORMAT = 1  # router.json's layout version


def answer_format_sha256(task: Any) -> str:
    """What a router's confidence was fitted to beyond task and model names: prompt and answer format."""
    copies = {"values_copied_from_input": True} if task.per_input else {}  # absent: hashes of earlier routers hold
    return data_sha256({"constraint": task.answer_constraint(), "system": task.system_prompt,
                        "template": task.prompt_template, **copies})


def small_gguf(run: RunDir, cfg: Config, name: str):
    quant = name.removeprefix("gguf-")
    return next((p for p in run.gguf_files(cfg.model.name, cfg.task.name) if quant_of(p) == quant), None)


def answer(cfg: Config, run: RunDir, task: Any, rows: list[dict], train_rows: list[dict]) -> Session:
    """Every model the router needs, on `rows`: the small ones with log-probabilities, and the strong one."""
    r = cfg.route
    s = Session(cfg, run, task, rows, train_rows)
    with torch_threads(cfg.evaluate.n_threads):
        if "finetuned" in r.small:
            base_and_finetuned(s)
        for name in (n for n in r.small if n.startswith("gguf-")):
            path = small_gguf(run, cfg, name)
            if path is None:
                log.warning("[route] no %s GGUF in %s: no router for it", name, run.gguf_dir)
                continue
            s.gguf(name, path, saved_tokenizer(cfg.model, run.adapter_dir, run.merged_dir), {"source": str(path)})
        kind = strong_kind(r.strong)
        if kind == "registry":
            s.other_model(r.strong)
            s.outputs["strong"], s.models["strong"] = s.outputs.pop(r.strong), s.models.pop(r.strong)
        else:
            conversations = [with_shots(row["prompt"], s.shots()) for row in rows]
            if kind == "gguf":
                outputs = gguf_answers(r.strong, conversations, s.sampling.max_new_tokens, s.grammars,
                                       cfg.evaluate.n_threads)
            else:
                outputs = endpoint_answers(r.strong, r.strong_model, conversations, s.sampling.max_new_tokens,
                                           [task.answer_constraint(task.input_of(row)) if cfg.evaluate.constrained
                                            else None for row in rows],
                                           r.timeout_s)
            s.record("strong", outputs, {"runtime": kind, "source": r.strong, "few_shot": len(s.shots())})
    return s


def signals_of(task: Any, outputs: list) -> list[dict[str, float]]:
    if any(g.logprobs is None for g in outputs):
        raise DataError("the small model's answers carry no token log-probabilities (a cached or one-at-a-time "
                        "answer): the router needs them")
    return [features(task, g.text, g.logprobs, g.stopped) for g in outputs]


def bad_rows(task: Any, scores: list[float]) -> list[bool]:
    """Rows whose small answer is not right: below full marks, or below the median for a continuous metric."""
    if task.kind == "generation":
        cut = sorted(scores)[len(scores) // 2]
        return [x < cut for x in scores]
    return [x < 1 - 1e-9 for x in scores]


def pick_scorer(task: Any, refs: list, small: list[str], strong: list[str], xs: list[dict], bad: list[bool]):
    """The single signal or cross-validated logistic combiner whose validation curve has the best mean quality."""
    signals = [Scorer(kind="signal", signal=k) for k in SIGNALS]
    candidates = [(scorer, [scorer.confidence(x) for x in xs]) for scorer in signals]
    if min(sum(bad), len(bad) - sum(bad)) >= 5:  # both classes in every fold
        def fit(train: list[int]):
            scorer = fit_logistic([xs[i] for i in train], [bad[i] for i in train])
            return lambda i: scorer.confidence(xs[i])

        candidates.append((fit_logistic(xs, bad), curves.cross_validated(fit, len(xs))))
    rated = []
    for scorer, conf in candidates:
        rated.append((curves.measures(curves.curve(task, refs, small, strong, conf))["mean_quality"], scorer))
    best = max(rated, key=lambda t: t[0])[1]
    return best, {s.name(): round(q, 4) for q, s in rated}


def fit_router(cfg: Config, task: Any, val: Session, test: Session, name: str) -> dict:
    r = cfg.route
    refs_v = [row["reference"] for row in val.rows]
    refs_t = [row["reference"] for row in test.rows]
    small_v, strong_v = [g.text for g in val.outputs[name]], [g.text for g in val.outputs["strong"]]
    small_t, strong_t = [g.text for g in test.outputs[name]], [g.text for g in test.outputs["strong"]]
    xs_v, xs_t = signals_of(task, val.outputs[name]), signals_of(task, test.outputs[name])
    rows_small_v = curves.row_scores(task, refs_v, small_v)
    rows_strong_v = curves.row_scores(task, refs_v, strong_v)
    scorer, compared = pick_scorer(task, refs_v, small_v, strong_v, xs_v, bad_rows(task, rows_small_v))
    conf_v = [scorer.confidence(x) for x in xs_v]
    curve_v = curves.curve(task, refs_v, small_v, strong_v, conf_v)
    chosen = curves.choose(curve_v, conf_v, rows_small_v, rows_strong_v, max_escalated=r.max_escalated,
                           target_quality=r.target_quality, min_confidence=r.min_confidence)
    conf_t = [scorer.confidence(x) for x in xs_t]
    curve_t = curves.curve(task, refs_t, small_t, strong_t, conf_t)
    at = curves.apply(task, refs_t, small_t, strong_t, conf_t, chosen["escalate_below"],
                      [g.n_tokens for g in test.outputs["strong"]])
    log.info("[route] %s: %s, escalate below %s -> test %s=%.4f with %.0f%% escalated (small %.4f, strong %.4f)",
             name, scorer.name(), chosen["escalate_below"], task.headline_metric, at["quality"],
             100 * at["share_escalated"], curve_t[0]["quality"], curve_t[-1]["quality"])
    return {"scorer": scorer.to_dict(), "scorers_compared": compared, "escalate_below": chosen["escalate_below"],
            "choice": chosen,
            "validation": {"n": len(refs_v), **curves.measures(curve_v), "curve": curve_v},
            "test": {"n": len(refs_t), **curves.measures(curve_t), "at_threshold": at, "curve": curve_t}}


def specialist_points(run: RunDir) -> dict:
    """The evaluate stage's baselines on the same test rows: quality of models that need no router."""
    metrics = read_json(run.metrics_path) or {}
    head = metrics.get("headline_metric")
    return {n: {"quality": e[head], "baseline": e.get("baseline")} for n, e in (metrics.get("models") or {}).items()
            if e.get("runtime") == "python" and head in e}


def route(cfg: Config, run: RunDir) -> dict:
    """Stage `route`: see the module docstring."""
    r = cfg.route
    if not r.strong:
        return {"skipped": "route.strong is not set: no strong model to route to"}
    task = run_task(cfg.task, run)
    train_path = run.split_path("train")
    train_rows = load_rows(train_path) if train_path.is_file() else []
    val_rows = load_rows(run.split_path("validation"))[: r.validation_examples or None]
    test_rows = load_rows(run.split_path("test"))[: cfg.evaluate.max_examples or None]
    if len(val_rows) < 10 or not test_rows:
        raise DataError(f"the route stage needs >= 10 validation rows and some test rows; {run.data_dir} has "
                        f"{len(val_rows)} and {len(test_rows)}")
    # The strong model's prompt gets route.strong_few_shot examples; the evaluation's other passes stay off.
    ev = dataclasses.replace(cfg.evaluate, base=False, unconstrained=[], merged=False, compare=[],
                             base_few_shot=r.strong_few_shot, llama_cpp_parallel=max(2, cfg.evaluate.llama_cpp_parallel))
    rcfg = dataclasses.replace(cfg, evaluate=ev)
    val, test = answer(rcfg, run, task, val_rows, train_rows), answer(rcfg, run, task, test_rows, train_rows)
    routers = {n: fit_router(cfg, task, val, test, n) for n in r.small if n in val.outputs and n in test.outputs}
    if not routers:
        raise ConfigError(f"route.small={list(r.small)}: none of these models is in the run (answered: "
                          f"{sorted(val.outputs)})")
    served = next((n for n in r.small if n.startswith("gguf-") and n in routers), None)
    shots = val.shots()
    router = {
        "format": FORMAT,
        "task": cfg.task.name, "task_kind": str(cfg.task.kind), "headline_metric": task.headline_metric,
        "model": cfg.model.name,
        "answer_constraint_sha256": answer_format_sha256(task),
        "max_new_tokens": cfg.task.max_new_tokens,
        "strong": {"spec": r.strong, "kind": strong_kind(r.strong), "model": r.strong_model,
                   "few_shot": len(shots),
                   "shots": [{"prompt": row["prompt"], "completion": row["completion"]} for row in shots],
                   "entry": test.models.get("strong")},
        "target": {"max_escalated": r.max_escalated, "target_quality": r.target_quality,
                   "min_confidence": r.min_confidence},
        "served": None,
        "routers": routers,
        "specialists": specialist_points(run),
    }
    if served:
        path = small_gguf(run, cfg, served)
        router["served"] = {"small": served, "gguf": str(path.relative_to(run.root)), "sha256": file_sha256(path),
                            "scorer": routers[served]["scorer"], "escalate_below": routers[served]["escalate_below"]}
    write_json_atomic(run.router_path, router)
    from finetune.route.report import publish

    publish(cfg, run, router)
    return {"routers": {n: {"scorer": Scorer.from_dict(v["scorer"]).name(),
                            "test_quality": v["test"]["at_threshold"]["quality"],
                            "test_share_escalated": v["test"]["at_threshold"]["share_escalated"]}
                        for n, v in routers.items()},
            "served": served}
