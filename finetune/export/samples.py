"""Real task examples for the export checks (the run's own data), and sample conversations."""

from __future__ import annotations

import random
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.core.rundir import RunDir
from finetune.data.rows import read_rows
from finetune.models.loading import adapt_messages


def split_rows(run: RunDir, split: str, limit: int | None = None) -> list[dict]:
    """The split's rows (none when the run has no such split)."""
    path = run.split_path(split)
    return read_rows(path, limit) if path.is_file() else []


def task_rows(run: RunDir, splits: tuple[str, ...] = ("test", "validation", "train"), limit: int = 1) -> list[dict]:
    """The first rows of the first split that has any (prompt/completion rows written by the data stage)."""
    for split in splits:
        rows = split_rows(run, split, limit)
        if rows:
            return rows
    return []


def fallback_prompt(cfg: Config) -> list[dict]:
    """A prompt in the task's own format when the run has no data directory (export of an outside adapter)."""
    user = cfg.task.prompt_template.replace("{input}", "123 Main St, Springfield, IL 62704")
    system = cfg.task.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def task_prompt(cfg: Config, run: RunDir) -> tuple[list[dict], str | None]:
    """(prompt messages, reference completion text or None) of one real held-out example."""
    rows = task_rows(run)
    if not rows:
        return fallback_prompt(cfg), None
    completion = rows[0].get("completion") or []
    return list(rows[0]["prompt"]), (completion[0]["content"] if completion else None)


def sample_conversations(cfg: Config, run: RunDir) -> list[tuple[str, list[dict], bool]]:
    """(name, conversation as a client sends it, whether the Modelfile's SYSTEM applies) for the
    template check: the task's real prompt, no system prompt, a client's own system prompt, several
    turns, and awkward characters (quotes, backslashes, braces, template syntax, unicode)."""
    prompt, completion = task_prompt(cfg, run)
    user_only = [m for m in prompt if m["role"] != "system"]
    answer = completion or "{\"answer\": 1}"
    rows = task_rows(run, ("train",), limit=2)
    second = rows[-1]["prompt"][-1]["content"] if rows else "And this one?"
    odd = 'Quote " and """triple""" \\ backslash {{ .System }} {% raw %} <tag> – ünïcødé 🙂\n  indented line'
    convs = [
        ("task prompt", user_only, True),
        ("no system prompt", user_only, False),
        ("client system prompt", [{"role": "system", "content": "You are terse."}] + user_only, True),
        ("several turns", user_only + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": second}], True),
        ("awkward characters", [{"role": "user", "content": odd}], True),
    ]
    return convs


def calibration_rows(cfg: Config, run: RunDir, tokenizer: Any, n: int, max_tokens: int) -> list[dict]:
    """`n` training examples (prompt + answer) rendered with the chat template, tokenized."""
    rows = split_rows(run, "train")
    if not rows:
        raise ExportError(f"GPTQ and the GGUF importance matrix calibrate on the task's training examples, and "
                          f"{run.data_dir / 'train.jsonl'} is missing or empty: run the data stage")
    random.Random(cfg.method.seed).shuffle(rows)
    out = []
    for row in rows[:n]:
        messages = adapt_messages(list(row["prompt"]) + list(row.get("completion") or []), cfg.model)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return out
