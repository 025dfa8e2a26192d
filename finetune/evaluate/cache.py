"""Answers of models that do not change between runs (the base model, comparison models), kept across runs.

Every run evaluates the base model on the same test rows with the same prompt and decoding, and gets the
same greedy answers: about a quarter of the evaluate stage on a CPU, spent again each time. The answers
are cached under a key made of everything they depend on: the model's weight and tokenizer files (their
sha256), the exact prompts, the stop tokens, the decoding settings, the answer grammar, the batch size, the
dtype and thread count, and the versions of torch, transformers and llguidance. Any change is a new key, so
a hit is only ever the answers this evaluation would generate. Scores are always recomputed from them.
Hub models that are not on disk are not cached (no files to fingerprint). `evaluate.cache=false` turns it off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.core.cache import cache_root
from finetune.core.files import write_json_atomic
from finetune.core.fingerprint import data_sha256, paths_sha256
from finetune.runtimes.generation import Generation

log = logging.getLogger("finetune")


def answers_dir() -> Path:
    return cache_root() / "answers"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def answers_key(model_dir: str | Path, settings: dict) -> str | None:
    """The cache key of one generation pass, or None when the model has no local files."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file())
    versions = {d: _version(d) for d in ("torch", "transformers", "llguidance")}
    return data_sha256({"weights": paths_sha256(files, root=path), "versions": versions, **settings})


def load_answers(key: str | None) -> list[Generation] | None:
    if key is None:
        return None
    path = answers_dir() / f"{key}.json"
    try:
        return [Generation(**g) for g in json.loads(path.read_text())["answers"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save_answers(key: str | None, outputs: list[Generation], about: dict[str, Any]) -> None:
    if key is None:
        return
    answers_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(answers_dir() / f"{key}.json",
                      {"about": about, "answers": [dataclasses.asdict(g) for g in outputs]})
