"""Evaluation speed: one-batch-at-a-time vs continuous batching, in one process, llama.cpp or transformers.

    .venv/bin/python scripts/bench_eval.py [--gguf PATH ...] [--run-dir DIR] [--n 50] [--parallel 4,8,16]
                                           [--threads N] [--max-new-tokens N] [--sample] [finetune overrides...]
    e.g. ... --run-dir runs/x --parallel 8,16,32 --threads 2
    .venv/bin/python scripts/bench_eval.py --transformers [--constraint none|grammar|both] [--batch-size 16]
                                           [--more-batch-sizes 32,64] ...

With --transformers the model (RUN_DIR/merged, or the model's own weights; fp32) answers the same prompts
through finetune.runtimes.transformers.generate_transformers twice: per-batch (continuous=False: one
model.generate per `--batch-size` length-sorted prompts, what evaluation ran before) and continuous (finished
answers leave the batch, waiting prompts take their slots); --constraint grammar|both: under the task's
answer grammar; --more-batch-sizes adds a continuous arm per batch size (answers compared with the per-batch arm's,
ratios against it). Prompts as the evaluate stage's base pass writes them (evaluate.base_few_shot shots). Same
columns as below, and the rows whose answers differ.

For each GGUF (--gguf, repeatable; default: every RUN_DIR/gguf/*.gguf, or the packaged GGUF of the model
when there is no --run-dir) the same prompts are answered by
  one-at-a-time   finetune.runtimes.llamacpp.generate_llama_cpp (what the evaluate stage runs today)
  parallel=P      finetune.runtimes.llamacpp_batch.generate_llama_cpp_batched, once per --parallel value
with the same threads, n_ctx, stop strings and sampling. Prompts: the first --n rows of the test split
(RUN_DIR/data/test.jsonl, or the task's split as the data stage makes it), rendered with the chat template
as the evaluate stage renders them for a GGUF; n_ctx sized as the evaluate stage sizes it; max_new_tokens
the task's. Each arm is timed as one call (GGUF load included, as evaluation pays it): tokens/s =
generated tokens / wall seconds. Printed per arm: the ratio against one-at-a-time, how many answers are
identical to one-at-a-time's (text, token count, stop), and the task's headline metric. Last line: JSON
with the machine, llama.cpp's CPU features (llama_print_system_info) and every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402


def config(run_dir: Path | None, overrides: list[str]):
    from finetune.core.config import compose

    ident = []
    if run_dir is not None and (run_dir / "run.json").is_file():
        run = json.loads((run_dir / "run.json").read_text())
        ident = [f"model={run['model']}", f"task={run['task']}"]
    return compose([*ident, *overrides])


def test_rows(cfg, run_dir: Path | None, n: int) -> list[dict]:
    from finetune.data.prepare import split_task_data
    from finetune.data.rows import read_rows

    path = run_dir / "data" / "test.jsonl" if run_dir is not None else None
    if path is not None and path.is_file():
        rows = read_rows(path, required=("id", "prompt", "completion", "reference"))
    else:
        rows = split_task_data(cfg.task)[2]["test"]
    return rows[:n]


def prompts_for(cfg, run_dir: Path | None, rows: list[dict]) -> tuple[list[str], str | None, int]:
    """Prompt texts, the tokenizer's BOS text and the longest prompt in tokens, as the evaluate stage has them."""
    from finetune.models.loading import load_tokenizer, render_prompt, saved_tokenizer
    from finetune.runtimes.generation import longest_prompt

    if run_dir is not None:
        tokenizer = saved_tokenizer(cfg.model, run_dir / "adapter", run_dir / "merged")
    else:
        tokenizer = load_tokenizer(cfg.model)
    prompts = [render_prompt(tokenizer, r["prompt"], cfg.model) for r in rows]
    return prompts, tokenizer.bos_token, longest_prompt(tokenizer, prompts)


def ggufs_for(cfg, run_dir: Path | None, given: list[str]) -> list[Path]:
    if given:
        return [Path(g) for g in given]
    if run_dir is not None:
        found = sorted((run_dir / "gguf").glob("*.gguf"))
        if found:
            return found
    from finetune.models.gguf_source import packaged_gguf_path

    return [packaged_gguf_path(cfg.model)]


