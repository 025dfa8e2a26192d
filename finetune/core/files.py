"""Write-then-rename: a file or folder is visible under its final name only once complete.

Everything in progress lives in a sibling whose name starts with `.tmp-` and ends with a random part (two
processes never share a temporary name); a crash leaves only such names behind, and the next run of the
stage removes them before it starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from finetune.core import interrupts

log = logging.getLogger("finetune")

TMP_PREFIX = ".tmp-"


def clean_stale(parent: Path, name: str = "") -> list[str]:
    """Remove leftovers `parent/.tmp-<name>*` of an interrupted earlier run; returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in sorted(parent.glob(f"{TMP_PREFIX}{name}*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("removed %d unfinished file(s) of an earlier run in %s: %s", len(removed), parent, removed)
    return removed


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an older `dst` (never leaving a mix)."""
    if dst.exists():
        old = dst.parent / f"{TMP_PREFIX}{dst.name}-old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory; when the block succeeds it becomes `final`, else it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent, final.name + "-")
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact is not
    try:
        yield tmp
        interrupts.check()  # an interrupt some library swallowed inside the block: nothing becomes final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_name(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` in full, or is left as it was."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=str, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    write_text_atomic(path, "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows))


def dir_size(path: Path) -> int:
    """Bytes of every file under `path` (or of `path` itself when it is a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
