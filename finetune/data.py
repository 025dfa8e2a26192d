"""Data stage: load the task's data, validate it, split it, render chat rows, write run.data_dir.

    prepare(cfg, run) -> summary   writes run.data_dir/{train,validation,test}.jsonl + validation_report.json

Order of work, all before any training:
1. read the files (finetune.data_sources): unreadable files, non-UTF-8 bytes, broken JSON lines,
   missing columns or no usable rows stop at once with file:row and what was expected;
2. check every row (empty, missing or wrong-typed fields, labels outside the label set, answers
   that are not JSON or have keys outside the field list): such rows are dropped and counted;
3. split with a seeded hash of each input (same seed -> same split on any machine, independent of
   PYTHONHASHSEED and of row order); explicit train/validation/test files override the split;
4. remove from train every example whose input is also in test (or validation);
5. count tokens with the model's chat template: examples longer than method.max_length are dropped
   from train/validation (counted; test keeps them);
6. cap train / validation+test at task.data.max_train_examples / max_eval_examples;
7. render rows in TRL's prompt/completion conversational format (docs/architecture.md).

`tokenize_row` gives the input_ids/labels of one row with completion-only loss over exactly the
answer tokens plus the end-of-turn token, for tests and cross-checks of TRL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from finetune.data_sources import (
    SPLITS,
    DataError,
    Example,
    Record,
    check_columns,
    data_files,
    detect_format,
    load_hub,
    read_records,
    resolve_path,
    split_files,
    to_example,
)
from finetune.tasks import BadExample, Task, get_task

log = logging.getLogger("finetune")
MAX_ISSUES_PER_KIND = 20  # listed in validation_report.json; all are counted

__all__ = ["prepare", "split_task_data", "tokenize_row", "count_tokens", "split_examples", "DataError", "read_rows"]


class Report:
    """Every problem found, counted by kind, the first few of each kind listed with file:row."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.issues: list[dict] = []

    def add(self, kind: str, file: str, row: int, message: str, action: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_ISSUES_PER_KIND:
            self.issues.append({"kind": kind, "file": file, "row": row, "message": message, "action": action})

    def log_summary(self) -> list[str]:
        lines = []
        for kind, count in sorted(self.counts.items()):
            first = next(i for i in self.issues if i["kind"] == kind)
            lines.append(f"{count} x {kind} ({first['action']}), e.g. {first['file']}:{first['row']}: {first['message']}")
            log.warning("[data] %s", lines[-1])
        return lines


# ---- loading ---------------------------------------------------------------------------------


def _read_sources(data_cfg: DictConfig, task_name: str) -> dict[str, list[list[Record]]]:
    """{"pool": files to split, "validation"/"test": explicit files}, each a list of files' records."""
    if data_cfg.get("hub_dataset"):
        hub = load_hub(data_cfg)
        return {"pool" if split == "train" else split: [records] for split, records in hub.items()}
    explicit = {s: data_cfg.get(f"{s}_path") for s in SPLITS}
    if data_cfg.get("path") and explicit["train"]:
        raise DataError("set task.data.path (split automatically) or task.data.train_path, not both")
    pool_value = data_cfg.get("path") or explicit["train"]
    if not pool_value:
        raise DataError(
            f"task {task_name} has no data: set task.data.path=FILE_OR_FOLDER (.jsonl/.json/.csv/.parquet), "
            f"task.data.train_path=... (+ validation_path/test_path), or task.data.hub_dataset=NAME"
        )
    pool = resolve_path(pool_value, "task.data.path" if data_cfg.get("path") else "task.data.train_path")
    paths: dict[str, list[Path]] = {}
    found = split_files(pool) if pool.is_dir() else {}
    if found.get("train"):
        paths["pool"] = [found["train"]]
        paths.update({s: [p] for s, p in found.items() if s != "train"})
    else:
        paths["pool"] = data_files(pool)
    for split in ("validation", "test"):
        if explicit[split]:
            paths[split] = data_files(resolve_path(explicit[split], f"task.data.{split}_path"))
    return {key: [read_records(p) for p in files] for key, files in paths.items()}


def load_task_data(cfg_task: DictConfig, task: Task, report: Report) -> dict[str, list[Example]]:
    """Usable examples per source ("pool", and explicit "validation"/"test"); bad rows go to the report."""
    sources = _read_sources(cfg_task.data, task.name)
    out: dict[str, list[Example]] = {}
    index = 0
    for key, files in sources.items():
        examples = []
        for records in files:
            if not records:
                continue
            fmt = detect_format(records, cfg_task.data)
            check_columns(records, fmt, cfg_task.data)
            for record in records:
                try:
                    example = to_example(record, fmt, task, cfg_task.data)
                except BadExample as exc:
                    report.add(exc.kind, record.file, record.row, str(exc), "dropped")
                    continue
                example.index = index
                index += 1
                examples.append(example)
        names = ", ".join(sorted({r.file for records in files for r in records[:1]})) or "the data"
        if not examples:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())) or "no rows"
            raise DataError(f"{names}: no usable rows ({reasons}; see the first ones below)\n" + "\n".join(
                f"  {i['file']}:{i['row']}: {i['message']}" for i in report.issues[:5]))
        out[key] = examples
    return out


