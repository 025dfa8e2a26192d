"""Task metric of the exported artifacts of a finished run: merged fp vs GGUF Q8_0 / Q4_K_M vs GPTQ.

    .venv/bin/python scripts/bench_quant.py RUN_DIR [--evaluate] [finetune overrides for the evaluate stage...]

Reads RUN_DIR/metrics.json (written by the evaluate stage on the test split). When it lacks the merged
model or any artifact present in the run dir (merged/, gptq/, gguf/*.gguf), or with --evaluate, it first
runs `python -m finetune stages=[evaluate] run_dir=RUN_DIR` (the run's own model/task/method are taken
from RUN_DIR/run.json). Prints the headline metric, size and generation speed of each, with the delta
against the merged full-precision model (the finetuned adapter model when there is no merged one).

    .venv/bin/python scripts/bench_quant.py RUN_DIR --kl [--rows 50] [--imatrix-ab]

Fidelity instead of the task metric, with far less noise than 50 answers give: each GGUF's next-token
distribution against the merged model's (transformers, fp32) at every answer position of the first ROWS test
rows, teacher-forced on the reference answers: mean KL divergence (nats) and top-1 agreement, as llama.cpp's
`llama-perplexity --kl-divergence` reports them. --imatrix-ab also quantizes the merged model's f16 GGUF to
each low-bit type of the run (Q4_K_M if none) with and without an importance matrix of 128 training
examples (finetune.export.imatrix) into a temporary folder, and scores those files alongside: the A/B of
export.gguf.imatrix_samples on the same model. --variant LABEL=QUANT:JSON (repeatable) quantizes the same f16
GGUF to QUANT with the per-tensor overrides JSON ({tensor-name regex: ggml type}, as export.gguf.tensor_types
gives them; keep the regexes disjoint: which of two that match one tensor wins is llama.cpp's rule, and it has
changed between its versions) and scores it alongside; the table's last column, read back from each file,
shows what the overrides did. E.g. --variant 'kv8=Q4_K_M:{"attn_k|attn_v": "Q8_0", "ffn_down": "Q6_K"}'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

ORDER = ["base", "finetuned", "merged", "gguf-F16", "gguf-Q8_0", "gguf-Q4_K_M", "gptq"]


def expected_models(run_dir: Path) -> set[str]:
    from finetune.evaluate.stage import gguf_name

    want, taken = set(), set()
    if (run_dir / "merged" / "config.json").is_file():
        want.add("merged")
    if (run_dir / "gptq" / "config.json").is_file():
        want.add("gptq")
    for path in sorted((run_dir / "gguf").glob("*.gguf")) if (run_dir / "gguf").is_dir() else []:
        name = gguf_name(path, taken)
        taken.add(name)
        want.add(name)
    return want


def run_evaluate(run_dir: Path, overrides: list[str]) -> None:
    ident = json.loads((run_dir / "run.json").read_text())
    cmd = [sys.executable, "-m", "finetune", f"run_dir={run_dir}", "stages=[evaluate]", f"model={ident['model']}",
           f"task={ident['task']}", f"method={ident['method']}", "evaluate.merged=true", *overrides]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=_bench.ROOT, check=True)


def answer_positions(cfg, run, tokenizer, rows: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reference answer, number of prompt tokens) of the first test rows."""
    from finetune.export.samples import split_rows
    from finetune.models.loading import adapt_messages, render_prompt

    out = []
    for row in split_rows(run, "test", rows):
        full = tokenizer.apply_chat_template(adapt_messages(list(row["prompt"]) + list(row["completion"]), cfg.model),
                                             tokenize=False)
        prompt = render_prompt(tokenizer, list(row["prompt"]), cfg.model)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if full.startswith(prompt) and n_prompt < len(ids):
            out.append((ids, n_prompt))
    return out


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    """--variant LABEL=QUANT:JSON -> (label, quant type, {regex: ggml type})."""
    label, sep, rest = text.partition("=")
    quant, sep2, overrides = rest.partition(":")
    if not (sep and sep2 and label and quant):
        raise SystemExit(f"--variant {text!r}: expected LABEL=QUANT:JSON, "
                         f"e.g. 'v8=Q4_K_M:{{\"attn_v\": \"Q8_0\"}}'")
    try:
        types = json.loads(overrides)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--variant {label}: the overrides are not JSON ({e}): {overrides!r}") from None
    if not isinstance(types, dict):
        raise SystemExit(f"--variant {label}: the overrides must be a JSON object, got {overrides!r}")
    from types import SimpleNamespace

    from finetune.export.converter import gguf_config_problems, normalize_quant_type

    problems = gguf_config_problems(SimpleNamespace(quant_types=[], tensor_types={quant: types}))
    if problems:  # before the minutes of reference logits, not after them
        raise SystemExit(f"--variant {label}: " + "; ".join(problems))
    return label, normalize_quant_type(quant), {str(k): str(v).upper() for k, v in types.items()}


