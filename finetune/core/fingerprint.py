"""Content fingerprints: what a stage read and wrote, so a finished stage stays "done" only while its
inputs and outputs are what they were when it finished."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from finetune.core.files import TMP_PREFIX

_CHUNK = 1 << 20
# (path, size, mtime_ns) -> sha256: a run hashes each large artifact once, however many stages read it.
_FILE_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _FILE_CACHE[key] = h.hexdigest()
    return _FILE_CACHE[key]


def paths_sha256(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hash over files and folders (every file below them, by name and content); a missing path
    counts as missing, so deleting an output changes the hash."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            name = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f)
            parts = f.relative_to(path.parent).parts
            if any(part.startswith(TMP_PREFIX) or part == "__pycache__" for part in parts):
                continue  # unfinished writes and Python's byte-code caches are not content
            digest = file_sha256(f) if f.is_file() else "missing"
            h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def data_sha256(obj: Any) -> str:
    """Hash of JSON-able data (config subtrees), independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