# ---- splitting ----------------------------------------------------------------------------------


def _split_key(seed: int, example: Example) -> str:
    return hashlib.sha256(f"{seed}\x00{example.key}".encode()).hexdigest()


def split_examples(
    examples: list[Example], validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Example]]:
    """Seeded split: order by sha256(seed, input) and cut. Fractions of 0 leave a split empty."""
    for name, f in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"task.data.{name}={f} must be in [0, 1)")
    if validation_fraction + test_fraction >= 1:
        raise DataError(f"task.data.validation_fraction + test_fraction = {validation_fraction + test_fraction} leaves no training data")
    n = len(examples)

    def size(f: float) -> int:
        k = round(n * f)
        return 1 if f > 0 and k == 0 and n >= 3 else k

    n_test, n_val = size(test_fraction), size(validation_fraction)
    if n - n_test - n_val < 1:
        raise DataError(f"only {n} usable examples: too few to split into train/validation/test")
    ordered = sorted(examples, key=lambda e: (_split_key(seed, e), e.index))
    return {"test": ordered[:n_test], "validation": ordered[n_test : n_test + n_val], "train": ordered[n_test + n_val :]}


def _assign_splits(sources: dict[str, list[Example]], data_cfg: DictConfig) -> dict[str, list[Example]]:
    val_f = 0.0 if "validation" in sources else float(data_cfg.validation_fraction)
    test_f = 0.0 if "test" in sources else float(data_cfg.test_fraction)
    splits = split_examples(sources["pool"], val_f, test_f, int(data_cfg.split_seed))
    for split in ("validation", "test"):
        if split in sources:
            splits[split] = sorted(sources[split], key=lambda e: (_split_key(int(data_cfg.split_seed), e), e.index))
    return splits


def _remove_leaks(splits: dict[str, list[Example]], report: Report) -> None:
    """An input seen in training must not be scored: drop train (and validation) copies of test inputs,
    and train copies of validation inputs."""
    for target, other in (("train", "test"), ("validation", "test"), ("train", "validation")):
        seen = {e.key: e for e in splits[other]}
        kept = []
        for e in splits[target]:
            twin = seen.get(e.key)
            if twin is None:
                kept.append(e)
                continue
            report.add(f"duplicate_of_{other}", e.file, e.row, f"same input as {twin.file}:{twin.row} ({other})",
                       f"removed from {target}")
        splits[target] = kept


# ---- rendering and tokens ------------------------------------------------------------------------


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


def _adapt(messages: list[dict], model_cfg: DictConfig) -> list[dict]:
    try:
        from finetune.models import adapt_messages
    except ImportError:  # models.py not there: templates with a system role only
        return list(messages)
    return adapt_messages(messages, model_cfg)


def tokenize_row(row: dict, tokenizer: Any, model_cfg: DictConfig, max_length: int | None = None) -> dict:
    """input_ids and labels of one row; labels are -100 except the answer tokens + the end-of-turn token.

    The prompt is rendered with add_generation_prompt=True, as at inference. Anything the template
    writes after model_cfg.eos_token (ChatML's newline) is context, not trained.
    """
    prompt = _adapt(row["prompt"], model_cfg)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + list(row["completion"]), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"row {row.get('id')}: the chat template renders the prompt differently when an answer follows")
    eos = str(model_cfg.eos_token)
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


