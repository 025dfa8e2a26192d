"""Export of the real SmolLM2-135M-Instruct with a real LoRA adapter: merge -> GGUF -> Modelfile (-> GPTQ).

One run directory is built once for the module (task rows + an adapter trained for a few real AdamW
steps) and each stage runs on it in order, as the pipeline does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from finetune.core.rundir import RunDir
from finetune.export.gguf import export_gguf
from finetune.export.merge import merge
from finetune.export.ollama.modelfile import write_modelfiles
from finetune.models.loading import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from export_support import smollm2_cfg, train_lora, write_task_data  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-run")
    cfg = smollm2_cfg(root)
    run = RunDir(root)
    write_task_data(cfg, run)
    train_lora(cfg, run, load_model(cfg.model), load_tokenizer(cfg.model), steps=4, lr=3e-4)
    yield cfg, run
    shutil.rmtree(root, ignore_errors=True)  # a merged model and its exports: free the disk for the next module


@pytest.fixture(scope="module")
def merged(smol):
    cfg, run = smol
    return merge(cfg, run)


@pytest.fixture(scope="module")
def ggufs(smol, merged):
    cfg, run = smol
    return export_gguf(cfg, run)


@pytest.fixture(scope="module")
def modelfiles(smol, ggufs):
    cfg, run = smol
    return write_modelfiles(cfg, run)


def _no_temp_left(root: Path) -> None:
    assert not [p for p in root.rglob(".tmp-*")], "unfinished temporary files left behind"


def test_merge_matches_adapter_and_ships_everything(smol, merged):
    from transformers import AutoTokenizer, GenerationConfig

    cfg, run = smol
    assert merged["merge_logits_max_diff"] < 1e-3
    assert merged["adapter_logits_change"] > 1e-2  # the adapter is not a no-op, so the check means something
    assert merged["reload_logits_max_diff"] <= 1e-4
    files = {p.name for p in run.merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
    assert not any(n.endswith((".bin", ".pt")) or n.startswith("adapter_") for n in files)
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    assert "<|im_start|>" in tok.chat_template
    eos = GenerationConfig.from_pretrained(run.merged_dir).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    card = (run.merged_dir / "README.md").read_text()
    for needle in ("base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "ollama create", "llama-cli", "train 4",
                   "AutoModelForCausalLM", cfg.task.description):
        assert needle in card
    print("merge", {k: merged[k] for k in ("merge_logits_max_diff", "adapter_logits_change", "size_bytes")})
    _no_temp_left(run.root)


def test_gguf_files_load_answer_and_match_the_merged_model(smol, ggufs):
    cfg, run = smol
    names = sorted(p.name for p in run.gguf_dir.glob("*.gguf"))
    assert names == ["smollm2-extraction-Q4_K_M.gguf", "smollm2-extraction-Q8_0.gguf"]  # no f16 by default
    assert ggufs["f16_check"]["top1_agreement"] >= 0.9
    for quant in ("Q4_K_M", "Q8_0"):
        check = ggufs["files"][quant]["check"]
        assert check["answer"].strip(), f"{quant} gave no answer"
        assert check["prompt_tokens"] > 20
    assert ggufs["files"]["Q8_0"]["size_bytes"] > ggufs["files"]["Q4_K_M"]["size_bytes"] > 50e6
    print(json.dumps({q: {k: v for k, v in f.items() if k != "check"} for q, f in ggufs["files"].items()}))
    print("convert_seconds", ggufs["convert_seconds"])
    _no_temp_left(run.root)


def test_modelfiles_render_like_hf_and_stop(smol, modelfiles):
    cfg, run = smol
    for quant in ("Q4_K_M", "Q8_0"):
        path = run.gguf_dir / f"Modelfile.{quant}"
        text = path.read_text()
        assert f"FROM ./smollm2-extraction-{quant}.gguf" in text
        assert "PARAMETER stop <|im_end|>" in text
        assert "SYSTEM " in text and ".Messages" in text
        checks = modelfiles["modelfiles"][quant]["verify"]
        assert {c["conversation"] for c in checks["conversations"]} >= {"task prompt", "no system prompt",
                                                                      "several turns", "awkward characters"}
        # The mechanism, not how well 4 steps trained: the answer ended on a stop, or ran to the token limit
        # without running into a new turn (check_stops raises if it had); stopping itself is tested below.
        stop_check = checks["stop_check"]
        assert stop_check["stopped_by"] or stop_check["tokens"] >= max(2 * cfg.task.max_new_tokens, 64), stop_check
        assert "ollama create smollm2-extraction:" in modelfiles["modelfiles"][quant]["create_command"]
    _no_temp_left(run.root)


def test_generation_stops_like_ollama(smol, ggufs):
    """Stopping, as the Modelfile's stop list makes Ollama stop, on the exported GGUF: at the end-of-turn token
    (an end-of-generation token of the GGUF) and at a stop string, whatever the model happens to answer."""
    import llama_cpp

    from finetune.runtimes.llamacpp import generate_like_ollama, open_gguf, served_tokens

    cfg, run = smol
    with open_gguf(run.gguf_path(cfg.model.name, cfg.task.name, "Q8_0"), n_ctx=512, n_threads=1) as llm:
        eot = llm.tokenize(cfg.model.eos_token.encode(), add_bos=False, special=True)
        assert len(eot) == 1 and llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot[0])
        # An assistant turn begun mid-sentence: any model goes on for a few tokens.
        ids = served_tokens(llm, "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
                                 "Once upon a time, in a small village by the sea, there")
        free = generate_like_ollama(llm, ids, [], 16)
        text = free["answer"]
        assert len(text.strip()) >= 3, free
        stop = text.strip()[-3:]
        cut = generate_like_ollama(llm, ids, [stop], 16)
        assert cut["stopped_by"] == f"stop {stop!r}" and stop in cut["answer"] and cut["tokens"] <= free["tokens"]


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="GPTQModel is an extra: pip install 'finetune[gptq]'")
def test_gptq_quantizes_on_task_prompts_and_loads_in_transformers(smol, merged):
    from finetune.core.config import compose
    from finetune.export.gptq import quantize

    _, run = smol
    cfg = compose(["model=smollm2", "task=extraction", "method=lora", "export=all", f"run_dir={run.root}",
                   "export.gptq.calibration_samples=4", "task.max_new_tokens=16", "method.max_length=128"])
    info = quantize(cfg, run)
    assert info["group_size"] == 64 and info["bits"] == 4
    assert info["check"]["answer"].strip()
    config = json.loads((run.gptq_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64
    text = json.dumps(config)
    assert "Springfield" not in text and "offload_to_disk_path" not in text  # no data, no local paths
    print("gptq seconds", info["quantize_seconds"], "size", info["size_bytes"])
