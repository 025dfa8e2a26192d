"""A CRF span tagger: the non-LLM baseline of extraction tasks whose answer values are spans of the input.

    tagger = SpanTagger.fit([(input_text, reference_dict), ...])    # the run's train split
    tagger.predict(text) -> {key: span text} (or {key: [span texts]} for list-valued keys)

The input is split into tokens (runs of word characters, and each other non-space character on its own,
with character offsets), and each reference value (a string, or a list of strings) is located as a run of
whole tokens whose text, normalized as scoring normalizes it (`normalize_value`), equals the value.
Tokens are labelled BIO per key (B-key, I-key, O) and python-crfsuite (the library usaddress's own parser
uses) learns them from the usual word features: the lowercase word, its shape, prefixes and suffixes,
digits, position, whether a space precedes it, and the same of the neighbours at +-1 and +-2.
A training row with a value that is not such a span (a normalized date, tokens picked from two places)
is left out and counted. Predictions are the tagged spans cut from the input: every span of a key that
is a list in the training data, the most probable span (mean marginal) of any other key.

Training is L-BFGS over the rows in their given order: there is no randomness, so the same rows give
the same model and the same answers.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.tasks.base import normalize_text, normalize_value

_TOKEN = re.compile(r"\w+|[^\w\s]")
# L1 + L2 regularisation; on the validation splits of the address and WNUT 2016 tasks c1/c2 between
# 0.0 and 0.2 moved field F1 by under 0.025, and 50 or 200 iterations instead of 100 by under 0.03.
CRF_PARAMS = {"c1": 0.1, "c2": 0.1, "max_iterations": 100, "feature.possible_transitions": True}


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    """Word-character runs and single punctuation characters, with their offsets in text."""
    return [Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _shape(word: str) -> str:
    """Xx for Chicago, d for 62704, dx for 5th: character classes with runs collapsed."""
    classes = ["X" if c.isupper() else "x" if c.isalpha() else "d" if c.isdigit() else c for c in word]
    return "".join(c for i, c in enumerate(classes) if i == 0 or c != classes[i - 1])


def _word_features(text: str, tok: Token, prefix: str) -> list[str]:
    low = tok.text.lower()
    spaced = tok.start == 0 or text[tok.start - 1].isspace()
    return [f"{prefix}w={low}", f"{prefix}shape={_shape(tok.text)}", f"{prefix}spaced={spaced}"]


def token_features(text: str, tokens: list[Token]) -> list[list[str]]:
    """crfsuite's attribute strings for each token of a sequence."""
    n = len(tokens)
    out = []
    for i, tok in enumerate(tokens):
        word, low = tok.text, tok.text.lower()
        feats = ["bias", *_word_features(text, tok, ""),
                 f"p1={low[:1]}", f"p2={low[:2]}", f"p3={low[:3]}",
                 f"s1={low[-1:]}", f"s2={low[-2:]}", f"s3={low[-3:]}",
                 f"len={min(len(word), 8)}", f"digit={word.isdigit()}", f"hasdigit={any(c.isdigit() for c in word)}",
                 f"upper={word.isupper()}", f"title={word.istitle()}", f"alpha={word.isalpha()}",
                 f"quarter={4 * i // n}"]
        if i == 0:
            feats.append("BOS")
        if i == n - 1:
            feats.append("EOS")
        for offset in (-2, -1, 1, 2):
            j = i + offset
            if 0 <= j < n:
                feats += _word_features(text, tokens[j], f"{offset:+d}:")
                if abs(offset) == 1:
                    feats.append(f"{offset:+d}:w|w={tokens[j].text.lower()}|{low}")
        out.append(feats)
    return out


def _items(value: Any) -> list[Any] | None:
    """The values of one key to find in the input; None when one of them cannot be a span."""
    items = value if isinstance(value, list) else [value]
    items = [v for v in items if v is not None and v != ""]
    return items if all(isinstance(v, str) for v in items) else None


