"""The evaluate stage on a tiny real run: packaged SmolLM2, a real PEFT LoRA adapter trained for a few
steps, and the packaged GGUF evaluated through llama.cpp as an exported artifact would be."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from address_rows import write_data

from finetune.core.config import compose, model_config
from finetune.core.errors import ConfigError
from finetune.core.hardware import torch_threads
from finetune.core.rundir import RunDir
from finetune.evaluate import stage as ev
from finetune.evaluate.report import parse_results_table
from finetune.models.gguf_source import packaged_gguf_path
from finetune.models.loading import load_model, load_tokenizer, render_prompt
from finetune.runtimes.generation import Sampling, adds_bos
from finetune.runtimes.llamacpp import prompt_tokens
from finetune.runtimes.transformers import generate_transformers, generation_dtype
from finetune.tasks import get_task

MAX_NEW_TOKENS = 64  # the JSON answers of these addresses are 42-46 tokens


def train_adapter(cfg, run: RunDir, train_rows: list[dict], val_rows: list[dict], steps: int = 6) -> list[dict]:
    """A real LoRA adapter (and its merged model): a few AdamW steps of completion-only loss; returns the
    trainer-style log."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    model = get_peft_model(
        load_model(cfg.model),
        LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM"),
    )

    def batch(rows):
        ids, labels = [], []
        for r in rows:
            prompt = tokenizer(render_prompt(tokenizer, r["prompt"], cfg.model), add_special_tokens=False)["input_ids"]
            answer = tokenizer(r["completion"][0]["content"] + cfg.model.eos_token + "\n", add_special_tokens=False)["input_ids"]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        return (
            torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        )

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for step in range(1, steps + 1):
        model.train()
        rows = [train_rows[(2 * step + k) % len(train_rows)] for k in range(2)]
        ids, mask, labels = batch(rows)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": round(loss.item(), 4), "learning_rate": 2e-3, "epoch": step / 4, "step": step})
        if step % 3 == 0:
            model.eval()
            with torch.no_grad():
                ids, mask, labels = batch(val_rows)
                history.append({"eval_loss": model(input_ids=ids, attention_mask=mask, labels=labels).loss.item(),
                                "epoch": step / 4, "step": step})
    model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    # What the merge stage exports: the adapter folded into the full-precision base.
    model.merge_and_unload().save_pretrained(run.merged_dir)
    tokenizer.save_pretrained(run.merged_dir)
    return history


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    cfg = compose([
        f"run_dir={root}", "evaluate.max_examples=4", "evaluate.batch_size=4", "evaluate.base_few_shot=0",
        "evaluate.n_threads=1", f"task.max_new_tokens={MAX_NEW_TOKENS}", "evaluate.merged=true",
    ])
    run = RunDir(root)
    train, val, _ = write_data(run, get_task(cfg.task))
    with torch_threads(1):  # 2 shared cores: one thread is several times faster than two fighting
        history = train_adapter(cfg, run, train, val)
    (root / "train_log.json").write_text(json.dumps(history))
    run.mark_done("train", {"train_loss": history[-2]["loss"], "steps": 6})
    (root / "run.json").write_text(json.dumps({"model": "smollm2", "task": "extraction", "method": "qlora",
                                               "command": f"python -m finetune run_dir={root}"}))
    # The packaged GGUF stands in for an exported one: the same runtime and file format.
    run.gguf_dir.mkdir()
    os.symlink(packaged_gguf_path(cfg.model), run.gguf_dir / "smollm2-extraction-Q4_1.gguf")
    summary = ev.evaluate(cfg, run)
    yield cfg, run, summary
    shutil.rmtree(root, ignore_errors=True)  # a merged model: free the disk for the next module