def count_tokens(rows: list[dict], tokenizer: Any, model_cfg: DictConfig) -> list[int]:
    """Tokens of each whole row (prompt + answer) with the model's chat template."""
    texts = [tokenizer.apply_chat_template(_adapt(r["prompt"], model_cfg) + list(r["completion"]), tokenize=False)
             for r in rows]
    if not texts:
        return []
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _length_counter(cfg: DictConfig, tokenizer: Any) -> tuple[Callable[[list[dict]], list[int]] | None, str]:
    if tokenizer is None:
        try:
            from finetune.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model)
        except Exception as exc:  # no model files here: the data is still usable, say so in the report
            log.warning("[data] no tokenizer for %s (%s): example lengths not checked", cfg.model.name, exc)
            return None, f"skipped: no tokenizer for {cfg.model.name} ({type(exc).__name__}: {exc})"
    return (lambda rows: count_tokens(rows, tokenizer, cfg.model)), f"{cfg.model.name} tokenizer + chat template"


# ---- the stage ----------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


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


def prepare(cfg: DictConfig, run: Any, tokenizer: Any = None) -> dict:
    """The data stage. `tokenizer` (optional) saves loading the model's tokenizer again."""
    try:
        return _prepare(cfg, run, tokenizer)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None


def split_task_data(cfg_task: DictConfig, report: Report | None = None) -> tuple[Task, dict, dict, int]:
    """Load, check, split and render a task's data (no token count, no caps).

    Returns (task, examples per split, rendered rows per split, number of usable rows).
    """
    try:
        task = get_task(cfg_task)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    report = report if report is not None else Report()
    sources = load_task_data(cfg_task, task, report)
    splits = _assign_splits(sources, cfg_task.data)
    _remove_leaks(splits, report)
    rendered = {s: [render_row(task, e) for e in splits[s]] for s in SPLITS}
    return task, splits, rendered, sum(len(v) for v in sources.values())


def _prepare(cfg: DictConfig, run: Any, tokenizer: Any) -> dict:
    data_cfg, report = cfg.task.data, Report()
    task, splits, rendered, rows_usable = split_task_data(cfg.task, report)

    max_length = int(cfg.method.max_length)
    counter, length_check = _length_counter(cfg, tokenizer)
    lengths: dict[str, dict] = {}
    if counter is not None:
        for split in SPLITS:
            n_tokens = counter(rendered[split])
            if n_tokens:
                lengths[split] = {"max": max(n_tokens), "mean": round(sum(n_tokens) / len(n_tokens), 1)}
            kept = []
            for row, example, n in zip(rendered[split], splits[split], n_tokens):
                if n <= max_length:
                    kept.append(row)
                    continue
                action = "kept (evaluation only)" if split == "test" else f"dropped from {split}"
                report.add(f"too_long_{split}", example.file, example.row,
                           f"{n} tokens > method.max_length={max_length}", action)
                if split == "test":
                    kept.append(row)
            rendered[split] = kept
    if not rendered["train"]:
        raise DataError("no training examples left after validation (see the problems logged above)")

    caps = {"train": data_cfg.max_train_examples, "validation": data_cfg.max_eval_examples,
            "test": data_cfg.max_eval_examples}
    capped = {}
    for split, cap in caps.items():
        if cap is not None and len(rendered[split]) > int(cap):
            capped[split] = len(rendered[split])
            rendered[split] = rendered[split][: int(cap)]

    run.data_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_jsonl(run.data_dir / f"{split}.jsonl", rendered[split])
    warnings = report.log_summary()
    counts = {s: len(rendered[s]) for s in SPLITS}
    report_json = {
        "task": task.name,
        "kind": task.kind,
        "files": sorted({e.file for v in splits.values() for e in v}),
        "rows_read": rows_usable + sum(c for k, c in report.counts.items() if _dropped_on_read(k)),
        "rows_usable": rows_usable,
        "problems": dict(sorted(report.counts.items())),
        "issues": report.issues,
        "split_seed": int(data_cfg.split_seed),
        "splits": counts,
        "capped_from": capped,
        "max_length": max_length,
        "length_check": length_check,
        "token_lengths": lengths,
    }
    (run.data_dir / "validation_report.json").write_text(json.dumps(report_json, indent=2, ensure_ascii=False, default=str))
    log.info("[data] %s: %d usable of %d rows -> train %d, validation %d, test %d", task.name, rows_usable,
             report_json["rows_read"], counts["train"], counts["validation"], counts["test"])
    return {
        **counts,
        "rows_read": report_json["rows_read"],
        "dropped": {k: v for k, v in report.counts.items() if not k.startswith("too_long_test")},
        "warnings": warnings,
        "length_check": length_check,
    }


def _dropped_on_read(kind: str) -> bool:
    return not (kind.startswith("duplicate_of_") or kind.startswith("too_long_"))