def locate_spans(text: str, tokens: list[Token], reference: dict) -> dict[str, list[tuple[int, int]]] | None:
    """{key: [(first token, last token + 1), ...]} of every value, each at its first free occurrence;
    None when some value is not a run of whole tokens of the input (after normalization)."""
    wanted = []
    for key, value in reference.items():
        items = _items(value)
        if items is None:
            return None
        for item in items:
            target = normalize_value(item)
            if target:  # scoring ignores a value that normalizes to nothing
                wanted.append((str(key), target, [normalize_text(t.text) for t in tokenize(target)]))
    # Longest values first, so "Airport" does not take the word a building name "... Airport" needs.
    wanted.sort(key=lambda w: -len(w[2]))
    norm_tokens = [normalize_text(t.text) for t in tokens]
    taken = [False] * len(tokens)
    spans: dict[str, list[tuple[int, int]]] = {}
    for key, target, words in wanted:
        m = len(words)
        for i in range(len(tokens) - m + 1):
            if (norm_tokens[i : i + m] == words and not any(taken[i : i + m])
                    and normalize_value(text[tokens[i].start : tokens[i + m - 1].end]) == target):
                taken[i : i + m] = [True] * m
                spans.setdefault(key, []).append((i, i + m))
                break
        else:
            return None
    return {key: sorted(found) for key, found in spans.items()}


def bio_labels(n: int, spans: dict[str, list[tuple[int, int]]]) -> list[str]:
    labels = ["O"] * n
    for key, key_spans in spans.items():
        for start, end in key_spans:
            labels[start] = f"B-{key}"
            labels[start + 1 : end] = [f"I-{key}"] * (end - start - 1)
    return labels


def decode_spans(labels: list[str]) -> list[tuple[str, int, int]]:
    """(key, first token, last token + 1) of each tagged span; an I- that does not continue its key starts one."""
    spans: list[tuple[str, int, int]] = []
    for i, label in enumerate(labels):
        if label == "O":
            continue
        tag, key = label[0], label[2:]
        if tag == "I" and spans and spans[-1][0] == key and spans[-1][2] == i:
            spans[-1] = (key, spans[-1][1], i + 1)
        else:
            spans.append((key, i, i + 1))
    return spans


@dataclass
class SpanTagger:
    """A trained CRF and what it knows about the keys: which take a list of spans."""

    model: bytes
    list_keys: set[str]
    rows_used: int
    rows_left_out: int
    _tagger: Any = field(default=None, repr=False)

    @classmethod
    def fit(cls, examples: list[tuple[str, dict]]) -> SpanTagger | None:
        """Train on (input, reference) pairs; None when no row has a value that is a span of its input."""
        import pycrfsuite

        trainer = pycrfsuite.Trainer(verbose=False)
        trainer.set_params(CRF_PARAMS)
        used = left_out = with_values = 0
        list_keys: set[str] = set()
        for text, reference in examples:
            list_keys |= {str(k) for k, v in reference.items() if isinstance(v, list)}
            tokens = tokenize(text)
            spans = locate_spans(text, tokens, reference)
            if spans is None:
                left_out += 1
                continue
            if not tokens:
                continue
            used += 1
            with_values += bool(spans)
            trainer.append(token_features(text, tokens), bio_labels(len(tokens), spans))
        if not with_values:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.crfsuite"
            trainer.train(str(path))
            model = path.read_bytes()
        return cls(model, list_keys, used, left_out)

    def _open(self) -> Any:
        if self._tagger is None:
            import pycrfsuite

            self._tagger = pycrfsuite.Tagger()
            self._tagger.open_inmemory(self.model)
        return self._tagger

    def predict(self, text: str) -> dict[str, Any]:
        """{key: span text} ({key: [span texts]} for list-valued keys), keys in order of first appearance."""
        tokens = tokenize(text)
        if not tokens:
            return {}
        tagger = self._open()
        labels = tagger.tag(token_features(text, tokens))
        out: dict[str, Any] = {}
        best: dict[str, float] = {}
        for key, start, end in decode_spans(labels):
            span = text[tokens[start].start : tokens[end - 1].end]
            if key in self.list_keys:
                out.setdefault(key, []).append(span)
                continue
            confidence = sum(tagger.marginal(labels[i], i) for i in range(start, end)) / (end - start)
            if key not in best or confidence > best[key]:
                out[key], best[key] = span, confidence
        return out
