"""The three recipes of docs/architecture.md, each done once with a throwaway defined here:

- a model family: one `Family` record (finetune.models.families) + `model.family=<name>` (its YAML);
- a task kind: one `Task` subclass registered in finetune.tasks.KINDS + `task.kind=<name>` (its YAML);
- an export format: one stage function + one row of finetune.pipeline.STAGES.

If one of these needs a change anywhere else, the layout is wrong and this file fails.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune import pipeline, tasks
from finetune.core.config import compose
from finetune.core.errors import ConfigError, RunDirError
from finetune.core.rundir import RunDir
from finetune.data.prepare import split_task_data
from finetune.export.ollama.gotemplate import render_modelfile
from finetune.export.ollama.modelfile import modelfile_text
from finetune.models import families
from finetune.models.families import Family
from finetune.models.loading import load_tokenizer, render_prompt
from finetune.tasks.base import BadExample, Task

sys.path.insert(0, str(Path(__file__).parent))

# ---- a model family ------------------------------------------------------------------------

# A chat format of our own: "[ROLE] content" lines, the answer ended by the model's end-of-turn token.
BRACKET_JINJA = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
BRACKET_GO = """{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
[{{ if eq $m.Role "user" }}USER{{ else if eq $m.Role "assistant" }}ASSISTANT{{ else }}SYSTEM{{ end }}] {{ $m.Content }}
{{- if and (eq $m.Role "assistant") (not $last) }}{{ @END@ }}{{ end }}
{{- if or (not $last) (ne $m.Role "assistant") }}
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}[ASSISTANT] {{ end }}
{{- end }}"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")
def test_recipe_model_family(monkeypatch):
    bracket = Family("bracket", BRACKET_GO, ["[USER]"], chat_template=BRACKET_JINJA)
    monkeypatch.setitem(families.FAMILIES, "bracket", bracket)
    cfg = compose(["model=smollm2", "model.family=bracket", "task=extraction"])
    pipeline.check_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    assert tokenizer.chat_template == BRACKET_JINJA  # the family's own format, from its record
    conversations = [
        [{"role": "user", "content": "1 Main St"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": '{"a": 1}'},
         {"role": "user", "content": "q2"}],
    ]
    text = modelfile_text(cfg, tokenizer, Path("/run/gguf/m-t-Q8_0.gguf"), "")
    _, prompts = render_modelfile(text, conversations)
    for conversation, rendered in zip(conversations, prompts):
        assert rendered == render_prompt(tokenizer, conversation, cfg.model)
    assert rendered.endswith("<|im_end|>\n[USER] q2\n[ASSISTANT] ")


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="model.family='nope'.*chatml"):
        pipeline.check_config(compose(["model.family=nope"]))


# ---- a task kind ---------------------------------------------------------------------------


class NumberTask(Task):
    """The answer is an integer; scored by exact value and mean absolute error."""

    kind = "number"
    headline_metric = "accuracy"

    def check_output(self, value: Any) -> int:
        try:
            return int(str(value).strip())
        except ValueError:
            raise BadExample("not_a_number", f"answer {value!r} is not an integer") from None

    def answer_text(self, reference: int) -> str:
        return str(reference)

    def parse(self, text: str) -> int | None:
        try:
            return int(text.strip().split()[0])
        except (ValueError, IndexError):
            return None

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        rows = [{"parsed": self.parse(o), "correct": self.parse(o) == r} for r, o in zip(references, outputs)]
        errors = [abs((row["parsed"] or 0) - r) for row, r in zip(rows, references)]
        n = len(rows)
        return {"n": n, "accuracy": sum(r["correct"] for r in rows) / n, "mae": sum(errors) / n}, rows


def test_recipe_task_kind(monkeypatch, tmp_path):
    monkeypatch.setitem(tasks.KINDS, "number", NumberTask)
    data = tmp_path / "sums.jsonl"
    rows = [{"input": f"{a} + {a + 1}", "output": str(2 * a + 1)} for a in range(30)] + [
        {"input": "one + two", "output": "three"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["task=custom", "task.kind=number", f"task.data.path={data}", "task.system_prompt=Add.",
                   "task.data.on_error=drop"])
    pipeline.check_config(cfg)
    task, _, rendered, usable = split_task_data(cfg.task)
    assert isinstance(task, NumberTask) and usable == 30  # the row whose answer is not a number is dropped
    row = rendered["train"][0]
    assert row["prompt"][0] == {"role": "system", "content": "Add."}
    assert row["completion"][0]["content"] == str(row["reference"])
    metrics, _ = task.score([3, 5], ["3", "6 I think"])
    assert metrics == {"n": 2, "accuracy": 0.5, "mae": 0.5}


# ---- an export format -------------------------------------------------------------------------


def export_notes(cfg, run: RunDir) -> dict:
    """A format that writes the test rows' ids next to the run's other exports."""
    ids = [json.loads(line)["id"] for line in run.split_path("test").read_text().splitlines()]
    (run.root / "notes.txt").write_text("\n".join(ids) + "\n")
    return {"rows": len(ids)}


def test_recipe_export_format(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "STAGES", [*pipeline.STAGES, pipeline.Stage("notes", export_notes, requires=["data"])])
    run_dir = tmp_path / "run"
    alone = compose(["stages=[notes]", f"run_dir={run_dir}"])
    with pytest.raises(RunDirError, match=r"needs stage\(s\) \['data'\]"):
        pipeline.run_pipeline(alone, run_dir)
    run = pipeline.run_pipeline(compose(["stages=[data,notes]", f"run_dir={run_dir}"]), run_dir)
    summary = run.stage_summary("notes")
    assert summary["rows"] == len((run.root / "notes.txt").read_text().splitlines()) > 0
    assert [s.name for s in pipeline.selected_stages(compose(["stages=[notes,data]"]))] == ["data", "notes"]