def keep_loopers(a, cfg, task, model, tokenizer, rows: list[dict], prompts: list[str]):
    """One untimed continuous pass; then every row that stopped and `--loopers` of those cut at the limit,
    picked evenly along the length order (so each lands in another batch)."""
    from finetune.runtimes.generation import Sampling
    from finetune.runtimes.transformers import generate_transformers

    grammar = task.answer_grammar() if a.constraint == "grammar" else None
    outs = generate_transformers(model, tokenizer, prompts, list(cfg.model.stop_tokens),
                                 Sampling(max_new_tokens=a.max_new_tokens or cfg.task.max_new_tokens), grammar=grammar)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    loopers = [i for i in order if not outs[i].stopped]
    step = max(1, len(loopers) // max(1, a.loopers))
    keep = sorted([i for i in order if outs[i].stopped] + loopers[::step][: a.loopers])
    print(f"--loopers {a.loopers}: {len(loopers)} of {len(rows)} rows ran to the limit; kept rows {keep}", flush=True)
    return [rows[i] for i in keep], [prompts[i] for i in keep]


def bench_transformers(a, cfg, run_dir: Path | None, rows: list[dict], task) -> None:
    import torch

    from finetune.core.hardware import torch_threads
    from finetune.evaluate.stage import pick_shots, with_shots
    from finetune.models.loading import load_model, load_tokenizer, render_prompt, saved_tokenizer
    from finetune.runtimes.generation import Sampling
    from finetune.runtimes.transformers import generate_transformers

    merged = run_dir / "merged" if run_dir is not None else None
    if merged is not None and merged.is_dir():
        tokenizer, model = saved_tokenizer(cfg.model, merged), load_model(cfg.model, path=str(merged))
    else:
        tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model)
    shots = []
    if cfg.evaluate.base_few_shot:  # as the evaluate stage's base pass writes its prompts
        from finetune.data.prepare import split_task_data

        shots = pick_shots(split_task_data(cfg.task)[2]["train"], cfg.evaluate.base_few_shot, cfg.method.seed)
    prompts = [render_prompt(tokenizer, with_shots(r["prompt"], shots), cfg.model) for r in rows]
    if a.loopers is not None:  # the custom case: few answers run to the limit, spread over the batches
        rows, prompts = keep_loopers(a, cfg, task, model, tokenizer, rows, prompts)
    references = [r["reference"] for r in rows]
    sampling = Sampling(max_new_tokens=a.max_new_tokens or cfg.task.max_new_tokens)
    batch_size = a.batch_size or cfg.evaluate.batch_size
    stops = list(cfg.model.stop_tokens)
    key = task.headline_metric
    print(f"transformers {cfg.model.hub_id} fp32, {len(prompts)} prompts of {cfg.task.name} ({len(shots)}-shot), "
          f"max_new_tokens "
          f"{sampling.max_new_tokens}, greedy, batch_size {batch_size}, {torch.get_num_threads()} threads", flush=True)
    out_rows = []
    with torch_threads(a.threads):
        generate_transformers(model, tokenizer, prompts[:2], stops, Sampling(max_new_tokens=4), continuous=False)
        grammars = {"none": [None], "grammar": [task.answer_grammar()], "both": [None, task.answer_grammar()]}
        for grammar in grammars[a.constraint]:
            reference = base_speed = None
            arms = [("per-batch", False, batch_size), ("continuous", True, batch_size),
                    *((f"continuous, batch {b}", True, b) for b in a.more_batch_sizes)]
            for arm, continuous, size in arms:
                t0 = time.perf_counter()
                outs = generate_transformers(model, tokenizer, prompts, stops, sampling, batch_size=size,
                                             grammar=grammar, continuous=continuous)
                seconds = time.perf_counter() - t0
                tokens = sum(o.n_tokens for o in outs)
                speed = tokens / seconds
                if reference is None:
                    reference, base_speed = outs, speed
                differ = [i for i, (o, r) in enumerate(zip(outs, reference))
                          if (o.text, o.n_tokens, o.stopped) != (r.text, r.n_tokens, r.stopped)]
                metrics, _ = task.score(references, [o.text for o in outs])
                row = {"arm": arm, "constraint": "grammar" if grammar else "none", "seconds": round(seconds, 2),
                       "tokens": tokens, "tokens_per_s": round(speed, 1), "ratio": round(speed / base_speed, 2),
                       "identical": f"{len(outs) - len(differ)}/{len(outs)}",
                       "cut_at_limit": sum(not o.stopped for o in outs), key: metrics.get(key), "differ": differ}
                out_rows.append(row)
                print(_bench.table([row], list(row)).splitlines()[-1], flush=True)
                for i in differ:
                    print(f"  row {i}: per-batch {reference[i].n_tokens} tokens {reference[i].text[:80]!r}\n"
                          f"         continuous {outs[i].n_tokens} tokens {outs[i].text[:80]!r}")
    print()
    print(_bench.table(out_rows, ["arm", "constraint", "seconds", "tokens", "tokens_per_s", "ratio", "identical",
                                  "cut_at_limit", key]))
    _bench.emit({"machine": _bench.machine(), "runtime": "transformers", "model": cfg.model.hub_id,
                 "n_prompts": len(prompts), "few_shot": len(shots), "max_new_tokens": sampling.max_new_tokens, "batch_size": batch_size,
                 "rows": out_rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", action="append", default=[], help="a GGUF to time (repeatable)")
    p.add_argument("--run-dir", type=Path, default=None, help="a finished run: its test split, tokenizer and GGUFs")
    p.add_argument("--n", type=int, default=50, help="test prompts (default 50)")
    p.add_argument("--parallel", default="4,8,16", help="sequences per llama_decode, comma-separated")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the cores we may run on)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's max_new_tokens")
    p.add_argument("--sample", action="store_true", help="sample (evaluate.temperature/top_p, seed) instead of greedy")
    p.add_argument("--transformers", action="store_true", help="time transformers per-batch vs continuous instead")
    p.add_argument("--constraint", choices=["none", "grammar", "both"], default="none",
                   help="--transformers: free answers, answers under the task's grammar, or both")
    p.add_argument("--loopers", type=int, default=None, help="--transformers: keep only this many rows that run "
                   "to max_new_tokens, and all that stop (found by an untimed first pass)")
    p.add_argument("--rows", default=None, help="--transformers: these test rows (0-based, comma-separated), not --n")
    p.add_argument("--batch-size", type=int, default=None, help="--transformers: default evaluate.batch_size")
    p.add_argument("--more-batch-sizes", type=lambda v: [int(b) for b in v.split(",") if b], default=[],
                   help="--transformers: continuous arms at these batch sizes too, e.g. 32,64")
    p.add_argument("overrides", nargs="*", help="finetune overrides, e.g. model=qwen2.5-0.5b task=classification")
    a = p.parse_args()
    if a.transformers:
        from finetune.tasks import get_task

        run_dir = a.run_dir.resolve() if a.run_dir else None
        cfg = config(run_dir, a.overrides)
        picked = [int(i) for i in a.rows.split(",")] if a.rows else list(range(a.n))
        rows = test_rows(cfg, run_dir, max(picked) + 1)
        bench_transformers(a, cfg, run_dir, [rows[i] for i in picked], get_task(cfg.task))
        return

    import llama_cpp

    from finetune.core.hardware import cpu_threads
    from finetune.runtimes.generation import Sampling
    from finetune.runtimes.llamacpp import generate_llama_cpp
    from finetune.runtimes.llamacpp_batch import context_size, generate_llama_cpp_batched
    from finetune.tasks import get_task

    run_dir = a.run_dir.resolve() if a.run_dir else None
    cfg = config(run_dir, a.overrides)
    task = get_task(cfg.task)
    rows = test_rows(cfg, run_dir, a.n)
    prompts, bos, longest = prompts_for(cfg, run_dir, rows)
    sampling = Sampling(max_new_tokens=a.max_new_tokens or cfg.task.max_new_tokens, do_sample=a.sample,
                        temperature=cfg.evaluate.temperature, top_p=cfg.evaluate.top_p, seed=cfg.method.seed)
    n_ctx = context_size(longest, sampling.max_new_tokens)
    threads = a.threads or cpu_threads()
    stops = list(cfg.model.stop_tokens)
    references = [r["reference"] for r in rows]
    key = task.headline_metric
    print(f"{len(prompts)} prompts of {cfg.task.name} (longest {longest} tokens), max_new_tokens "
          f"{sampling.max_new_tokens}, {'sampling' if a.sample else 'greedy'}, n_ctx {n_ctx}, {threads} threads",
          flush=True)

    out_rows = []
    for gguf in ggufs_for(cfg, run_dir, a.gguf):
        arms = [("one-at-a-time", None)] + [(f"parallel={k}", int(k)) for k in a.parallel.split(",") if k]
        reference = None
        base_speed = None
        for arm, parallel in arms:
            t0 = time.perf_counter()
            if parallel is None:
                outs = generate_llama_cpp(gguf, prompts, stops, sampling, n_ctx=n_ctx, n_threads=threads,
                                          bos_token=bos)
            else:
                outs = generate_llama_cpp_batched(gguf, prompts, stops, sampling, n_ctx=n_ctx, parallel=parallel,
                                                  n_threads=threads, bos_token=bos)
            seconds = time.perf_counter() - t0
            tokens = sum(o.n_tokens for o in outs)
            speed = tokens / seconds
            if reference is None:
                reference, base_speed = outs, speed
            same = sum((o.text, o.n_tokens, o.stopped) == (r.text, r.n_tokens, r.stopped)
                       for o, r in zip(outs, reference))
            metrics, _ = task.score(references, [o.text for o in outs])
            row = {"gguf": gguf.name, "arm": arm, "seconds": round(seconds, 2), "tokens": tokens,
                   "tokens_per_s": round(speed, 1), "ratio": round(speed / base_speed, 2),
                   "identical": f"{same}/{len(outs)}", key: metrics.get(key)}
            out_rows.append(row)
            print(_bench.table([row], list(row)).splitlines()[-1], flush=True)
    print()
    print(_bench.table(out_rows, ["gguf", "arm", "seconds", "tokens", "tokens_per_s", "ratio", "identical", key]))
    system = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama.cpp: {system}")
    _bench.emit({"machine": _bench.machine(), "llama_cpp_system_info": system, "threads": threads,
                 "n_prompts": len(prompts), "max_new_tokens": sampling.max_new_tokens, "n_ctx": n_ctx,
                 "do_sample": a.sample, "rows": out_rows})


if __name__ == "__main__":
    main()
