"""Data stage: load the task's data, validate it, split it, render chat rows, write run.data_dir.

    prepare(cfg, run) -> summary   writes run.data_dir/{train,validation,test}.jsonl + validation_report.json

Order of work, all before any training:
1. read the files (finetune.data.sources): unreadable files, non-UTF-8 bytes, broken JSON lines,
   missing columns or no usable rows stop at once with file:row and what was expected;
2. check every row (empty, missing or wrong-typed fields, labels outside the label set, answers
   that are not JSON or have keys outside the field list): such rows are dropped and counted;
3. split with a seeded hash of each input (same seed -> same split on any machine, independent of
   PYTHONHASHSEED and of row order); explicit train/validation/test files override the split;
4. remove from train every example whose input is also in test (or validation);
5. count tokens with the model's chat template: a train/validation example longer than method.max_length
   is dropped, or has the end of its input cut to fit (task.data.too_long; counted); test keeps them whole;
6. cap train / validation+test at task.data.max_train_examples / max_eval_examples, and count each label
   (field) in the training rows that are left (`label_counts_train`, the report's per-label table);
7. render rows in TRL's prompt/completion conversational format (finetune.data.rows).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.core.config import Config, DataConfig, TaskConfig
from finetune.core.errors import DataError
from finetune.core.files import write_json_atomic, write_jsonl_atomic
from finetune.core.rundir import SPLITS, RunDir
from finetune.data.rows import count_tokens, fit_input, render_row
from finetune.data.sources import (
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
from finetune.models.loading import load_tokenizer
from finetune.tasks import BadExample, Task, get_task

log = logging.getLogger("finetune")
MAX_ISSUES_PER_KIND = 20  # listed in validation_report.json; all are counted

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


def _read_sources(data_cfg: DataConfig, task_name: str) -> dict[str, list[tuple[str, list[Record]]]]:
    """{"pool": files to split, "validation"/"test": explicit files}, each a list of (file, its records)."""
    if data_cfg.hub_dataset:
        hub = load_hub(data_cfg)
        return {"pool" if split == "train" else split: [(f"{data_cfg.hub_dataset}[{split}]", records)]
                for split, records in hub.items()}
    explicit = {s: getattr(data_cfg, f"{s}_path") for s in SPLITS}
    if data_cfg.path and explicit["train"]:
        raise DataError("set task.data.path (split automatically) or task.data.train_path, not both")
    pool_value = data_cfg.path or explicit["train"]
    if not pool_value:
        raise DataError(
            f"task {task_name} has no data: set task.data.path=FILE_OR_FOLDER (.jsonl/.json/.csv/.parquet), "
            f"task.data.train_path=... (+ validation_path/test_path), or task.data.hub_dataset=NAME"
        )
    pool = resolve_path(pool_value, "task.data.path" if data_cfg.path else "task.data.train_path")
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
    return {key: [(str(p), read_records(p)) for p in files] for key, files in paths.items()}


MAX_BAD_ROWS_LISTED = 200


def load_task_data(cfg_task: TaskConfig, task: Task, report: Report) -> dict[str, list[Example]]:
    """Usable examples per source ("pool", and explicit "validation"/"test"). A row the task cannot use
    stops the stage (task.data.on_error=stop, listing every such row) or is dropped and counted (drop)."""
    stop = str(cfg_task.data.on_error) == "stop"
    sources = _read_sources(cfg_task.data, task.name)
    out: dict[str, list[Example]] = {}
    bad: list[str] = []
    index = 0
    for key, files in sources.items():
        examples = []
        for _, records in files:
            if not records:
                continue
            fmt = detect_format(records, cfg_task.data)
            check_columns(records, fmt, cfg_task.data)
            for record in records:
                try:
                    example = to_example(record, fmt, task, cfg_task.data)
                except BadExample as exc:
                    report.add(exc.kind, record.file, record.row, str(exc), "stopped" if stop else "dropped")
                    if stop:
                        bad.append(f"  {record.file}:{record.row}: {exc} ({exc.kind})")
                    continue
                example.index = index
                index += 1
                examples.append(example)
        names = ", ".join(name for name, _ in files) or "the data"
        if stop and bad:
            listed = bad[:MAX_BAD_ROWS_LISTED] + ([f"  ... {len(bad) - MAX_BAD_ROWS_LISTED} more"]
                                                 if len(bad) > MAX_BAD_ROWS_LISTED else [])
            raise DataError(f"{names}: {len(bad)} row(s) the task {task.name} cannot use "
                            f"(task.data.on_error=stop):\n" + "\n".join(listed) + "\nFix them, or set "
                            "task.data.on_error=drop to leave them out (counted in data/validation_report.json).")
        if not examples:
            rows = sum(len(records) for _, records in files)
            if not rows:
                raise DataError(f"{names}: 0 rows (the file is empty)")
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items()))
            raise DataError(f"{names}: no usable rows of {rows} ({reasons}); the first ones:\n" + "\n".join(
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


def _assign_splits(sources: dict[str, list[Example]], data_cfg: DataConfig) -> dict[str, list[Example]]:
    val_f = 0.0 if "validation" in sources else data_cfg.validation_fraction
    test_f = 0.0 if "test" in sources else data_cfg.test_fraction
    splits = split_examples(sources["pool"], val_f, test_f, data_cfg.split_seed)
    for split in ("validation", "test"):
        if split in sources:
            splits[split] = sorted(sources[split], key=lambda e: (_split_key(data_cfg.split_seed, e), e.index))
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


def _length_tokenizer(cfg: Config, tokenizer: Any) -> tuple[Any, str]:
    """The tokenizer that measures rows (None if the model's files are not here), and what the report says."""
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(cfg.model)
        except Exception as exc:  # no model files here: the data is still usable, say so in the report
            log.warning("[data] no tokenizer for %s (%s): example lengths not checked", cfg.model.name, exc)
            return None, f"skipped: no tokenizer for {cfg.model.name} ({type(exc).__name__}: {exc})"
    return tokenizer, f"{cfg.model.name} tokenizer + chat template"


def too_long_policy(data_cfg: DataConfig, task: Task, train_fits: list[bool]) -> str:
    """"truncate" or "drop": what task.data.too_long means for this data. auto drops the rows over
    method.max_length (at a time budget the rows that fit train more steps, and scored better: docs/tasks.md),
    unless no training row fits: then their inputs are cut, except for extraction, whose answers copy words of the
    input that a cut could take away."""
    policy = str(data_cfg.too_long)
    if policy == "auto":
        return "truncate" if train_fits and not any(train_fits) and task.kind != "extraction" else "drop"
    return policy


# ---- the stage ----------------------------------------------------------------------------------


def split_task_data(cfg_task: TaskConfig, report: Report | None = None) -> tuple[Task, dict, dict, int]:
    """Load, check, split and render a task's data (no token count, no caps).

    Returns (task, examples per split, rendered rows per split, number of usable rows).
    """
    task = get_task(cfg_task)
    report = report if report is not None else Report()
    sources = load_task_data(cfg_task, task, report)
    splits = _assign_splits(sources, cfg_task.data)
    _remove_leaks(splits, report)
    task.learn_from_train([e.reference for e in splits["train"]], [e.input for e in splits["train"]])
    task.check_held_out({s: [e.reference for e in splits[s]] for s in SPLITS if s != "train"})
    rendered = {s: [render_row(task, e) for e in splits[s]] for s in SPLITS}
    return task, splits, rendered, sum(len(v) for v in sources.values())


def prepare(cfg: Config, run: RunDir, tokenizer: Any = None) -> dict:
    """The data stage. `tokenizer` (optional) saves loading the model's tokenizer again."""
    data_cfg, report = cfg.task.data, Report()
    task, splits, rendered, rows_usable = split_task_data(cfg.task, report)

    max_length = cfg.method.max_length
    tokenizer, length_check = _length_tokenizer(cfg, tokenizer)
    n_tokens = {s: count_tokens(rendered[s], tokenizer, cfg.model) for s in SPLITS} if tokenizer is not None else {}
    too_long = too_long_policy(data_cfg, task, [n <= max_length for n in n_tokens.get("train", [])])
    lengths = {s: {"max": max(n), "mean": round(sum(n) / len(n), 1)} for s, n in n_tokens.items() if n}
    for split, counts in n_tokens.items():
        kept = []
        for row, example, n in zip(rendered[split], splits[split], counts):
            if n <= max_length:
                kept.append(row)
                continue
            why = f"{n} tokens > method.max_length={max_length}"
            fitted = (fit_input(task, example, n, max_length, tokenizer, cfg.model)
                      if split != "test" and too_long == "truncate" else None)
            if fitted:
                kept.append(fitted[0])
                report.add(f"truncated_{split}", example.file, example.row, f"{why}: input cut to {fitted[1]}",
                           f"the end of the input cut (task.data.too_long={data_cfg.too_long})")
                continue
            report.add(f"too_long_{split}", example.file, example.row, why,
                       "kept (evaluation only)" if split == "test" else f"dropped from {split}")
            if split == "test":
                kept.append(row)
        rendered[split] = kept
    if not rendered["train"] and report.counts.get("too_long_train"):
        fix = "or set task.data.too_long=truncate" if too_long == "drop" else "even with its input cut away none fits"
        raise DataError(f"no training examples left: every one is longer than method.max_length={max_length}; raise "
                        f"it (data/validation_report.json's token_lengths give the longest), {fix}")
    if not rendered["train"]:
        raise DataError("no training examples left after validation (see the problems logged above)")

    caps = {"train": data_cfg.max_train_examples, "validation": data_cfg.max_eval_examples,
            "test": data_cfg.max_eval_examples}
    capped = {}
    for split, cap in caps.items():
        if cap is not None and len(rendered[split]) > int(cap):
            capped[split] = len(rendered[split])
            rendered[split] = rendered[split][: int(cap)]

    counts_train = task.label_counts([row["reference"] for row in rendered["train"]])
    if counts_train is not None:  # the rows trained on, after the length check and the cap
        task.learned["label_counts_train"] = counts_train

    run.data_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_jsonl_atomic(run.split_path(split), rendered[split])
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
        "split_seed": data_cfg.split_seed,
        "splits": counts,
        "capped_from": capped,
        "max_length": max_length,
        "too_long": too_long,
        "length_check": length_check,
        "token_lengths": lengths,
        **task.learned,
    }
    write_json_atomic(run.validation_report_path, report_json)
    log.info("[data] %s: %d usable of %d rows -> train %d, validation %d, test %d", task.name, rows_usable,
             report_json["rows_read"], counts["train"], counts["validation"], counts["test"])
    return {
        **counts,
        "rows_read": report_json["rows_read"],
        "dropped": {k: v for k, v in report.counts.items() if not k.startswith(("too_long_test", "truncated_"))},
        "warnings": warnings,
        "length_check": length_check,
        **task.learned,
        "input_files": report_json["files"],  # fingerprinted by the pipeline: a changed file re-runs the stage
    }


def _dropped_on_read(kind: str) -> bool:
    return not kind.startswith(("duplicate_of_", "too_long_", "truncated_"))
