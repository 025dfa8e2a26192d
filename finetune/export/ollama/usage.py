"""Constrained answers from an exported model: the files a user passes (schema.json for Ollama's `format`,
answer.gbnf for llama.cpp) and the calls the Modelfile header and the model card show.

The evaluation decodes under the same constraint (finetune.tasks.grammar): the GBNF grammar in
answer.gbnf, made from the schema in schema.json by llama.cpp's converter (Ollama converts `format`
with its own copy of that converter).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.files import write_json_atomic, write_text_atomic
from finetune.core.rundir import RunDir, ollama_model_name
from finetune.data.rows import run_task
from finetune.tasks import get_task
from finetune.tasks.grammar import constraint_kind, gbnf_grammar, ollama_format

OLLAMA_CHAT_URL = "http://localhost:11434/api/chat"


def settled_task(cfg: Config, run: RunDir | None) -> Any:
    """The task as the run's data stage settled it (the field order learned from the training answers, which
    the model writes; whether values copy the input); from the config alone when there is no run."""
    return run_task(cfg.task, run) if run is not None else get_task(cfg.task)


def answer_constraint(cfg: Config, run: RunDir | None) -> Any:
    """The task's answer constraint, for any input (settled_task)."""
    return settled_task(cfg, run).answer_constraint()


def write_constraint_files(cfg: Config, run: RunDir) -> list[Path]:
    """schema.json and answer.gbnf next to the Modelfiles (none for a free-text task; stale ones removed)."""
    constraint = answer_constraint(cfg, run)
    paths = [run.answer_schema_path, run.answer_grammar_path]
    if constraint is None:
        for path in paths:
            path.unlink(missing_ok=True)
        return []
    write_json_atomic(run.answer_schema_path, ollama_format(constraint))
    write_text_atomic(run.answer_grammar_path, gbnf_grammar(constraint))
    return paths


def example_user_turn(cfg: Config) -> str:
    return cfg.task.prompt_template.replace("{input}", "...")


def curl_command(cfg: Config, quant: str, run: RunDir | None = None) -> str | None:
    """`curl .../api/chat` with the schema as `format` (the Modelfile carries the system prompt)."""
    schema = ollama_format(answer_constraint(cfg, run))
    if schema is None:
        return None
    body = {"model": ollama_model_name(cfg.model.name, cfg.task.name, quant),
            "messages": [{"role": "user", "content": example_user_turn(cfg)}], "format": schema, "stream": False}
    return f"curl {OLLAMA_CHAT_URL} -d {shlex.quote(json.dumps(body, ensure_ascii=False))}"


def python_call(cfg: Config, quant: str, schema_path: str) -> list[str]:
    """The same request through the `ollama` Python package, the schema read from schema_path."""
    name = ollama_model_name(cfg.model.name, cfg.task.name, quant)
    messages = json.dumps([{"role": "user", "content": example_user_turn(cfg)}], ensure_ascii=False)
    return ["import json, ollama",
            f"schema = json.load(open({json.dumps(schema_path)}))",
            f"response = ollama.chat(model={json.dumps(name)}, messages={messages}, format=schema)",
            "print(response.message.content)"]


COPY_NOTE = ("The evaluation also held every string value to words copied from the input: per request, give each "
             "string property of the schema a `pattern` made of the input's words and other characters, as "
             "finetune.tasks.copying.with_copy_patterns(schema, text) writes it (Ollama's format takes it).")


def format_note(cfg: Config, run: RunDir | None = None) -> str | None:
    """What Ollama's `format` cannot do for a label set, and the per-request pattern of values copied from
    the input, said plainly."""
    task = settled_task(cfg, run)
    constraint = task.answer_constraint()
    if task.per_input and constraint_kind(constraint) == "json_schema":
        return COPY_NOTE
    if constraint_kind(constraint) != "labels":
        return None
    return (f"Ollama's format constrains to JSON only: with this schema the answer is a label in quotes "
            f"({json.dumps(constraint[0])}), not the bare label the model was trained to write, so read it with "
            f"json.loads. For the bare label, decode under answer.gbnf (llama.cpp's --grammar-file), as the "
            f"evaluation does.")


def llama_cpp_grammar_args(grammar_path: str) -> str:
    return f"--grammar-file {shlex.quote(grammar_path)}"


def modelfile_comment(cfg: Config, quant: str, run: RunDir | None = None) -> list[str]:
    """The Modelfile header lines (without '#') on constrained answers; [] for a free-text task."""
    curl = curl_command(cfg, quant, run)
    if curl is None:
        return []
    lines = ["Constrained answers: pass schema.json (next to this file) as Ollama's format:", f"  {curl}"]
    lines += [f"  {line}" for line in python_call(cfg, quant, "schema.json")]
    note = format_note(cfg, run)
    if note:
        lines.append(note)
    lines.append(f"llama.cpp: add {llama_cpp_grammar_args('answer.gbnf')} (the grammar the evaluation decoded under).")
    return lines
