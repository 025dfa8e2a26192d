"""The rows of a run's split files (run.data_dir/{train,validation,test}.jsonl), as the data stage writes
them and every later stage reads them, and their tokens under a model's chat template.

    {"id", "prompt": [messages], "completion": [assistant message], "reference", "input", "source"}

`tokenize_row` gives the input_ids/labels of one row with completion-only loss over exactly the
answer tokens plus the end-of-turn token, for tests and cross-checks of TRL.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path
from typing import Any

import dataclasses

from finetune.core.config import Config, ModelConfig, TaskConfig
from finetune.core.errors import DataError
from finetune.core.rundir import RunDir
from finetune.data.sources import Example
from finetune.models.loading import adapt_messages
from finetune.tasks import Task, get_task


def run_task(cfg_task: TaskConfig, run: RunDir) -> Task:
    """The task as the data stage settled it for this run (extraction: the field list in the data's key
    order, learned from the training answers; classification: the label set, given or learned), so later
    stages ask for the answers the model was trained on."""
    if not run.validation_report_path.is_file():
        return get_task(cfg_task)
    report = json.loads(run.validation_report_path.read_text())
    if report.get("labels"):  # classification: the label set, given or learned
        return get_task(dataclasses.replace(cfg_task, labels=list(report["labels"])))
    if not report.get("fields"):
        return get_task(cfg_task)
    schema = dict(cfg_task.json_schema or {})
    schema["properties"] = {**(report.get("field_types") or {}), **(schema.get("properties") or {})}
    copy_values = cfg_task.copy_values if cfg_task.copy_values is not None else report.get("copy_values")
    return get_task(dataclasses.replace(cfg_task, fields=list(report["fields"]), json_schema=schema,
                                        copy_values=copy_values))


def render_row(task: Task, example: Example) -> dict:
    prompt = example.prompt if example.prompt is not None else task.prompt_messages(example.input)
    return {
        "id": f"{task.name}-{example.index:06d}",
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": task.answer_text(example.reference)}],
        "reference": example.reference,
        "input": example.input,
        "source": f"{example.file}:{example.row}",
    }


def context_size(cfg: Config, run: RunDir | None) -> int:
    """The context a served model needs (the Ollama Modelfile's num_ctx, the route server's): export.ollama.num_ctx,
    or where that is unset what this run's data needs: its longest row as read, before any cut
    (data/validation_report.json's token_lengths), plus task.max_new_tokens, rounded up to 256 tokens, at least
    2048 and at most the model's context length. Ollama cuts a prompt longer than num_ctx, so the served model
    would not read whole the inputs the evaluate stage scored it on (test rows are scored whole)."""
    if cfg.export.ollama is not None and cfg.export.ollama.num_ctx:
        return int(cfg.export.ollama.num_ctx)
    longest = 0
    if run is not None and run.validation_report_path.is_file():
        lengths = json.loads(run.validation_report_path.read_text()).get("token_lengths") or {}
        longest = max((int(split.get("max", 0)) for split in lengths.values()), default=0)
    need = -(-(longest + cfg.task.max_new_tokens) // 256) * 256
    return max(2048, min(need, cfg.model.context_length)) if longest else 2048


def tokenize_row(row: dict, tokenizer: Any, model_cfg: ModelConfig, max_length: int | None = None) -> dict:
    """input_ids and labels of one row; labels are -100 except the answer tokens + the end-of-turn token.

    The prompt is rendered with add_generation_prompt=True, as at inference. Anything the template
    writes after model_cfg.eos_token (ChatML's newline) is context, not trained.
    """
    prompt = adapt_messages(row["prompt"], model_cfg)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + list(row["completion"]), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"row {row.get('id')}: the chat template renders the prompt differently when an answer follows")
    eos = model_cfg.eos_token
    end = full_text.find(eos, len(prompt_text))
    if end < 0:
        raise ValueError(f"row {row.get('id')}: the chat template does not end the answer with {eos!r}")
    end += len(eos)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids, answer_end_ids, input_ids = ids(prompt_text), ids(full_text[:end]), ids(full_text)
    if input_ids[: len(prompt_ids)] != prompt_ids or input_ids[: len(answer_end_ids)] != answer_end_ids:
        raise ValueError(f"row {row.get('id')}: tokens merge across the prompt/answer boundary")
    a, b = len(prompt_ids), len(answer_end_ids)
    mask = [0] * a + [1] * (b - a) + [0] * (len(input_ids) - b)
    labels = [t if m else -100 for t, m in zip(input_ids, mask)]
    if max_length is not None:
        input_ids, labels, mask = input_ids[:max_length], labels[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "labels": labels, "completion_mask": mask}


def count_tokens(rows: list[dict], tokenizer: Any, model_cfg: ModelConfig) -> list[int]:
    """Tokens of each whole row (prompt + answer) with the model's chat template."""
    texts = [tokenizer.apply_chat_template(adapt_messages(r["prompt"], model_cfg) + list(r["completion"]), tokenize=False)
             for r in rows]
    if not texts:
        return []
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fit_input(task: Task, example: Example, n_tokens: int, max_length: int, tokenizer: Any,
              model_cfg: ModelConfig) -> tuple[dict, int] | None:
    """The row with the end of its input text (where the data gives messages: of the last user turn) cut off, at
    a word boundary where the kept text has one, so that the whole row (system prompt, template, earlier turns,
    answer) fits in max_length tokens, and its token count. None when the tokenizer gives no character offsets or
    no word of the input can stay. The row's `input` keeps the whole text (the baselines read it)."""
    text = example.input
    if not isinstance(text, str):
        return None
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError):  # a slow tokenizer: no offsets
        return None
    ends = [end for _, end in offsets]
    keep = len(ends) - (n_tokens - max_length)
    while keep > 0:
        cut = text[: ends[keep - 1]]
        if ends[keep - 1] < len(text) and not text[ends[keep - 1]].isspace():
            cut = re.sub(r"\s+\S*$", "", cut) if re.search(r"\s", cut) else cut  # no half word at the end
        cut = cut.rstrip()
        if not cut:
            return None
        row = {**render_row(task, _with_input(example, cut)), "input": text}
        n = count_tokens([row], tokenizer, model_cfg)[0]
        if n <= max_length:
            return row, n
        keep = min(keep - 1, bisect.bisect_right(ends, len(cut)) - (n - max_length))  # tokens within the cut
    return None


def _with_input(example: Example, text: str) -> Example:
    """The example with another input text: in the prompt's last user turn where the data gave messages."""
    if example.prompt is None:
        return dataclasses.replace(example, input=text)
    last = max(i for i, m in enumerate(example.prompt) if m["role"] == "user")
    prompt = [*example.prompt[:last], {**example.prompt[last], "content": text}, *example.prompt[last + 1:]]
    return dataclasses.replace(example, input=text, prompt=prompt)


SPLIT_ROW = "{'id', 'prompt': [messages], 'completion': [assistant message], 'reference'}"


def read_rows(path: Path, limit: int | None = None, required: tuple[str, ...] = ("prompt", "completion")) -> list[dict]:
    """Rows of a split file written by the data stage (plain JSON: extraction references keep their keys).

    A line that is not a JSON object, or lacks one of `required`, stops with DataError naming file:line."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON object: {exc}") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row
                       or (k in ("prompt", "completion") and not row[k])]
            if missing:
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno}: expected {SPLIT_ROW} (the data stage's prompt/completion "
                                f"format); missing {missing}, got keys {got}")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def load_split(path: Path, model_cfg: ModelConfig) -> list[dict]:
    """Prompt/completion rows of one split, with the prompt adapted to the model family (e.g. no system role)."""
    rows = []
    for lineno, row in enumerate(read_rows(path), 1):
        try:
            clean = [[{"role": str(m["role"]), "content": str(m["content"])} for m in row[k]]
                     for k in ("prompt", "completion")]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: row {lineno}: every message needs 'role' and 'content' ({exc!r})") from None
        rows.append({"prompt": adapt_messages(clean[0], model_cfg), "completion": clean[1]})
    return rows
