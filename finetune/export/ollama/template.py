"""The Ollama TEMPLATE of a model: its family's Go template (finetune.models.families) filled in.

It renders exactly what the model's Hugging Face chat template renders for
`finetune.models.loading.adapt_messages(messages)` with `add_generation_prompt=True` (BOS excepted:
llama.cpp adds it while tokenizing). The export checks that claim for every Modelfile it writes.

Ollama hands the template {System, Messages, ...}; a Modelfile SYSTEM arrives as a leading system
message unless the client sent its own. Literal text that comes from the model or the task (a
default system prompt, Llama 3's date preamble, an EOS token) is written as a Go string literal,
so no content can break the template or the Modelfile around it. A final assistant message is left
open (Ollama continues it), as Ollama's own templates do.
"""

from __future__ import annotations

from typing import Any

from finetune.core.config import ModelConfig
from finetune.models.families import family
from finetune.models.loading import render_prompt

# The opening of a user turn, to find where the system part of a rendering ends.
LLAMA3_SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"


def go_literal(s: str) -> str:
    """A Go double-quoted string literal: escapes keep quotes, backslashes, newlines and invisible
    characters out of the template text (Ollama's Modelfile parser drops non-printable runes)."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable():
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def template_writes_bos(tokenizer: Any) -> bool:
    """The HF chat template writes the BOS token itself (Llama 3, Gemma, our plain format); a chat
    turn opener that happens to be the BOS token (SmolLM2's <|im_start|>) does not count."""
    return bool(tokenizer.bos_token) and "bos_token" in (tokenizer.chat_template or "")


def probe_defaults(tokenizer: Any, model_cfg: ModelConfig) -> dict:
    """What the HF template renders with no system message (its default system prompt, if any) and
    Llama 3's system preamble, found by rendering two probe conversations."""
    mark, user = "SYSTEM-PROBE-2f9c", "USER-PROBE-7a1e"
    with_sys = render_prompt(tokenizer, [{"role": "system", "content": mark}, {"role": "user", "content": user}],
                         model_cfg)
    only_user = render_prompt(tokenizer, [{"role": "user", "content": user}], model_cfg)
    info = {"has_default": False, "default": "", "preamble": ""}
    if mark in with_sys:
        pre, post = with_sys.split(mark, 1)
        if only_user.startswith(pre) and only_user.endswith(post) and len(only_user) >= len(pre) + len(post):
            info.update(has_default=True, default=only_user[len(pre):len(only_user) - len(post)])
        if LLAMA3_SYSTEM_HEADER in pre:
            info["preamble"] = pre.split(LLAMA3_SYSTEM_HEADER, 1)[1]
    return info


def ollama_template(tokenizer: Any, model_cfg: ModelConfig, default_system: str | None = None,
                    bos_added: bool = True) -> str:
    """The TEMPLATE for this model's family. `default_system` replaces the HF template's own default
    system prompt (used when the system prompt cannot be written as a Modelfile SYSTEM line).
    `bos_added`: llama.cpp adds BOS itself; if it does not and the HF template writes BOS, so does this."""
    fam = family(model_cfg.family)
    probe = probe_defaults(tokenizer, model_cfg)
    has_default, default = probe["has_default"], probe["default"]
    if default_system is not None:
        has_default, default = True, default_system
    end = fam.end if fam.end is not None else (tokenizer.eos_token or "")
    prefix = "{{- " + go_literal(tokenizer.bos_token) + " }}" if template_writes_bos(tokenizer) and not bos_added else ""
    return prefix + (fam.ollama_template
                     .replace("@DEFAULT@", go_literal(default))
                     .replace("@HAS_DEFAULT@", "true" if has_default else "false")
                     .replace("@PREAMBLE@", go_literal(probe["preamble"]))
                     .replace("@END@", go_literal(end)))
