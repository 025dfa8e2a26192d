"""Ollama stage: a Modelfile next to every GGUF (FROM, TEMPLATE, SYSTEM, stop tokens, parameters).

Before a Modelfile gets its final name it is parsed and rendered the way Ollama does (Go, see
template_render.go) for sample conversations, and the result must equal the model's own chat
template, as text and as token ids; the GGUF then answers the task prompt and must stop at the end
of its turn with the Modelfile's stop list.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import ExportError
from finetune.core.files import TMP_PREFIX, clean_stale
from finetune.core.rundir import RunDir, comment_safe, ollama_model_name, quant_of
from finetune.data.rows import context_size
from finetune.export.ollama.checks import check_rendering, check_stops
from finetune.export.ollama.gotemplate import render_modelfile
from finetune.export.ollama.template import ollama_template
from finetune.export.ollama.usage import modelfile_comment, write_constraint_files
from finetune.export.samples import sample_conversations
from finetune.models.loading import saved_tokenizer
from finetune.runtimes.llamacpp import gguf_adds_bos, open_gguf, served_tokens

log = logging.getLogger("finetune")

# Go's unicode.IsSpace, which Ollama's parser trims values with.
_GO_SPACE = " \t\n\v\f\r\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"


def modelfile_quote(value: str) -> str | None:
    """`value` written so that Ollama's Modelfile parser reads back exactly `value`; None if impossible.

    The parser has no escapes: a value is bare, "..." or \"\"\"...\"\"\", and ends at the first line
    break where what was read so far (right-trimmed) is a complete quote. Non-printable characters
    are dropped. So a value is unrepresentable when it has non-printable characters, or when one of
    its lines (not the last) ends with three double quotes.
    """
    if any(not (c.isprintable() or c in "\t\n\r") for c in value):
        return None
    if value and not any(c in value for c in " \t\n\r") and not value.startswith('"'):
        return value
    if "\n" not in value and "\r" not in value and not value.startswith('""'):
        return f'"{value}"'
    for i, c in enumerate(value):
        if c in "\r\n":
            read = ('"""' + value[:i]).rstrip(_GO_SPACE)
            if len(read) >= 6 and read.endswith('"""'):
                return None
    return f'"""{value}"""'


def _quoted(what: str, value: str) -> str:
    q = modelfile_quote(value)
    if q is None:
        raise ExportError(f"{what} {value!r} cannot be written in an Ollama Modelfile")
    return q


def ollama_name(cfg: Config, quant: str) -> str:
    return ollama_model_name(cfg.model.name, cfg.task.name, quant)


def modelfile_text(cfg: Config, tokenizer: Any, gguf: Path, system: str, bos_added: bool = True,
                   run: RunDir | None = None) -> str:
    """The Modelfile for `gguf`. A system prompt that no Modelfile quoting can carry goes into the
    TEMPLATE instead, as its default system prompt (a Go string literal). `bos_added`: whether
    llama.cpp adds BOS when tokenizing for this GGUF."""
    ocfg = cfg.export.ollama
    system_line = modelfile_quote(system) if system else None
    template = ollama_template(tokenizer, cfg.model, default_system=system if system and system_line is None else None,
                               bos_added=bos_added)
    lines = [
        comment_safe(f"# {cfg.model.name} ({cfg.model.hub_id}) fine-tuned for {cfg.task.name}, {quant_of(gguf)}; "
                     f"written by finetune."),
        comment_safe(f"# ollama create {shlex.quote(ollama_name(cfg, quant_of(gguf)))} -f "
                     f"{shlex.quote(gguf.parent.name + '/Modelfile.' + quant_of(gguf))}"),
        *[comment_safe(f"# {line}") for line in modelfile_comment(cfg, quant_of(gguf), run)],
        f"FROM {_quoted('FROM', './' + gguf.name)}",
        f"TEMPLATE {_quoted('TEMPLATE', template)}",
    ]
    if system_line is not None:
        lines.append(f"SYSTEM {system_line}")
    elif system:
        lines.insert(2, "# The system prompt cannot be quoted in a Modelfile; the TEMPLATE carries it as its default.")
    lines += [f"PARAMETER stop {_quoted('stop token', s)}" for s in cfg.model.stop_tokens]
    lines += [f"PARAMETER num_ctx {context_size(cfg, run)}", f"PARAMETER temperature {ocfg.temperature:g}"]
    return "\n".join(lines) + "\n"


