"""Values copied from the input: the per-row answer constraint of span extraction.

Where an extraction task's answers copy their values out of the input (an address split into its parts,
the entities of a sentence), a value that is not made of the input's words is always wrong: a misspelled
copy ("Brockwood" for "Brookwood"), a word the input does not have. The task's schema then gets, for the
row at hand, a JSON-schema `pattern` on every string value (through one `$defs` entry): one or more of
the input's pieces (the tokens of finetune.tasks.crf: runs of word characters, and each other non-space
character), written together or after a single space, two words never touching (copy_pattern). A
pattern is standard JSON schema, so the same per-row schema holds in every runtime that takes one:
llama.cpp's grammar (through its own converter), llguidance in transformers, Ollama's `format`,
OpenAI-style `response_format`.

Pieces are matched as written (case included): the model copies, it does not re-case. Pieces holding a
quote, a backslash or a control character (inside a JSON string they need escapes, which a pattern over the
decoded string cannot say) or a caret (llama.cpp's converter has no spelling of it) are left out; a value
holding one cannot be written under the constraint, which the share of training values that fit
(`copied_share`, the data stage's report) makes visible.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from finetune.tasks.crf import tokenize

# The least share of training answers that must fit their rows' patterns for the constraint to be turned
# on by itself (task.copy_values unset): one answer in 50 may be a normalized value the model must write.
AUTO_SHARE = 0.98
# How a regex character is written so that llama.cpp's schema converter (which keeps "\." and "\$" as GBNF
# escapes that no grammar parser takes) and every regex engine read it as itself: escaped, or in a class.
_ESCAPED = set("[]()|{}*+?")
_IN_CLASS = set(".$")
_LEFT_OUT = set('"\\^')  # JSON escapes a pattern cannot say; "^" has no spelling the converter keeps
_WORD = re.compile(r"\w+")


def pieces(text: str) -> list[str]:
    """The distinct pieces of `text` a copied value is made of, in order of first appearance."""
    seen: dict[str, None] = {}
    for token in tokenize(text):
        piece = token.text
        if any(c in _LEFT_OUT or ord(c) < 0x20 or ord(c) == 0x7F for c in piece):
            continue
        seen.setdefault(piece, None)
    return list(seen)


def _escape(piece: str) -> str:
    return "".join("\\" + c if c in _ESCAPED else f"[{c}]" if c in _IN_CLASS else c for c in piece)


def copy_pattern(text: str) -> str | None:
    """The anchored regex of a value copied from `text` (None when the text has no piece): chunks separated
    by single spaces, a chunk being pieces written together where no two words touch ("S.", "#4", "1/2",
    "(rear)", but not "LakeShore"): `^C( C)*$` with C = `((P|WP)+W?|W)`, W and P the alternations of the
    text's words and other pieces (C = W when it has no other piece)."""
    found = pieces(text)
    if not found:
        return None
    words = [p for p in found if _WORD.fullmatch(p)]
    marks = [p for p in found if not _WORD.fullmatch(p)]
    w = "(" + "|".join(_escape(p) for p in words) + ")" if words else None
    p = "(" + "|".join(_escape(p) for p in marks) + ")" if marks else None
    if w and p:
        chunk = f"(({p}|{w}{p})+{w}?|{w})"
    else:
        chunk = w or f"{p}+"
    return f"^{chunk}( {chunk})*$"


def _string_values(value: Any) -> list[str] | None:
    """The strings of one answer value (a string, or a list of them); None for any other value."""
    items = value if isinstance(value, list) else [value]
    items = [v for v in items if v is not None]
    return items if all(isinstance(v, str) for v in items) else None


def fits(text: str, answer: dict) -> bool:
    """Whether every string value of `answer` (or string item of a list value) is a copy of `text`'s
    pieces, as copy_pattern allows (an empty string never is; a non-string value is not checked)."""
    pattern = copy_pattern(text)
    for value in answer.values():
        strings = _string_values(value)
        for s in strings or []:
            if pattern is None or not re.fullmatch(pattern, s):
                return False
    return True


def copied_share(inputs: list[str], answers: list[dict]) -> tuple[float, int]:
    """(share of the answers with a string value whose string values all fit, how many such answers)."""
    counted = [(text, answer) for text, answer in zip(inputs, answers)
               if any(_string_values(v) for v in answer.values())]
    if not counted:
        return 0.0, 0
    return sum(fits(text, answer) for text, answer in counted) / len(counted), len(counted)


COPIED = "copied"  # the schema's $defs entry of a copied string
_PLAIN = {"type", "description", "title"}


def with_copy_patterns(schema: dict, text: str) -> dict:
    """A copy of an answer schema whose string values (and string items of arrays) must copy `text`: each
    refers to one `$defs` string with the pattern, so converters turn the pattern into grammar once (with
    29 address fields, a 24 kB grammar and 15 ms per row inline; a twenty-ninth of the rules this way)."""
    pattern = copy_pattern(text)
    out = copy.deepcopy(schema)
    if pattern is None:
        return out
    ref = {"$ref": f"#/$defs/{COPIED}"}

    def constrain(prop: Any) -> Any:
        if not isinstance(prop, dict):
            return prop
        if prop.get("type") == "string" and set(prop) <= _PLAIN:  # an enum, a format, a pattern: kept as given
            return {**{k: v for k, v in prop.items() if k != "type"}, **ref}
        if prop.get("type") == "array":
            return {**prop, "items": constrain(prop.get("items"))}
        return prop

    properties = out.get("properties") or {}
    for key, prop in properties.items():
        properties[key] = constrain(prop)
    out["$defs"] = {**(out.get("$defs") or {}), COPIED: {"type": "string", "pattern": pattern}}
    return out
