"""Extraction: the answer is one JSON object whose keys come from a fixed field list.

Parsing is forgiving: the first JSON object in the answer counts, inside ```json fences or with text
around it, and a trailing comma before } or ] is tolerated. Scoring is strict:
- an answer is a multiset of (key, value) pairs: one per key, except that a list value gives one pair
  per item ({"person": ["Ann", "Bob"]} is two pairs, in any order; an item listed twice counts twice);
- a pair is correct when its key and its normalized value both match a reference pair (text is NFKC,
  case-folded, whitespace collapsed, edge spaces/commas/semicolons stripped; other values compared
  as canonical JSON); null or empty values and list items mean "absent";
- field_precision / field_recall / field_f1 are micro-averaged over all pairs; a key outside the
  field list is a wrong pair; an unparseable answer has no pairs;
- exact_match: the answer's pairs equal the reference's; json_valid_rate: the forgiving parse found
  an object; json_strict_rate: the whole answer is exactly one JSON object;
- f1_<field>: F1 over that field's pairs alone, for each field of the list the rows expect or the answers
  write (the report's per-field table, beside the training answers that hold the field).
Baselines: `crf` (the default), a CRF tagger of the answer's spans trained on the train split
(finetune.tasks.crf); `usaddress`, usaddress's own parser, for US addresses.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import Counter
from typing import Any

from finetune.core.config import TaskConfig
from finetune.core.errors import ConfigError
from finetune.tasks.base import BadExample, Task, f1, normalize_value, strip_fences
from finetune.tasks.copying import AUTO_SHARE, copied_share, with_copy_patterns
from finetune.tasks.crf import SpanTagger

log = logging.getLogger("finetune")

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


def _absent(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def field_pairs(obj: dict | None) -> Counter[tuple[str, str]]:
    """The multiset {(key, normalized value): count} of an answer: one pair per list item."""
    pairs: Counter[tuple[str, str]] = Counter()
    for key, value in (obj or {}).items():
        for item in value if isinstance(value, list) else [value]:
            norm = "" if _absent(item) else normalize_value(item)
            if norm:
                pairs[(str(key), norm)] += 1
    return pairs


def group_tokens(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """[(token, label), ...] -> {label: tokens joined by spaces}, the way the bundled data is built."""
    grouped: dict[str, list[str]] = {}
    for token, label in pairs:
        grouped.setdefault(label, []).append(token)
    out = {label: " ".join(tokens).strip(" ,;") for label, tokens in grouped.items()}
    return {k: v for k, v in out.items() if v}


def key_order(answers: list[dict]) -> list[str]:
    """One key order for all answers that puts few key pairs of the answers out of their written order
    (each answer's keys as the data writes them, e.g. in reading order): no single key can move to a place
    that breaks fewer. Answers with a consistent order give exactly that order (a topological sort, ties in
    order of first appearance); when they disagree (usaddress's "Second Floor" against "Floor 2", a recipient before or after the street),
    the topological pass settles cycles by the majority and single keys are then moved to the place that
    breaks fewer pairs, until no move helps: a majority vote per cycle alone put a street's name before its
    direction on the bundled addresses in reading order (996 answers of 1,488 out of order, against 168)."""
    first_seen: dict[str, int] = {}
    before: dict[tuple[str, str], int] = {}
    for answer in answers:
        keys = list(answer)
        for i, a in enumerate(keys):
            first_seen.setdefault(a, len(first_seen))
            for b in keys[i + 1 :]:
                before[a, b] = before.get((a, b), 0) + 1
    remaining, order = sorted(first_seen, key=first_seen.get), []
    while remaining:
        def margin(k: str) -> int:
            return sum(before.get((k, o), 0) - before.get((o, k), 0) for o in remaining)

        free = [k for k in remaining if all(before.get((o, k), 0) <= before.get((k, o), 0) for o in remaining)]
        pick = free[0] if free else max(remaining, key=lambda k: (margin(k), -first_seen[k]))
        order.append(pick)
        remaining.remove(pick)

    moved = True
    while moved:  # each move strictly lowers the pairs broken, so this ends
        moved = False
        for key in list(order):
            rest = [k for k in order if k != key]
            broken = [sum(before.get((o, key), 0) for o in rest)]  # key at place j: pairs it breaks
            for o in rest:
                broken.append(broken[-1] + before.get((key, o), 0) - before.get((o, key), 0))
            j = min(range(len(broken)), key=broken.__getitem__)
            if broken[j] < broken[order.index(key)]:
                order, moved = rest[:j] + [key] + rest[j:], True
    return order


def value_types(answers: list[dict]) -> dict[str, dict]:
    """The JSON schema type of each key's values in the answers ({"type": "string"}, an array of strings, ...),
    so the answer constraint admits what the data holds (a list of entity spans, a number)."""
    seen: dict[str, set[str]] = {}
    items: dict[str, set[str]] = {}
    for answer in answers:
        for key, value in answer.items():
            if value is None:
                continue
            seen.setdefault(key, set()).add(_json_type(value))
            if isinstance(value, list):
                items.setdefault(key, set()).update(_json_type(v) for v in value)
    out = {}
    for key, kinds in seen.items():
        if kinds == {"integer", "number"}:
            kinds = {"number"}
        kind = next(iter(kinds)) if len(kinds) == 1 else sorted(kinds)
        prop: dict[str, Any] = {"type": kind}
        if "array" in kinds:
            item_kinds = items.get(key) or {"string"}
            prop["items"] = {"type": next(iter(item_kinds)) if len(item_kinds) == 1 else sorted(item_kinds)}
        out[key] = prop
    return out


def _json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if name in ("integer", "number") and isinstance(value, bool):
            continue
        if isinstance(value, _JSON_TYPES[name]):
            return name
    return "string"


class ExtractionTask(Task):
    kind = "extraction"
    headline_metric = "field_f1"
    specialists = ("crf", "usaddress")
    baseline_notes = {
        "crf": "a CRF tagger of the answer's spans (python-crfsuite)",
        "usaddress": "usaddress's own CRF parser, trained by its authors on their labelled addresses, which are the "
                     "bundled address task's data: on that task it was trained on these very rows, an upper bound "
                     "rather than a fair baseline",
    }

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.schema = copy.deepcopy(dict(cfg.json_schema or {}))  # learn_from_train adds learned types
        properties = (self.schema or {}).get("properties") or {}
        # The allowed keys. Empty: any key, and the list is learned from the training split (learn_from_train).
        self.fields = [str(f) for f in (cfg.fields or [])] or list(properties)
        self.fields_given = bool(self.fields)
        self.types = {k: v.get("type") for k, v in properties.items() if isinstance(v, dict) and v.get("type")}
        # Values copied from the input (finetune.tasks.copying): None until learn_from_train decides it.
        self.copy_values: bool | None = cfg.copy_values

    @property
    def per_input(self) -> bool:
        return bool(self.copy_values)

    def learn_from_train(self, train_references: list[dict], train_inputs: list[str | None] | None = None) -> dict:
        """Answers keep the key order of the user's data: the field list is put in the order the training
        answers write their keys (not the order task.fields lists them), and inferred from them when
        task.fields is empty. Values are held to copies of the input (copy_values) when task.copy_values
        says so or, unset, when at least copying.AUTO_SHARE of the training answers copy their inputs.
        What was decided goes into the data stage's report."""
        order = key_order(train_references)
        unseen = [k for k in self.fields if k not in order]  # allowed, never in a training answer
        if self.fields_given:
            order = [k for k in order if k in self.fields] + unseen
        if not order:
            raise ConfigError(f"task {self.name} (kind extraction): no training answer has any key, so there is "
                              f"no field list to learn; set task.fields=[key1,key2,...] or check the data")
        self.fields = order
        learned_types = {k: t for k, t in value_types(train_references).items() if k not in self.types}
        self.types.update({k: t["type"] for k, t in learned_types.items()})
        self.schema.setdefault("properties", {})
        for key, prop in learned_types.items():
            self.schema["properties"].setdefault(key, prop)
        pairs = [(x, r) for x, r in zip(train_inputs or [], train_references) if isinstance(x, str)]
        share, counted = copied_share([x for x, _ in pairs], [r for _, r in pairs])
        if self.copy_values is None:
            self.copy_values = counted > 0 and share >= AUTO_SHARE
        self.learned = {"fields": order, "field_types": learned_types, "fields_from": "task.fields, in the data's key order" if self.fields_given
                else "the training answers (task.fields empty)", "fields_never_in_training": unseen,
                "copy_values": self.copy_values, "values_copied_share": round(share, 4),
                "values_copied_from": "task.copy_values" if self.cfg.copy_values is not None else
                f"the training answers ({counted} with string values; on from {AUTO_SHARE:.0%})"}
        return self.learned

    def label_counts(self, references: list) -> dict[str, int]:
        counts = Counter(k for r in references if isinstance(r, dict) for k, v in r.items() if not _absent(v))
        return {k: counts.get(k, 0) for k in self.fields}

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
        if self.fields_given and extra:
            raise BadExample("unknown_keys", f"keys {extra} are not among the task's fields {self.fields}")
        for key, expected in self.types.items():
            if key in value and value[key] is not None and not _type_ok(value[key], expected):
                raise BadExample("wrong_type", f"field {key!r} should be {expected}, got {type(value[key]).__name__}")
        return {str(k): v for k, v in value.items()}  # the data's own key order, which learn_from_train reads

    def answer_text(self, reference: dict) -> str:
        """Compact JSON, keys in the task's field order (learned from the training answers)."""
        rank = {k: i for i, k in enumerate(self.fields)}
        ordered = dict(sorted(reference.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))

    def answer_constraint(self, text: str | None = None) -> dict:
        """The JSON schema of an answer: every field optional, in the task's field order (the order the
        trained answers write, and the order llama.cpp's schema grammar allows them in), no other keys.
        Value types come from task.json_schema where it gives them, else string; an array holds strings
        unless the schema says what its items are. With copy_values and the input `text`, every string
        value must be pieces of that text (finetune.tasks.copying)."""
        declared = self.schema.get("properties") or {}
        properties = {}
        for key in self.fields:
            kind = self.types.get(key, "string")
            prop: dict[str, Any] = {"type": kind}
            if kind == "array" or (isinstance(kind, list) and "array" in kind):
                items = declared[key].get("items") if isinstance(declared.get(key), dict) else None
                prop["items"] = items if isinstance(items, dict) else {"type": "string"}
            properties[key] = prop
        schema = {"type": "object", "properties": properties, "additionalProperties": False}
        return with_copy_patterns(schema, text) if self.copy_values and text is not None else schema

    # ---- answers ----------------------------------------------------------------------
    def parse(self, text: str) -> dict | None:
        return parse_json_object(text or "")

    def score(self, references: list, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
        if len(references) != len(outputs):
            raise ValueError(f"{len(references)} references but {len(outputs)} outputs")
        tp = fp = fn = exact = valid = strict = 0
        per_key: dict[str, list[int]] = {k: [0, 0, 0] for k in self.fields}  # tp, fp, fn of each field's pairs
        rows = []
        for reference, output in zip(references, outputs):
            parsed = self.parse(output)
            pred, ref = field_pairs(parsed), field_pairs(reference)
            right, extra, missed = pred & ref, pred - ref, ref - pred
            for slot, pairs in enumerate((right, extra, missed)):
                for (key, _), count in pairs.items():
                    if key in per_key:
                        per_key[key][slot] += count
            hits, wrong, lost = (sum(pairs.values()) for pairs in (right, extra, missed))
            tp, fp, fn = tp + hits, fp + wrong, fn + lost
            correct = parsed is not None and pred == ref
            exact += correct
            valid += parsed is not None
            strict += _is_strict_json_object(output)
            rows.append({"parsed": parsed, "correct": correct, "json_valid": parsed is not None,
                         "tp": hits, "fp": wrong, "fn": lost})
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
        # F1 of each field over its own pairs, for the fields these rows expect or the answers wrote
        metrics.update({f"f1_{k}": 2 * t / (2 * t + p + m) for k, (t, p, m) in per_key.items() if t + p + m})
        return metrics, rows

    def headline(self, references: list, scored: list[dict]) -> float:
        """Field F1 pooled over the rows' field counts (as `score`)."""
        tp, fp, fn = (sum(row[k] for row in scored) for k in ("tp", "fp", "fn"))
        return f1(tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0)

    # ---- baselines --------------------------------------------------------------------
    def baseline(self, name: str, train_rows: list[dict], test_rows: list[dict]) -> tuple[list[str], dict] | None:
        """crf: a CRF tagger of the answer's spans, trained on train_rows (None when the answers are not
        spans of the inputs); usaddress: usaddress's own parser. Answers in the task's JSON format."""
        if name == "crf":
            return self._crf(train_rows, test_rows)
        if name == "usaddress":
            import usaddress

            outputs = []
            for row in test_rows:
                fields = group_tokens(usaddress.parse(self.input_of(row)))
                outputs.append(self.answer_text({k: v for k, v in fields.items() if k in self.fields}))
            return outputs, {}
        return super().baseline(name, train_rows, test_rows)

    def _crf(self, train_rows: list[dict], test_rows: list[dict]) -> tuple[list[str], dict] | None:
        examples = [(self.input_of(r), r["reference"]) for r in train_rows]
        tagger = SpanTagger.fit(examples)
        with_values = sum(bool(field_pairs(ref)) for _, ref in examples)
        # Mostly values that are not spans (normalized dates, computed numbers): no CRF can tag them.
        if tagger is None or tagger.rows_left_out * 2 > with_values:
            left_out = tagger.rows_left_out if tagger else with_values
            log.warning("[evaluate] baseline crf skipped: %d of %d training answers with values are not spans "
                        "of their input", left_out, with_values)
            return None
        outputs = []
        for row in test_rows:
            answer = tagger.predict(self.input_of(row))
            outputs.append(self.answer_text({k: v for k, v in answer.items() if k in self.fields}))
        return outputs, {"train_rows": tagger.rows_used, "train_rows_left_out": tagger.rows_left_out}


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
