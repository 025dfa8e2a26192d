"""Importance matrix for llama.cpp's low-bit GGUF types, measured on the task's own training examples.

A 4- or 5-bit quantizer has to round every weight; llama.cpp's `llama-imatrix` tells it which input columns
of each matrix carry large activations (the mean of x^2 per column over some text), so their weights are
rounded more carefully: the usual way to make Q4_K_M/Q5_K_M keep more of a model's quality. Here the text is
the task itself (training prompts with their answers, rendered with the chat template, as the model serves
them), and the statistics come from the merged model in transformers (a forward hook on every linear layer:
the same sums `llama-imatrix` collects, without building llama.cpp's tools). llama.cpp takes them through
`llama_model_quantize_params.imatrix`, keyed by GGUF tensor name; the HF -> GGUF names come from the
vendored gguf-py's TensorNameMap, the table the converter itself uses (finetune.export.converter).

Off by default (export.gguf.imatrix_samples=0): on SmolLM2-135M it moved Q4_K_M's next-token distribution
further from the original, not closer (docs/quantization.md); `scripts/bench_quant.py RUN --kl --imatrix-ab`
measures it on any run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.rundir import RunDir
from finetune.export.samples import calibration_rows, split_rows

log = logging.getLogger("finetune")

# Types whose llama.cpp quantizers weigh the rounding error by the importance matrix (Q8_0 and the float
# types round every weight on their own).
USES_IMATRIX = {"Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
                "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"}


def activation_stats(model: Any, rows: list[dict], batch_size: int = 8) -> tuple[dict[str, Any], int]:
    """Per linear layer (HF module name): mean of x^2 per input column over every token of `rows`.

    Rows run in batches of similar length, padding masked out of the sums. The output layer's input is the
    decoder's last hidden state, so the logits (a 49k-vocabulary matmul per token at 135M) are never computed."""
    import torch

    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    sums: dict[str, Any] = {}
    keep: list = [None]  # the current batch's non-padding positions

    def add(name: str, x: Any) -> None:
        x = x.detach().reshape(-1, x.shape[-1])[keep[0]].float()
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)

    hooks = [module.register_forward_pre_hook(lambda _m, inputs, name=name: add(name, inputs[0]))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head]
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))
    decoder = model.get_decoder()
    tokens = 0
    try:
        with torch.no_grad():
            for i in range(0, len(ordered), batch_size):
                batch = ordered[i:i + batch_size]
                width = max(len(r["input_ids"]) for r in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for j, r in enumerate(batch):  # right padding: positions of real tokens do not move
                    ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
                    mask[j, :len(r["input_ids"])] = 1
                keep[0] = mask.reshape(-1).bool().to(model.device)
                hidden = decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 use_cache=False).last_hidden_state
                if isinstance(head, torch.nn.Linear) and head_name:
                    add(head_name, hidden)
                tokens += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / tokens).cpu().numpy() for name, s in sums.items()}, tokens


def write_imatrix(cfg: Config, run: RunDir, model: Any, tokenizer: Any, path: Path) -> dict:
    """Measure the statistics with `model` (the merged model) and save them (HF module name -> float32 array)
    to `path` (.npz); returns what was measured (or why not: `path` is then not written)."""
    import numpy as np

    if not split_rows(run, "train"):  # an outside adapter exported without this run's data
        log.info("GGUF importance matrix skipped: no training examples in %s", run.data_dir)
        return {"skipped": "no training examples"}
    rows = calibration_rows(cfg, run, tokenizer, cfg.export.gguf.imatrix_samples, cfg.method.max_length)
    start = time.perf_counter()
    stats, tokens = activation_stats(model, rows)
    np.savez(path, **{name: values.astype(np.float32) for name, values in stats.items()})
    info = {"rows": len(rows), "tokens": tokens, "layers": len(stats),
            "seconds": round(time.perf_counter() - start, 1)}
    log.info("GGUF importance matrix: %d training examples (%d tokens), %d linear layers, %.1fs",
             info["rows"], tokens, info["layers"], info["seconds"])
    return info
