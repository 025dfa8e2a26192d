"""Extraction: the answer is one JSON object whose keys come from a fixed field list.

Parsing is forgiving: the first JSON object in the answer counts, inside ```json fences or with text
around it, and a trailing comma before } or ] is tolerated. Scoring is strict:
- a field is correct when its key and its normalized value both match the reference (values are
  NFKC, case-folded, whitespace collapsed, edge spaces/commas/semicolons stripped; non-string values
  compared as canonical JSON); null or empty values mean "field absent";
- field_precision / field_recall / field_f1 are micro-averaged over all (key, value) pairs;
  a key outside the field list is a wrong pair; an unparseable answer has no pairs;
- exact_match: the answer's pairs equal the reference's; json_valid_rate: the forgiving parse found
  an object; json_strict_rate: the whole answer is exactly one JSON object.
"""

from __future__ import annotations

import json
import re
from typing import Any

from finetune.core.config import TaskConfig
from finetune.core.errors import ConfigError
from finetune.tasks.base import BadExample, Task, f1, normalize_text, strip_fences

_DECODER = json.JSONDecoder()
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_JSON_TYPES = {
    "string": str,
    "number": (int, float),
    "integer": int,
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in text (fenced or not, with stray text around it), or None."""
    for candidate in dict.fromkeys([strip_fences(text), text]):
        for start in [m.start() for m in re.finditer(r"\{", candidate)][:50]:
            for attempt in (candidate[start:], _TRAILING_COMMA.sub(r"\1", candidate[start:])):
                try:
                    obj, _ = _DECODER.raw_decode(attempt)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    return obj
    return None


def normalize_value(value: Any) -> str:
    if isinstance(value, str):
        return normalize_text(value).strip(" ,;")
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def field_pairs(obj: dict | None) -> set[tuple[str, str]]:
    """{(key, normalized value)} of an answer; null/empty values count as absent."""
    if not obj:
        return set()
    pairs = set()
    for key, value in obj.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        norm = normalize_value(value)
        if norm:
            pairs.add((str(key), norm))
    return pairs


def group_tokens(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """[(token, label), ...] -> {label: tokens joined by spaces}, the way the bundled data is built."""
    grouped: dict[str, list[str]] = {}
    for token, label in pairs:
        grouped.setdefault(label, []).append(token)
    out = {label: " ".join(tokens).strip(" ,;") for label, tokens in grouped.items()}
    return {k: v for k, v in out.items() if v}


class ExtractionTask(Task):
    kind = "extraction"
    headline_metric = "field_f1"
    specialists = ("none", "usaddress")  # no generic extraction baseline; usaddress for US addresses

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.schema = dict(cfg.json_schema or {})
        properties = (self.schema or {}).get("properties") or {}
        self.fields = [str(f) for f in (cfg.fields or [])] or list(properties)
        if not self.fields:
            raise ConfigError(
                f"task {self.name} (kind extraction) has no field list: set task.fields=[key1,key2,...] or "
                f"task.json_schema with 'properties' (conf/task/{self.name}.yaml)"
            )
        self.types = {k: v.get("type") for k, v in properties.items() if isinstance(v, dict) and v.get("type")}

    # ---- data -------------------------------------------------------------------------
    def check_output(self, value: Any) -> dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BadExample("invalid_json", f"answer is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise BadExample("invalid_json", f"answer must be a JSON object, got {type(value).__name__}")
        extra = [k for k in value if k not in self.fields]
        if extra:
            raise BadExample("unknown_keys", f"keys {extra} are not among the task's fields {self.fields}")
        for key, expected in self.types.items():
            if key in value and value[key] is not None and not _type_ok(value[key], expected):
                raise BadExample("wrong_type", f"field {key!r} should be {expected}, got {type(value[key]).__name__}")
        return {k: value[k] for k in self.fields if k in value}

    def answer_text(self, reference: dict) -> str:
        """Compact JSON, keys in the task's field order."""
        ordered = {k: reference[k] for k in self.fields if k in reference}
        return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))

    def answer_constraint(self) -> dict:
        """The JSON schema of an answer: every field optional, in the task's field order (the order the
        trained answers write, and the order llama.cpp's schema grammar allows them in), no other keys.
        Value types come from task.json_schema where it gives them, else string; an array holds strings
        unless the schema says what its items are."""
        declared = self.schema.get("properties") or {}
        properties = {}
        for key in self.fields:
            kind = self.types.get(key, "string")
            prop: dict[str, Any] = {"type": kind}
            if kind == "array" or (isinstance(kind, list) and "array" in kind):
                items = declared[key].get("items") if isinstance(declared.get(key), dict) else None
                prop["items"] = items if isinstance(items, dict) else {"type": "string"}
            properties[key] = prop
        return {"type": "object", "properties": properties, "additionalProperties": False}

    # ---- answers ----------------------------------------------------------------------
    def parse(self, text: str) -> dict | None:
        return parse_json_object(text or "")

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        if len(references) != len(outputs):
            raise ValueError(f"{len(references)} references but {len(outputs)} outputs")
        tp = fp = fn = exact = valid = strict = 0
        rows = []
        for reference, output in zip(references, outputs):
            parsed = self.parse(output)
            pred, ref = field_pairs(parsed), field_pairs(reference)
            hits = len(pred & ref)
            tp, fp, fn = tp + hits, fp + len(pred) - hits, fn + len(ref) - hits
            correct = parsed is not None and pred == ref
            exact += correct
            valid += parsed is not None
            strict += _is_strict_json_object(output)
            rows.append({"parsed": parsed, "correct": correct, "json_valid": parsed is not None,
                         "tp": hits, "fp": len(pred) - hits, "fn": len(ref) - hits})
        n = len(outputs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        metrics = {
            "n": n,
            "field_f1": f1(precision, recall),
            "field_precision": precision,
            "field_recall": recall,
            "exact_match": exact / n if n else 0.0,
            "json_valid_rate": valid / n if n else 0.0,
            "json_strict_rate": strict / n if n else 0.0,
        }
        return metrics, rows

    # ---- baseline -----------------------------------------------------------------------
    def specialist_baseline(self, train_rows: list[dict], test_rows: list[dict]) -> list[str] | None:
        """usaddress's own CRF tagger (task.specialist=usaddress), answers in the same JSON format.

        usaddress's model was trained on the same labeled.xml the bundled data comes from, test split
        included, so this baseline is optimistic.
        """
        if self.specialist != "usaddress":
            return None
        import usaddress

        outputs = []
        for row in test_rows:
            fields = group_tokens(usaddress.parse(self.input_of(row)))
            outputs.append(self.answer_text({k: v for k, v in fields.items() if k in self.fields}))
        return outputs


def _type_ok(value: Any, expected: Any) -> bool:
    names = expected if isinstance(expected, list) else [expected]
    for name in names:
        py = _JSON_TYPES.get(name)
        if py is None:
            return True  # a type we do not know: do not reject
        if isinstance(value, bool) and name in ("number", "integer"):
            continue
        if isinstance(value, py):
            return True
    return False


def _is_strict_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, TypeError):
        return False
