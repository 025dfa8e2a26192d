"""An answer constraint as the grammars and formats that enforce it.

A task's `answer_constraint()` is what a valid answer is, in the task's own terms: a JSON schema dict
(extraction), a list of labels (classification), or None (free text). From it:

    gbnf_grammar(constraint)   the llama.cpp GBNF grammar: what every runtime decodes under
                               (llama.cpp natively, transformers through llguidance)
    ollama_format(constraint)  the JSON schema a user passes as Ollama's `format`

A schema becomes GBNF through llama.cpp's own converter (llama-cpp-python's json_schema_to_gbnf): it
writes optional properties in schema order, allows one optional space where JSON allows whitespace
(so compact and `", "`-separated answers both pass, a pretty-printed one does not), and ends the object
with that optional space, after which only an end-of-turn token is allowed. A label set becomes the
bare label text, as the trained answers write it.
"""

from __future__ import annotations

import json
from typing import Any, Union

Constraint = Union[dict, list, None]  # JSON schema | labels | none

_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (quoted; backslash, quote and control characters escaped)."""
    out = []
    for c in text:
        if c in _GBNF_ESCAPES:
            out.append(_GBNF_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def labels_gbnf(labels: list[str]) -> str:
    """One of the labels, bare: `root ::= "ham" | "spam"`."""
    if not labels:
        raise ValueError("a label grammar needs at least one label")
    return "root ::= " + " | ".join(gbnf_literal(label) for label in labels) + "\n"


def json_schema_gbnf(schema: dict) -> str:
    """llama.cpp's grammar for a JSON schema (the converter llama-cpp-python ships)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


def gbnf_grammar(constraint: Constraint) -> str | None:
    """The GBNF grammar of an answer constraint (None: unconstrained). The one conversion every runtime uses."""
    if constraint is None:
        return None
    if isinstance(constraint, dict):
        return json_schema_gbnf(constraint)
    if isinstance(constraint, (list, tuple)):
        return labels_gbnf([str(label) for label in constraint])
    raise TypeError(f"an answer constraint is a JSON schema dict, a label list or None, not {type(constraint).__name__}")


def ollama_format(constraint: Constraint) -> dict | None:
    """The JSON schema to pass as Ollama's `format`. Ollama constrains to JSON only, so a label set
    becomes a string enum: the answer is then the label in quotes ("spam"), not the bare label."""
    if constraint is None:
        return None
    if isinstance(constraint, dict):
        return constraint
    return {"type": "string", "enum": [str(label) for label in constraint]}


def constraint_kind(constraint: Constraint) -> str:
    """How answers are constrained, in one word for metrics.json and the report."""
    if constraint is None:
        return "none"
    return "json_schema" if isinstance(constraint, dict) else "labels"


def describe(constraint: Any, copies_input: bool = False) -> dict:
    """The constraint as metrics.json records it; `copies_input`: each row's string values were also held
    to pieces of its input (finetune.tasks.copying)."""
    kind = constraint_kind(constraint)
    if kind == "none":
        return {"kind": kind}
    out = {"kind": kind, ("schema" if kind == "json_schema" else "labels"): constraint}
    return {**out, "values_copied_from_input": True} if copies_input else out