def matrix_types(path: Path) -> str:
    """How many of the file's matrices (2-D tensors) are in each ggml type, e.g. "Q5_0 x150, Q6_K x30"."""
    from collections import Counter

    import gguf

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) >= 2)
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def kl_rows(run_dir: Path, rows: int, imatrix_ab: bool, variants: list[tuple[str, str, dict[str, str]]]) -> None:
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.core.config import compose
    from finetune.core.rundir import RunDir, quant_of
    from finetune.export.converter import convert_hf_to_gguf, quantize_gguf
    from finetune.export.gguf import gguf_model_name
    from finetune.export.imatrix import USES_IMATRIX, activation_stats
    from finetune.export.samples import calibration_rows
    from finetune.models.loading import load_tokenizer
    from finetune.runtimes.llamacpp import open_gguf

    ident = json.loads((run_dir / "run.json").read_text())
    cfg = compose([f"model={ident['model']}", f"task={ident['task']}", f"method={ident['method']}"])
    run = RunDir(run_dir)
    files = {quant_of(path) or path.stem: path for path in sorted(run.gguf_dir.glob("*.gguf"))}
    labels = [label for label, _, _ in variants]
    taken = [label for i, label in enumerate(labels) if label in files or label in labels[:i]]
    if taken:
        raise SystemExit(f"--variant {taken[0]}: the name of another file in the table; choose another label")
    tokenizer = load_tokenizer(cfg.model, path=str(run.merged_dir))
    model = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32).eval()
    examples = answer_positions(cfg, run, tokenizer, rows)
    reference = []
    with torch.no_grad():
        for ids, n_prompt in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:len(ids) - 1].float()
            reference.append(torch.log_softmax(logits, -1).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16.gguf"
        if imatrix_ab or variants:
            convert_hf_to_gguf(run.merged_dir, f16, "f16", gguf_model_name(cfg))
        for label, quant, types in variants:
            files[label] = Path(tmp) / f"variant-{len(files)}.gguf"
            quantize_gguf(f16, files[label], quant, tensor_types=types)
        if imatrix_ab:
            stats, _ = activation_stats(model, calibration_rows(cfg, run, tokenizer, 128, cfg.method.max_length))
            np.savez(Path(tmp) / "imatrix.npz", **stats)
            for quant in [q for q in files if q in USES_IMATRIX] or ["Q4_K_M"]:
                for label, imatrix in (("with", Path(tmp) / "imatrix.npz"), ("without", None)):
                    files[f"{quant} {label} imatrix"] = Path(tmp) / f"{quant}-{label}.gguf"
                    quantize_gguf(f16, files[f"{quant} {label} imatrix"], quant, imatrix=imatrix)
        del model
        table = []
        for name, path in files.items():
            kl, agree, positions = 0.0, 0, 0
            with open_gguf(path, n_ctx=2048, logits_all=True) as llm:
                for (ids, n_prompt), ref in zip(examples, reference):
                    llm.reset()
                    llm.eval(ids)
                    scores = torch.tensor(np.asarray(llm.scores[n_prompt - 1:len(ids) - 1], dtype=np.float32))
                    logq = torch.log_softmax(scores, -1).numpy()
                    kl += float((np.exp(ref) * (ref - logq)).sum())
                    agree += int((ref.argmax(-1) == logq.argmax(-1)).sum())
                    positions += len(ref)
            table.append({"gguf": name, "mean_kl": round(kl / positions, 5),
                          "top1_agreement": round(agree / positions, 4), "positions": positions,
                          "rows": len(examples), "size_MB": round(path.stat().st_size / 2**20, 1),
                          "matrix_types": matrix_types(path)})
    print(f"run {run_dir} ({ident['task']}): next-token fidelity to the merged fp32 model on the answers of "
          f"{len(examples)} test rows, teacher-forced")
    print(_bench.table(table, ["gguf", "mean_kl", "top1_agreement", "positions", "rows", "size_MB", "matrix_types"]))
    _bench.emit({"run_dir": str(run_dir), "mode": "kl", "machine": _bench.machine(), "rows": table})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--evaluate", action="store_true", help="re-run the evaluate stage first")
    p.add_argument("--kl", action="store_true", help="next-token fidelity to the merged model instead (see above)")
    p.add_argument("--rows", type=int, default=50, help="--kl: test rows (default 50)")
    p.add_argument("--imatrix-ab", action="store_true", help="--kl: also score GGUFs quantized with and without one")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=QUANT:JSON",
                   help="--kl: also score the merged model quantized to QUANT with these tensor type overrides")
    p.add_argument("overrides", nargs="*", help="overrides for the evaluate stage, e.g. evaluate.max_examples=50")
    a = p.parse_args()
    run_dir = a.run_dir.resolve()
    if a.variant and not a.kl:
        p.error("--variant needs --kl")
    if a.kl:
        kl_rows(run_dir, a.rows, a.imatrix_ab, [parse_variant(v) for v in a.variant])
        return
    metrics_path = run_dir / "metrics.json"
    want = expected_models(run_dir)
    have = set(json.loads(metrics_path.read_text()).get("models", {})) if metrics_path.is_file() else set()
    if a.evaluate or not metrics_path.is_file() or not want <= have:
        if want - have:
            print(f"metrics.json lacks {sorted(want - have)}: running the evaluate stage", flush=True)
        run_evaluate(run_dir, a.overrides)
    metrics = json.loads(metrics_path.read_text())
    key = metrics["headline_metric"]
    models = metrics.get("models", {})
    ref_name = "merged" if "merged" in models else "finetuned"
    ref = models.get(ref_name, {}).get(key)
    names = [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER)
    rows = []
    for name in names:
        m = models[name]
        value = m.get(key)
        rows.append({"model": name, key: value,
                     f"delta_vs_{ref_name}": round(value - ref, 4) if value is not None and ref is not None else None,
                     "n": m.get("n"), "size_MB": round(m["size_bytes"] / 2**20, 1) if m.get("size_bytes") else None,
                     "tokens_per_s": m.get("tokens_per_s"), "runtime": m.get("runtime"),
                     "error": (m.get("error") or "")[:60] or None})
    print(f"task {metrics.get('task')} ({key}, test split, n={metrics.get('n')}), model {metrics.get('model')}, "
          f"method {metrics.get('method')}")
    print(_bench.table(rows, ["model", key, f"delta_vs_{ref_name}", "n", "size_MB", "tokens_per_s", "runtime", "error"]))
    _bench.emit({"run_dir": str(run_dir), "headline_metric": key, "reference": ref_name, "rows": rows})


if __name__ == "__main__":
    main()
