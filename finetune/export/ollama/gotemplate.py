"""Render an Ollama Modelfile's TEMPLATE with Go's text/template, as the Ollama server would.

template_render.go (standard library only) carries ports of Ollama's Modelfile parser and of the
template execution; it is built once with the `go` tool (Debian: `apt-get install golang-go`) and
the binary is cached under ($FINETUNE_CACHE or ~/.cache/finetune)/bin, keyed by the source's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from finetune.core.cache import cache_root, file_lock
from finetune.core.errors import ExportError
from finetune.core.files import write_text_atomic
from finetune.core.fingerprint import file_sha256
from finetune.core.processes import run_child

SOURCE = Path(__file__).with_name("template_render.go")


def go_available() -> bool:
    return shutil.which("go") is not None


def _built_by_us(binary: Path) -> bool:
    """The cached binary is the one our build wrote: its sha256 matches what the build recorded."""
    record = binary.with_name(binary.name + ".sha256")
    return binary.is_file() and record.is_file() and record.read_text().strip() == file_sha256(binary)


def renderer_binary() -> Path:
    """The built renderer, compiled on first use; rebuilt when the cached file is not what we built."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache_root() / "bin" / f"template_render-{digest}"
    if _built_by_us(binary):
        return binary
    go = shutil.which("go")
    if go is None:
        raise ExportError(
            "checking the Modelfile TEMPLATE needs Go (Ollama renders templates with Go's text/template): "
            "install it (Debian/Ubuntu: `apt-get install golang-go`, or https://go.dev/dl/), "
            "or set export.verify=false to skip the export checks.")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(binary.parent / ".template_render.lock"):
        if _built_by_us(binary):
            return binary
        tmp = binary.parent / f".tmp-{binary.name}-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ)
        env.setdefault("GOCACHE", str(cache_root() / "go-build"))
        env.setdefault("GOPATH", str(cache_root() / "go"))
        env["CGO_ENABLED"] = "0"
        proc = run_child([go, "build", "-o", str(tmp), str(SOURCE)], env=env)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"could not build {SOURCE.name} with {go}:\n{proc.stderr[-3000:]}")
        write_text_atomic(binary.with_name(binary.name + ".sha256"), file_sha256(tmp) + "\n")
        os.replace(tmp, binary)
    return binary


def render_modelfile(modelfile: str, conversations: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """(parsed Modelfile commands [{name, args}], one rendered prompt per conversation)."""
    request = {"modelfile": modelfile,
               "conversations": [[{"role": m["role"], "content": m["content"]} for m in c] for c in conversations]}
    proc = run_child([str(renderer_binary())], input=json.dumps(request))
    if proc.returncode != 0:
        raise ExportError(f"Ollama would reject this Modelfile: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    return out["commands"], out["prompts"]
