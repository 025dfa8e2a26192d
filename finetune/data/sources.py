"""Reading a task's data: files (JSONL, JSON, CSV, Parquet), folders, or a hub dataset, and turning
each record into an Example of the task, whatever the format (prompt/completion, chat messages,
alpaca, or mapped columns).

Problems that make a whole file unusable raise DataError at once, naming the file and the
(1-based, editor-style) line or row; problems with single rows raise BadExample (from the task or
from here) and are counted by finetune.data.prepare.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.config import PROJECT_ROOT, DataConfig
from finetune.core.errors import DataError
from finetune.tasks import BadExample, Task

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
ROLES = ("system", "user", "assistant")
FORMAT_COLUMNS = {  # what each format needs in every row
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
}


@dataclass
class Record:
    file: str
    row: int  # 1-based line (JSONL, CSV), item (JSON) or row (Parquet)
    data: dict


@dataclass
class Example:
    file: str
    row: int
    input: str  # the raw input (the last user turn when the data gives the prompt as messages)
    prompt: list[dict] | None  # prompt messages given by the data itself (else built from the task)
    reference: Any  # the checked answer (dict for extraction, label, text)
    index: int = 0  # position in the loaded data, for stable ids

    @property
    def key(self) -> str:
        """What "the same input" means for duplicates and for the seeded split."""
        turns = [m for m in self.prompt or [] if m["role"] != "system"]
        if len(turns) > 1:  # a conversation: all of it (a single user turn is just its text)
            return json.dumps(turns, sort_keys=True, ensure_ascii=False)
        return self.input


# ---- files -----------------------------------------------------------------------------


def resolve_path(value: str, what: str) -> Path:
    """A path as given, else relative to the project root (where the bundled data lives)."""
    path = Path(str(value)).expanduser()
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.exists():
            return candidate
    raise DataError(f"{value}: no such file or folder ({what})")


def split_files(folder: Path) -> dict[str, Path]:
    """train.* / validation.* (valid, val, dev) / test.* inside a folder."""
    found = {}
    for split, stems in SPLIT_FILE_NAMES.items():
        for p in sorted(folder.iterdir()):
            if p.suffix in SUPPORTED and p.stem in stems:
                found[split] = p
                break
    return found


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUPPORTED:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUPPORTED)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUPPORTED)
    if not files:
        raise DataError(f"{path}: folder has no data files ({', '.join(SUPPORTED)})")
    return files


def decode_utf8(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
            f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text.removeprefix("\ufeff")


def read_records(path: Path) -> list[Record]:
    """Every record of one file, numbered as an editor would show it."""
    name = str(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
        return [Record(name, i, r) for i, r in enumerate(rows, 1)]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    text = decode_utf8(raw, path)
    if path.suffix == ".jsonl":
        records = []
        # Lines end at "\n" only: str.splitlines() also breaks at U+0085, U+2028 and the like, which JSON
        # writes unescaped inside strings (json.dumps(..., ensure_ascii=False)), and would cut such a row.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    f"every line of a .jsonl file must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(name, lineno, obj))
        return records
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON array of objects (or {{\"data\": [...]}}), got {type(obj).__name__}")
        for i, item in enumerate(obj, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i} of the array is {type(item).__name__}, expected an object")
        return [Record(name, i, item) for i, item in enumerate(obj, 1)]
    # CSV: the row number is the line the record starts on (the header is line 1).
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file (expected a header line)") from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: cannot parse CSV ({exc})") from None
    records, start = [], reader.line_num + 1
    try:
        for values in reader:
            if values:
                data = dict(zip(header, values))
                if len(values) != len(header):
                    data["__csv_error__"] = f"{len(values)} fields, the header has {len(header)}"
                records.append(Record(name, start, data))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: cannot parse CSV ({exc})") from None
    return records


def load_hub(data_cfg: DataConfig) -> dict[str, list[Record]]:
    """Splits of a hub dataset (datasets.load_dataset), for users who are online."""
    name = str(data_cfg.hub_dataset)
    try:
        import datasets

        loaded = datasets.load_dataset(name, data_cfg.hub_config)
    except Exception as exc:  # offline, unknown name, gated...: all end the same way
        raise DataError(
            f"hub dataset {name!r}: cannot load ({type(exc).__name__}: {exc}). Without network access, download "
            f"it elsewhere and point task.data.path at the files (jsonl/json/csv/parquet)."
        ) from None
    out = {}
    for split, ds in loaded.items():
        key = next((s for s, stems in SPLIT_FILE_NAMES.items() if split in stems), None)
        if key:
            out[key] = [Record(f"{name}[{split}]", i, dict(r)) for i, r in enumerate(ds, 1)]
    if "train" not in out:
        raise DataError(f"hub dataset {name!r} has no train split (splits: {list(loaded)})")
    return out


# ---- records -> examples -------------------------------------------------------------------


def detect_format(records: list[Record], data_cfg: DataConfig) -> str:
    fmt = str(data_cfg.format)
    if fmt != "auto":
        return fmt
    columns = set().union(*(r.data.keys() for r in records[:100]))
    if data_cfg.input_column or data_cfg.output_column:
        return "columns"
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"input", "output"} <= columns:
        return "columns"
    raise DataError(
        f"{records[0].file}: cannot tell the data format from its columns {sorted(columns)}. Expected "
        f"'prompt'+'completion', 'messages', 'instruction'+'output' (alpaca) or 'input'+'output'; or set "
        f"task.data.format=columns task.data.input_column=COL task.data.output_column=COL"
    )


def required_columns(fmt: str, data_cfg: DataConfig) -> tuple[str, ...]:
    if fmt == "columns":
        return (str(data_cfg.input_column or "input"), str(data_cfg.output_column or "output"))
    return FORMAT_COLUMNS[fmt]


def check_columns(records: list[Record], fmt: str, data_cfg: DataConfig) -> None:
    """A column that no row has is a fatal error (a typo in the config or the wrong file)."""
    columns = set().union(*(r.data.keys() for r in records)) - {"__csv_error__"}
    missing = [c for c in required_columns(fmt, data_cfg) if c not in columns]
    if missing:
        raise DataError(
            f"{records[0].file}: no column {', '.join(repr(c) for c in missing)} (columns found: {sorted(columns)}); "
            f"format {fmt} needs {list(required_columns(fmt, data_cfg))}"
            + (" - set task.data.input_column / output_column" if fmt == "columns" else "")
        )


def _messages(value: Any, what: str) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise BadExample("wrong_type", f"{what} must be a list of {{role, content}} messages, roles {'/'.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(data: dict, column: str) -> str:
    if column not in data or data[column] is None:
        raise BadExample("missing_field", f"no value for {column!r}")
    if not isinstance(data[column], str):
        raise BadExample("wrong_type", f"{column!r} should be a string, got {type(data[column]).__name__}")
    return data[column]


def _value(data: dict, column: str) -> Any:
    if column not in data or data[column] is None:
        raise BadExample("missing_field", f"no value for {column!r}")
    return data[column]


def to_example(record: Record, fmt: str, task: Task, data_cfg: DataConfig) -> Example:
    """One record as an Example of the task, or BadExample saying what is wrong with it."""
    data = record.data
    if "__csv_error__" in data:
        raise BadExample("malformed_row", data["__csv_error__"])
    prompt = None
    if fmt == "columns":
        in_col, out_col = required_columns(fmt, data_cfg)
        text, answer = _text(data, in_col), _value(data, out_col)
    elif fmt == "alpaca":
        text, answer = _text(data, "instruction"), _value(data, "output")
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadExample("wrong_type", f"'input' should be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            text = f"{text}\n\n{extra}"
    elif fmt == "prompt_completion":
        raw_prompt, completion = _value(data, "prompt"), _value(data, "completion")
        if isinstance(raw_prompt, str):
            text = raw_prompt
        else:
            prompt = _messages(raw_prompt, "'prompt'")
        if isinstance(completion, list):
            turns = _messages(completion, "'completion'")
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise BadExample("wrong_type", "'completion' must be one assistant message")
            completion = turns[0]["content"]
        answer = completion
    elif fmt == "messages":
        turns = _messages(_value(data, "messages"), "'messages'")
        if turns[-1]["role"] != "assistant":
            raise BadExample("wrong_type", "the last message must be the assistant's answer")
        prompt, answer = turns[:-1], turns[-1]["content"]
    else:
        raise DataError(f"unknown data format {fmt!r}; expected auto, {', '.join([*FORMAT_COLUMNS, 'columns'])}")

    if prompt is not None:
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users:
            raise BadExample("wrong_type", "the prompt has no user message")
        text = users[-1]
        if task.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": task.system_prompt}, *prompt]
    if not text.strip():
        raise BadExample("empty", "empty input")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadExample("empty", "empty answer")
    return Example(record.file, record.row, text, prompt, task.check_output(answer))