@pytest.mark.slow
def test_metrics_json_has_every_model(tiny_run):
    cfg, run, summary = tiny_run
    metrics = json.loads(run.metrics_path.read_text())
    task = get_task(cfg.task)
    assert metrics["task"] == "extraction" and metrics["headline_metric"] == task.headline_metric
    # Every model decodes under the task's JSON schema; the fine-tuned one once more without it.
    assert list(metrics["models"]) == ["base", "finetuned", "finetuned-unconstrained", "merged", "gguf-Q4_1",
                                       "specialist", "reference-usaddress"]
    assert metrics["generation"]["constraint"] == {"kind": "json_schema", "schema": task.answer_constraint()}
    assert metrics["generation"]["grammar"] == task.answer_grammar()
    assert metrics["generation"]["dtype"] == "float32"  # evaluate.precision=auto on a CPU
    for name, entry in metrics["models"].items():
        assert "error" not in entry, entry
        if "baseline" not in entry:  # language models; the baselines generate no tokens
            assert entry["constraint"] == ("none" if name.endswith("-unconstrained") else "json_schema"), name
        assert entry["n"] == 4
        assert 0.0 <= entry[task.headline_metric] <= 1.0
        assert entry["latency_s_mean"] >= 0  # usaddress's parser takes well under 0.1 ms per address
        if "baseline" not in entry and entry.get("answers_reused") != entry["n"]:  # some answer decoded here
            assert entry["tokens_per_s"] > 0
            assert 0 < entry["generated_tokens_mean"] <= MAX_NEW_TOKENS
    base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    # The adapter learned the answer format, including the end-of-turn token that stops generation.
    assert tuned["stopped_fraction"] > 0 and tuned["json_valid_rate"] > 0
    assert tuned[task.headline_metric] > base[task.headline_metric]
    assert metrics["models"]["merged"]["runtime"] == "transformers"
    assert metrics["models"]["gguf-Q4_1"]["runtime"] == "llama.cpp"
    assert metrics["models"]["gguf-Q4_1"]["size_bytes"] > 50e6
    assert summary["results"]["finetuned"] == metrics["models"]["finetuned"][task.headline_metric]
    # The unconstrained pass took the answers the grammar never steered and decoded the others, which it changed.
    held, free = ([json.loads(x)["output"] for x in (run.predictions_dir / f"{n}.jsonl").read_text().splitlines()]
                  for n in ("finetuned", "finetuned-unconstrained"))
    reused = metrics["models"]["finetuned-unconstrained"].get("answers_reused", 0)
    assert reused == sum(a == b for a, b in zip(held, free))


@pytest.mark.slow
def test_predictions_rescore_to_the_same_metrics(tiny_run):
    cfg, run, _ = tiny_run
    metrics = json.loads(run.metrics_path.read_text())
    task = get_task(cfg.task)
    for name, entry in metrics["models"].items():
        rows = [json.loads(x) for x in (run.predictions_dir / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [f"test-{i:03d}" for i in range(4)]
        rescored, scored = task.score([r["reference"] for r in rows], [r["output"] for r in rows])
        for key, value in rescored.items():
            assert entry[key] == pytest.approx(value), (name, key)
        assert [r["correct"] for r in rows] == [s["correct"] for s in scored]
        for r in rows:
            assert set(r) >= {"id", "input", "expected", "output", "parsed", "correct"}
            assert "<|im_end|>" not in r["output"]  # counted and decoded only up to the stop
            assert r["n_tokens"] <= MAX_NEW_TOKENS


@pytest.mark.slow
def test_report_numbers_are_the_metrics_json_numbers(tiny_run):
    cfg, run, _ = tiny_run
    metrics = json.loads(run.metrics_path.read_text())
    head = metrics["headline_metric"]
    table = parse_results_table(run.report_path.read_text())
    assert set(table) == set(metrics["models"])
    for name, entry in metrics["models"].items():
        assert float(table[name][head]) == round(entry[head], 4)
        assert int(table[name]["n"]) == entry["n"]
        if entry["tokens_per_s"] is not None:
            assert float(table[name]["tokens/s"]) == pytest.approx(entry["tokens_per_s"], abs=0.006)
    assert table["finetuned"]["constraint"] == "json_schema" and table["finetuned-unconstrained"]["constraint"] == "none"
    text = run.report_path.read_text()
    assert "Constraints moved finetuned's field_f1 from" in text
    assert f"python -m finetune run_dir={run.root}" in text  # the command from run.json
    assert "smollm2-extraction-Q4_1.gguf" in text and "adapter/" in text
    assert (run.plots_dir / "loss.png").stat().st_size > 1000
    assert "![loss curve](plots/loss.png)" in text


@pytest.mark.slow
def test_batched_left_padded_generation_matches_one_at_a_time(tiny_run):
    cfg, run, _ = tiny_run
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    rows = ev.load_rows(run.data_dir / "test.jsonl")
    # Prompts of different lengths, so the batch really is padded.
    prompts = [render_prompt(tokenizer, r["prompt"], cfg.model) for r in rows] + [
        render_prompt(tokenizer, [{"role": "user", "content": "Say hi."}], cfg.model)
    ]
    sampling = Sampling(max_new_tokens=12)
    with torch_threads(1):
        batched = generate_transformers(model, tokenizer, prompts, ["<|im_end|>"], sampling, batch_size=5)
        single = generate_transformers(model, tokenizer, prompts, ["<|im_end|>"], sampling, batch_size=1)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert tokenizer.padding_side == "right"  # restored for training code that shares the tokenizer


def test_generation_precision_is_fp32_on_a_cpu_unless_asked_and_names_its_key():
    assert generation_dtype("auto", "cpu") == torch.float32
    assert generation_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match=r"evaluate\.precision=fp16 needs a CUDA GPU"):
        generation_dtype("fp16", "cpu")


@pytest.mark.slow
def test_merged_model_answers_like_the_adapter(tiny_run):
    _, run, _ = tiny_run
    tuned, merged = ([json.loads(x)["output"] for x in (run.predictions_dir / f"{n}.jsonl").read_text().splitlines()]
                     for n in ("finetuned", "merged"))
    assert merged == tuned  # fp32 merge: logits within 1e-4, greedy answers identical


@pytest.mark.slow
def test_llama_cpp_sees_the_prompt_transformers_sees(tiny_run):
    """Token for token, the same prompt in both runtimes; and since the packaged GGUF holds the weights
    `base` was converted from, the same start of an answer (llama.cpp's Q4_1 kernels round
    differently, so long answers may drift apart)."""
    from llama_cpp import Llama

    cfg, run, _ = tiny_run
    tokenizer = load_tokenizer(cfg.model)
    llm = Llama(model_path=str(run.gguf_dir / "smollm2-extraction-Q4_1.gguf"), vocab_only=True, verbose=False)
    try:
        for row in ev.load_rows(run.data_dir / "test.jsonl"):
            prompt = render_prompt(tokenizer, row["prompt"], cfg.model)
            hf = tokenizer(prompt, add_special_tokens=adds_bos(tokenizer.bos_token, prompt))["input_ids"]
            assert prompt_tokens(llm, prompt, tokenizer.bos_token) == hf
    finally:
        llm.close()
    base, gguf = ([json.loads(x)["output"] for x in (run.predictions_dir / f"{n}.jsonl").read_text().splitlines()]
                  for n in ("base", "gguf-Q4_1"))
    for a, b in zip(base, gguf):
        assert len(os.path.commonprefix([a, b])) >= 10, (a, b)


def test_few_shot_prompt_puts_examples_between_system_and_question():
    shot = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}],
            "completion": [{"role": "assistant", "content": "a1"}]}
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert ev.with_shots(prompt, [shot]) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q"},
    ]
    assert ev.with_shots(prompt, []) == prompt
    rows = [{"id": i} for i in range(10)]
    assert ev.pick_shots(rows, 3, seed=1) == ev.pick_shots(rows, 3, seed=1)
    with pytest.raises(ConfigError, match="base_few_shot=11"):
        ev.pick_shots(rows, 11, seed=1)


