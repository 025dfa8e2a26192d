"""Routing between the fine-tuned small model and a strong one: the curve's key points per task, and the
router's overhead per request.

    .venv/bin/python scripts/bench_route.py [--tasks extraction classification summarization]
        [--strong qwen2.5-0.5b] [--strong-few-shot 0] [--out outputs/bench_quality] [--overhead 20] [--rerun]
        [-- OVERRIDES...]

For each task it takes the default run that scripts/bench_quality.py made in OUT/<task>/default (running the
plain default pipeline there first if it has none), runs the route stage on it (`stages=[route]
route.strong=STRONG`), and prints, per small model (fine-tuned in transformers, its Q4_K_M GGUF), on the test
rows: small alone, strong alone, quality at the threshold chosen on the validation rows, share escalated,
calls and strong tokens saved, the best point of the curve, APGR and CPT(50%)/CPT(80%), and the task's
specialist as a point. Then, with --overhead N, it serves N test inputs through finetune.route.serve.Router
(threshold as fitted, no escalation counted) and through llama-cpp-python's create_completion on the same
GGUF (the small model alone, as a server answers), in one process, and prints the router's time per request
and the ratio. One JSON line per task, then a table; the machine kind with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from bench_quality import machine_kind, run_finetune, stage_seconds  # noqa: E402


def key_points(router: dict) -> list[dict]:
    rows = []
    for name, r in router["routers"].items():
        t, at = r["test"], r["test"]["at_threshold"]
        rows.append({"small": name, "scorer": r["scorer"].get("signal") or "logistic",
                     "small_alone": t["small"], "strong_alone": t["strong"], "routed": at["quality"],
                     "escalated": at["share_escalated"], "calls_saved": at["calls_saved"],
                     "strong_tokens_saved": at["strong_tokens_saved"], "best": t["best"]["quality"],
                     "best_share": t["best"]["share"], "apgr": t["apgr"], "cpt50": t["cpt50"], "cpt80": t["cpt80"],
                     "choice": r["choice"].get("reason")})
    return rows


def overhead(run_dir: Path, n: int) -> dict:
    """Router.answer vs the small model alone (create_completion on the same GGUF), same inputs, one process."""
    from finetune.core.rundir import RunDir
    from finetune.data.rows import read_rows
    from finetune.models.loading import render_prompt
    from finetune.route.serve import Router
    from finetune.runtimes.llamacpp import open_gguf, prompt_tokens

    run = RunDir(run_dir)
    router = Router(run_dir, n_threads=None)
    task = router.task
    inputs = [task.input_of(r) for r in read_rows(run.split_path("test"), required=("prompt",))[:n]]
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_string(router.grammar, verbose=False) if router.grammar else None
    gguf = run.root / router.router["served"]["gguf"]
    alone, routed, router_ms = [], [], []
    router.client = None  # no strong call: the router's own cost
    try:
        with open_gguf(gguf, n_ctx=router.llama.dec.n_ctx) as llm:
            for text in inputs:  # alternate, so both see the same machine state
                prompt = render_prompt(router.tokenizer, task.prompt_messages(text), router.cfg.model)
                t0 = time.perf_counter()
                llm.create_completion(prompt_tokens(llm, prompt, router.tokenizer.bos_token),
                                      max_tokens=router.sampling.max_new_tokens, temperature=0.0, top_k=0, min_p=0.0,
                                      repeat_penalty=1.0, stop=list(router.cfg.model.stop_tokens), grammar=grammar)
                alone.append(1000 * (time.perf_counter() - t0))
                decision = router.answer(text)
                routed.append(decision["latency_ms"])
                router_ms.append(decision["router_ms"])
    finally:
        router.close()
    return {"n": len(inputs), "small_alone_ms": round(statistics.median(alone), 1),
            "router_ms_total": round(statistics.median(routed), 1),
            "router_own_ms": round(statistics.median(router_ms), 2),
            "ratio": round(statistics.median(routed) / statistics.median(alone), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["extraction", "classification", "summarization"])
    p.add_argument("--strong", default="qwen2.5-0.5b", help="route.strong: registry model, .gguf or endpoint URL")
    p.add_argument("--strong-few-shot", type=int, default=0)
    p.add_argument("--out", type=Path, default=_bench.ROOT / "outputs" / "bench_quality")
    p.add_argument("--overhead", type=int, default=20, help="test inputs served to time the router (0: skip)")
    p.add_argument("--rerun", action="store_true", help="run the route stage again even where router.json exists")
    p.add_argument("overrides", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args()
    print(f"machine: {machine_kind()}", flush=True)
    table = []
    for task in a.tasks:
        run_dir = (a.out / task / "default").resolve()
        if not (run_dir / "metrics.json").is_file():
            run_finetune(run_dir, [f"task={task}", *a.overrides])
        if a.rerun or not (run_dir / "router.json").is_file():
            run_finetune(run_dir, [f"task={task}", *a.overrides, "stages=[route]", f"route.strong={a.strong}",
                                   f"route.strong_few_shot={a.strong_few_shot}"])
        router = json.loads((run_dir / "router.json").read_text())
        points = key_points(router)
        cost = overhead(run_dir, a.overhead) if a.overhead and router.get("served") else None
        _bench.emit({"task": task, "machine": machine_kind(), "strong": a.strong, "metric": router["headline_metric"],
                     "route_seconds": stage_seconds(run_dir).get("route"), "points": points,
                     "specialists": router.get("specialists"), "overhead": cost})
        table += [{"task": task, "metric": router["headline_metric"], **pt,
                   **({"router_ms": cost["router_own_ms"], "vs_small_alone": cost["ratio"]}
                      if cost and pt["small"] == router["served"]["small"] else {})} for pt in points]
    print(_bench.table(table, ["task", "metric", "small", "scorer", "small_alone", "strong_alone", "routed",
                               "escalated", "calls_saved", "best", "best_share", "apgr", "cpt50", "cpt80",
                               "router_ms", "vs_small_alone"]))


if __name__ == "__main__":
    main()
