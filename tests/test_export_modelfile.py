"""Modelfile writing and the Ollama TEMPLATE of every chat family, checked by rendering with Go's
text/template through ports of Ollama's own Modelfile parser and template execution (no GGUF needed)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from finetune.core.config import compose
from finetune.core.errors import ExportError
from finetune.core.rundir import RunDir
from finetune.export.gptq import choose_group_size
from finetune.export.ollama.checks import check_rendering, strip_bos
from finetune.export.ollama.gotemplate import render_modelfile
from finetune.export.ollama.modelfile import modelfile_quote, modelfile_text
from finetune.models.loading import render_prompt

sys.path.insert(0, str(Path(__file__).parent))
from export_support import FAMILIES, family_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")

GGUF = Path("/run/gguf/m-t-Q4_K_M.gguf")
HOSTILE = [
    'Say "hi" and \\n is not a newline; C:\\path\\',
    'Ends with triple quotes """',
    '"""Starts with triple quotes',
    'Line one ends with """\nline two',
    'A line with """ in the middle\n  and an indented "quoted" line  ',
    "{{ .System }} {{- end }} {% raw %} <|im_end|> literal template syntax",
    "tab\tand unicode – ünïcødé 🙂",
    '""',
    "",
    "bell \x07 is not printable",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Address: 1 Main St, Springfield, IL 62704"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": '{"a": 1}'},
     {"role": "user", "content": 'q2 "x" \\ {{ .Content }}'}],
]


def _system_of(commands: list[dict]) -> list[str]:
    return [c["args"] for c in commands if c["name"] == "system"]


