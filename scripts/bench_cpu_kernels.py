"""llama.cpp's CPU kernel variants against each other, on the evaluate stage's own GGUF pass.

    .venv/bin/python scripts/bench_cpu_kernels.py --run-dir RUN [--gguf PATH ...] [--n 50]
                                                  [--variants haswell,best] [--rounds 2] [--threads N]

A process loads one CPU backend, so each arm is a child process of this script with `GGML_BACKEND_PATH` naming
its variant (finetune.runtimes.cpu_kernels); the arms alternate, `--rounds` times, in this one run. `best` is
the variant finetune loads on this CPU; `haswell` (AVX2, FMA, F16C) is what the portable build had before
the variants (`GGML_NATIVE=OFF`). Each child answers the run's first --n test prompts with every GGUF
(RUN_DIR/gguf/*.gguf or --gguf) the way the evaluate stage does: generate_llama_cpp_batched, the task's grammar
when evaluate.constrained, evaluate.llama_cpp_parallel sequences per decode, the same n_ctx, stop strings,
greedy decoding. Printed per GGUF and variant: the fastest round's seconds (GGUF load included) and tokens/s,
the ratio against the first variant, how many answers equal the first variant's, and the headline metric.
Last line: JSON with the machine, each variant's llama.cpp CPU features and every round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
import bench_eval  # noqa: E402


def child(a: argparse.Namespace) -> None:
    """One variant: every GGUF answers the prompts; one JSON line on stdout."""
    import llama_cpp

    from finetune.core.hardware import cpu_threads
    from finetune.evaluate.stage import sampling_from
    from finetune.runtimes.cpu_kernels import load_cpu_kernels
    from finetune.runtimes.llamacpp_batch import context_size, generate_llama_cpp_batched
    from finetune.tasks import get_task

    run_dir = a.run_dir.resolve()
    cfg = bench_eval.config(run_dir, a.overrides)
    task = get_task(cfg.task)
    rows = bench_eval.test_rows(cfg, run_dir, a.n)
    prompts, bos, longest = bench_eval.prompts_for(cfg, run_dir, rows)
    sampling = sampling_from(cfg)
    grammars = task.answer_grammars([task.input_of(r) for r in rows]) if cfg.evaluate.constrained else None
    variant = load_cpu_kernels()
    out = []
    for gguf in bench_eval.ggufs_for(cfg, run_dir, a.gguf):
        start = time.perf_counter()
        answers = generate_llama_cpp_batched(gguf, prompts, list(cfg.model.stop_tokens), sampling,
                                             n_ctx=context_size(longest, sampling.max_new_tokens),
                                             parallel=cfg.evaluate.llama_cpp_parallel,
                                             n_threads=a.threads or cpu_threads(), bos_token=bos, grammar=grammars)
        seconds = time.perf_counter() - start
        metrics, _ = task.score([r["reference"] for r in rows], [o.text for o in answers])
        out.append({"gguf": gguf.name, "seconds": seconds, "tokens": sum(o.n_tokens for o in answers),
                    task.headline_metric: metrics.get(task.headline_metric), "answers": [o.text for o in answers]})
    print(json.dumps({"variant": variant, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                      "ggufs": out}), flush=True)


def run_variant(a: argparse.Namespace, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(a.run_dir), "--n", str(a.n)]
    cmd += [f"--gguf={g}" for g in a.gguf] + ([f"--threads={a.threads}"] if a.threads else []) + a.overrides
    env = {**os.environ, "GGML_BACKEND_PATH": str(path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{path.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished run: its test split, tokenizer and GGUFs")
    p.add_argument("--gguf", action="append", default=[], help="a GGUF to time (repeatable; default: the run's)")
    p.add_argument("--n", type=int, default=50, help="test prompts (default 50)")
    p.add_argument("--variants", default="haswell,best", help="comma-separated variant names; `best`: this CPU's")
    p.add_argument("--rounds", type=int, default=2, help="times each variant runs, alternating (fastest kept)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the cores we may run on)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="finetune overrides, e.g. evaluate.llama_cpp_parallel=8")
    a = p.parse_args()
    if a.child:
        child(a)
        return

    from finetune.runtimes.cpu_kernels import best_variant, variant_dir, variant_name

    best = best_variant()
    if best is None:
        sys.exit(f"this llama-cpp-python build has its CPU kernels linked in ({variant_dir()} has no libggml-cpu-*.so): "
                 "nothing to compare; scripts/setup.sh builds the variants")
    paths = [best if v == "best" else variant_dir() / f"libggml-cpu-{v}.so" for v in a.variants.split(",")]
    for path in paths:
        if not path.is_file():
            sys.exit(f"no variant {path.name} in {variant_dir()}")
    names = [variant_name(p) for p in paths]
    print(f"variants {names} (best on this CPU: {variant_name(best)}), {a.rounds} rounds, {a.n} prompts", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name, path in zip(names, paths):
            res = run_variant(a, path)
            results[name].append(res)
            print(f"round {r + 1} {name:>14}: " + ", ".join(f"{g['gguf']} {g['seconds']:.1f} s"
                                                           for g in res["ggufs"]), flush=True)
    rows = []
    first = names[0]
    for gi, g in enumerate(results[first][0]["ggufs"]):
        base = min(res["ggufs"][gi]["seconds"] for res in results[first])
        for name in names:
            runs = [res["ggufs"][gi] for res in results[name]]
            fastest = min(runs, key=lambda x: x["seconds"])
            same = sum(x == y for x, y in zip(fastest["answers"], results[first][0]["ggufs"][gi]["answers"]))
            metric = next(k for k in fastest if k not in ("gguf", "seconds", "tokens", "answers"))
            rows.append({"gguf": g["gguf"], "variant": name, "seconds": round(fastest["seconds"], 2),
                         "tokens_per_s": round(fastest["tokens"] / fastest["seconds"], 1),
                         "ratio": round(base / fastest["seconds"], 2), "identical": f"{same}/{len(fastest['answers'])}",
                         metric: fastest[metric]})
    print()
    print(_bench.table(rows, list(rows[0])))
    _bench.emit({"machine": _bench.machine(), "n_prompts": a.n,
                 "system_info": {n: results[n][0]["system_info"] for n in names},
                 "rounds": {n: [[round(g["seconds"], 2) for g in res["ggufs"]] for res in results[n]] for n in names},
                 "rows": rows})


if __name__ == "__main__":
    main()