def _check_commands(cfg: Config, commands: list[dict], gguf: Path, system: str, where: str, num_ctx: int) -> None:
    """What Ollama parses out of the Modelfile is what we meant to write."""
    def values(name: str) -> list[str]:
        return [c["args"] for c in commands if c["name"] == name]

    want = {"model": ["./" + gguf.name], "stop": list(cfg.model.stop_tokens),
            "num_ctx": [str(num_ctx)]}
    if system and values("system"):
        want["system"] = [system]
    for name, expected in want.items():
        if values(name) != expected:
            raise ExportError(f"{where}: Ollama would read {name} = {values(name)!r}, expected {expected!r}")


def verify_modelfile(cfg: Config, run: RunDir, tokenizer: Any, gguf: Path, text: str, system: str,
                     bos_added: bool) -> dict:
    where = f"Modelfile for {gguf.name}"
    convs = sample_conversations(cfg, run)
    no_system_text = modelfile_text(cfg, tokenizer, gguf, "", bos_added, run)
    with_sys = [c for c in convs if c[2]]
    without = [c for c in convs if not c[2]]
    commands, prompts = render_modelfile(text, [c[1] for c in with_sys])
    _, prompts_no_sys = render_modelfile(no_system_text, [c[1] for c in without])
    num_ctx = context_size(cfg, run)
    _check_commands(cfg, commands, gguf, system, where, num_ctx)
    stops = [c["args"] for c in commands if c["name"] == "stop"]
    checks = []
    with open_gguf(gguf, n_ctx=num_ctx, n_threads=cfg.evaluate.n_threads) as llm:
        if gguf_adds_bos(llm) != bos_added:
            raise ExportError(f"{where}: llama.cpp's BOS setting changed while checking")
        for (name, conv, _), rendered in zip(with_sys, prompts):
            effective = conv if (conv and conv[0]["role"] == "system") or not system else (
                [{"role": "system", "content": system}] + conv)
            checks.append(check_rendering(cfg, tokenizer, llm, name, effective, rendered, bos_added, where))
        for (name, conv, _), rendered in zip(without, prompts_no_sys):
            checks.append(check_rendering(cfg, tokenizer, llm, name, conv, rendered, bos_added,
                                          where + " (without SYSTEM)"))
        task_prompt = (prompts + prompts_no_sys)[0]
        generation = check_stops(cfg, llm, served_tokens(llm, task_prompt), stops, where)
    return {"conversations": checks, "stop_check": generation, "bos_added_by_llama_cpp": bos_added}


def _ollama_create(name: str, modelfile: Path) -> dict:
    cmd = ["ollama", "create", name, "-f", str(modelfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=modelfile.parent)
    if proc.returncode != 0:
        log.warning("`%s` failed (is the Ollama server running?): %s", " ".join(cmd), proc.stderr.strip()[-500:])
        return {"created": False, "error": proc.stderr.strip()[-500:]}
    return {"created": True}


def write_modelfiles(cfg: Config, run: RunDir) -> dict:
    """Stage `ollama`: run.gguf_dir/Modelfile.<QUANT> for every GGUF there, checked, plus `ollama create`."""
    if cfg.export.ollama is None:
        return {"skipped": "export.ollama is not set"}
    ggufs = run.gguf_files(cfg.model.name, cfg.task.name)
    if not ggufs:
        raise ExportError(f"no GGUF of {cfg.model.name}-{cfg.task.name} in {run.gguf_dir}: run the gguf stage first")
    clean_stale(run.gguf_dir, "Modelfile")
    tokenizer = saved_tokenizer(cfg.model, run.merged_dir)
    system = cfg.task.system_prompt or ""
    summary: dict[str, Any] = {"modelfiles": {}, "constraint_files": [str(p) for p in write_constraint_files(cfg, run)]}
    for gguf in ggufs:
        quant = quant_of(gguf)
        final = run.modelfile_path(quant)
        tmp = run.gguf_dir / f"{TMP_PREFIX}Modelfile.{quant}-{uuid.uuid4().hex[:8]}"
        with open_gguf(gguf, vocab_only=True) as vocab:
            bos_added = gguf_adds_bos(vocab)
        text = modelfile_text(cfg, tokenizer, gguf, system, bos_added, run)
        tmp.write_text(text, encoding="utf-8")
        try:
            entry: dict[str, Any] = {"path": str(final), "gguf": gguf.name}
            if cfg.export.verify:
                entry["verify"] = verify_modelfile(cfg, run, tokenizer, gguf, text, system, bos_added)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        name = ollama_name(cfg, quant)
        entry["create_command"] = (f"cd {shlex.quote(str(run.gguf_dir))} && ollama create {shlex.quote(name)} "
                                   f"-f {shlex.quote(final.name)}")
        print(entry["create_command"])
        if cfg.export.ollama.create and shutil.which("ollama"):
            entry.update(_ollama_create(name, final))
        summary["modelfiles"][quant] = entry
    return summary