@pytest.mark.parametrize("value", HOSTILE)
def test_modelfile_quote_reads_back_exactly_or_refuses(value):
    quoted = modelfile_quote(value)
    if quoted is None:  # no quoting exists for it in Ollama's grammar: callers must not write it
        assert "\x07" in value or '"""\n' in value
        return
    commands, _ = render_modelfile(f"FROM ./x.gguf\nSYSTEM {quoted}\nPARAMETER stop <|im_end|>\n", [])
    assert _system_of(commands) == [value]
    assert [c["args"] for c in commands if c["name"] == "stop"] == ["<|im_end|>"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("system", ["task", "none", "hostile"])
def test_family_template_renders_like_the_hf_chat_template(family, system):
    """Text equality for several conversations, with SYSTEM from the Modelfile or none at all."""
    cfg = compose([f"model={FAMILIES[family][0]}", "task=extraction"])
    tok = family_tokenizer(family)
    system_prompt = {"task": cfg.task.system_prompt, "none": "", "hostile": HOSTILE[3]}[system]
    bos_added = family in ("llama3", "gemma", "plain")  # what their real GGUFs declare
    text = modelfile_text(cfg, tok, GGUF, system_prompt, bos_added=bos_added)
    commands, prompts = render_modelfile(text, CONVERSATIONS)
    if system == "hostile":  # cannot be quoted: the TEMPLATE carries it as its default instead
        assert _system_of(commands) == [] and "SYSTEM" not in text
    else:
        assert _system_of(commands) == ([system_prompt] if system_prompt else [])
    for conv, rendered in zip(CONVERSATIONS, prompts):
        effective = conv if conv[0]["role"] == "system" or not system_prompt else (
            [{"role": "system", "content": system_prompt}] + conv)
        expected = strip_bos(render_prompt(tok, effective, cfg.model), tok, bos_added)
        assert rendered == expected


def test_bos_written_by_template_when_llama_cpp_does_not_add_it():
    cfg = compose(["model=llama3.2-1b", "task=extraction"])
    tok = family_tokenizer("llama3")
    _, prompts = render_modelfile(modelfile_text(cfg, tok, GGUF, "S", bos_added=False), CONVERSATIONS[:1])
    assert prompts[0].startswith("<|begin_of_text|><|start_header_id|>system")
    assert prompts[0] == render_prompt(tok, [{"role": "system", "content": "S"}] + CONVERSATIONS[0], cfg.model)


def test_a_template_difference_fails_with_a_diff():
    cfg = compose(["model=smollm2", "task=extraction"])
    tok = family_tokenizer("chatml")
    text = modelfile_text(cfg, tok, GGUF, "S").replace("<|im_start|>{{ $m.Role }}\n", "<|im_start|>{{ $m.Role }} ")
    _, prompts = render_modelfile(text, CONVERSATIONS[:1])
    effective = [{"role": "system", "content": "S"}] + CONVERSATIONS[0]
    with pytest.raises(ExportError, match=r"differently[\s\S]*\+'<\|im_start\|>user Address"):
        check_rendering(cfg, tok, None, "task prompt", effective, prompts[0], False, "Modelfile.Q4_K_M")


def test_modelfile_parameters(tmp_path):
    cfg = compose(["model=qwen2.5-0.5b", "task=extraction", "export.ollama.num_ctx=4096"])
    text = modelfile_text(cfg, family_tokenizer("chatml"), GGUF, cfg.task.system_prompt)
    commands, _ = render_modelfile(text, [])
    values = {}
    for c in commands:
        values.setdefault(c["name"], []).append(c["args"])
    assert values["model"] == ["./m-t-Q4_K_M.gguf"]
    assert values["stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert values["num_ctx"] == ["4096"] and values["temperature"] == ["0"]
    assert ".Messages" in values["template"][0]


def test_num_ctx_holds_the_longest_row_unless_set(tmp_path):
    """Ollama cuts a prompt longer than num_ctx: by default the Modelfile holds the run's longest row (test rows are
    scored whole) plus the answer, rounded up to 256, at least 2048 and at most the model's context length."""
    import json

    from finetune.data.rows import context_size

    run = RunDir(tmp_path / "run")
    cfg = compose(["model=smollm2", "task=classification"])  # max_new_tokens 8, context length 8192
    assert cfg.export.ollama.num_ctx is None and context_size(cfg, run) == 2048  # no data report yet

    def report(longest: int) -> None:
        run.data_dir.mkdir(parents=True, exist_ok=True)
        lengths = {"train": {"max": 380, "mean": 200.0}, "test": {"max": longest, "mean": 250.0}}
        run.validation_report_path.write_text(json.dumps({"token_lengths": lengths}))

    for longest, expected in [(300, 2048), (3300, 3328), (3320, 3328), (3321, 3584), (20000, 8192)]:
        report(longest)
        assert context_size(cfg, run) == expected, longest
    report(3300)
    commands, _ = render_modelfile(modelfile_text(cfg, family_tokenizer("chatml"), GGUF, "S", run=run), [])
    assert [c["args"] for c in commands if c["name"] == "num_ctx"] == ["3328"]
    assert context_size(compose(["task=classification", "export.ollama.num_ctx=1024"]), run) == 1024


def test_gptq_group_size_divides_the_model():
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, head_dim=64)
    assert choose_group_size(smol, None) == 64  # 128 does not divide SmolLM2's hidden size 576
    assert choose_group_size(LlamaConfig(hidden_size=4096, intermediate_size=11008), None) == 128
    with pytest.raises(ExportError, match="does not divide"):
        choose_group_size(smol, 128)


def test_export_stages_skip_when_not_configured(tmp_path):
    from finetune.export.gguf import export_gguf
    from finetune.export.gptq import quantize
    from finetune.export.merge import merge
    from finetune.export.ollama.modelfile import write_modelfiles

    cfg = compose(["export=none", f"run_dir={tmp_path}"])
    run = RunDir(tmp_path)
    assert quantize(cfg, run) == {"skipped": "export.gptq is not set"}
    assert export_gguf(cfg, run) == {"skipped": "export.gguf is not set"}
    assert write_modelfiles(cfg, run) == {"skipped": "export.ollama is not set"}
    assert merge(cfg, run) == {"skipped": "export.merge is false"}
    assert not any(tmp_path.iterdir())


def test_gptq_without_the_extra_names_it(tmp_path, monkeypatch):
    from finetune.export.gptq import quantize

    cfg = compose(["export=all", f"run_dir={tmp_path}"])
    run = RunDir(tmp_path)
    run.merged_dir.mkdir(parents=True)
    (run.merged_dir / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # as if not installed
    with pytest.raises(ExportError, match=r"pip install 'finetune\[gptq\]'"):
        quantize(cfg, run)
