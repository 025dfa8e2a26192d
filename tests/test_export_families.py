"""Other chat families end to end: a tiny random-weight model of the family's architecture, with the
family's real chat template, a real LoRA adapter -> merge -> GGUF (llama.cpp's converter) -> llama.cpp
load -> Modelfile checked against the HF template. Plus: an interrupted export leaves nothing final."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from finetune.export.gguf import export_gguf
from finetune.export.merge import merge
from finetune.export.ollama import write_modelfiles
from finetune.models import load_model, load_tokenizer
from finetune.pipeline import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from export_support import family_task_cfg, tiny_model, train_lora, write_task_data  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")]

# phi3 is covered at the template level only (test_export_modelfile.py): its converter needs a
# SentencePiece tokenizer.model, which a tiny test model cannot borrow from SmolLM2.
FAMILIES_E2E = ["chatml", "llama3", "gemma", "zephyr", "plain"]


def _prepared_run(family: str, root: Path, overrides: list[str] = ()):
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


def test_interrupted_export_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import finetune.export.gguf as gguf_stage

    cfg, run = _prepared_run("chatml", tmp_path, ["export.gguf.quant_types=[Q8_0,Q4_K_M]", "export.gguf.keep_f16=true"])
    merge(cfg, run)
    real = gguf_stage.quantize_gguf
    done = []

    def quantize_then_crash(src, dst, quant, n_threads=None):
        if done:  # the second quant type: the process is interrupted (Ctrl-C) mid-export
            raise KeyboardInterrupt
        done.append(quant)
        return real(src, dst, quant, n_threads)

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
        "Modelfile.F16", "Modelfile.Q4_K_M", "Modelfile.Q8_0", "qwen2.5-0.5b-extraction-F16.gguf",
        "qwen2.5-0.5b-extraction-Q4_K_M.gguf", "qwen2.5-0.5b-extraction-Q8_0.gguf"]
    assert not list(tmp_path.rglob(".tmp-*"))