def test_artifact_names():
    taken: set[str] = set()
    assert ev.gguf_name(Path("smollm2-extraction-Q4_K_M.gguf"), taken) == "gguf-Q4_K_M"
    assert ev.gguf_name(Path("model.q8_0.gguf"), taken) == "gguf-Q8_0"
    assert ev.gguf_name(Path("model-f16.gguf"), taken) == "gguf-F16"
    assert ev.gguf_name(Path("custom.gguf"), taken) == "gguf-custom"
    assert ev.gguf_name(Path("other-Q8_0.gguf"), {"gguf-Q8_0"}) == "gguf-Q8_0-2"


def test_comparison_models_come_from_the_registry():
    qwen = model_config("qwen2.5-0.5b")
    assert qwen.name == "qwen2.5-0.5b" and "<|im_end|>" in qwen.stop_tokens
    assert qwen.context_length == 32768 and qwen.instruct is True  # schema defaults filled in
    with pytest.raises(ConfigError, match="known: .*smollm2"):
        model_config("no-such-model")


def test_overlapping_answers_count_the_wall_time_not_the_sum_of_latencies():
    from finetune.evaluate.metrics import score
    from finetune.runtimes.generation import Generation

    task = get_task(compose(["task=classification"]).task)
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": "m"}],
             "completion": [{"role": "assistant", "content": "ham"}], "reference": "ham",
             "input": "m"} for i in range(2)]
    outputs = [Generation("ham", 10, 2.0, True, batch=0), Generation("spam", 10, 2.0, True, batch=1)]
    sequential, _ = score(task, rows, outputs, {})
    assert sequential["seconds"] == 4.0 and sequential["tokens_per_s"] == 5.0  # two batches, one after the other
    together, _ = score(task, rows, outputs, {}, wall_seconds=2.5)  # decoded together (continuous batching)
    assert together["seconds"] == 2.5 and together["tokens_per_s"] == 8.0
