"""Ollama TEMPLATEs (Go text/template, the `.Messages` form) for each chat-template family.

Each one renders exactly what the model's Hugging Face chat template renders for
`finetune.models.adapt_messages(messages)` with `add_generation_prompt=True` (BOS excepted:
llama.cpp adds it while tokenizing). The export checks that claim for every Modelfile it writes.

Ollama hands the template {System, Messages, ...}; a Modelfile SYSTEM arrives as a leading system
message unless the client sent its own. Literal text that comes from the model or the task (a
default system prompt, Llama 3's date preamble, an EOS token) is written as a Go string literal,
so no content can break the template or the Modelfile around it. A final assistant message is left
open (Ollama continues it), as Ollama's own templates do.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

# $system / $hasSystem: a leading system message, else the template's default (if the HF template has one).
_HEADER = """{{- $system := @DEFAULT@ }}{{ $hasSystem := @HAS_DEFAULT@ }}
{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ $system = (index .Messages 0).Content }}{{ $hasSystem = true }}{{ end }}"""

_LAST = """{{- $last := eq (len (slice $.Messages $i)) 1 }}"""

# SmolLM2, Qwen 2.5: <|im_start|>role\ncontent<|im_end|>\n
CHATML = _HEADER + """
{{- if $hasSystem }}<|im_start|>system
{{ $system }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if or $i (ne $m.Role "system") }}<|im_start|>{{ $m.Role }}
{{ $m.Content }}{{ if or (not $last) (ne $m.Role "assistant") }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

# Phi-3 (<|end|>) and Zephyr/TinyLlama (</s>): <|role|>\ncontent@END@\n
TAGGED = _HEADER + """
{{- if $hasSystem }}<|system|>
{{ $system }}{{ @END@ }}
{{ end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if or $i (ne $m.Role "system") }}<|{{ $m.Role }}|>
{{ $m.Content }}{{ if or (not $last) (ne $m.Role "assistant") }}{{ @END@ }}
{{ end }}
{{- end }}
{{- if and $last (ne $m.Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

# Llama 3.x: header blocks ended by <|eot_id|>; 3.1+/3.2 always open with a system block whose
# preamble ("Cutting Knowledge Date ... Today Date ...") is taken from the HF template at export time.
LLAMA3 = _HEADER + """
{{- if $hasSystem }}<|start_header_id|>system<|end_header_id|>

{{ @PREAMBLE@ }}{{ $system }}<|eot_id|>
{{- end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if or $i (ne $m.Role "system") }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>

{{ $m.Content }}{{ if or (not $last) (ne $m.Role "assistant") }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

# Gemma: no system role; the system text opens the first user turn, followed by a blank line,
# exactly as finetune.models.adapt_messages folds it (and Gemma 3's own template does).
GEMMA = _HEADER + """
{{- $pending := $hasSystem }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if $pending }}{{ $system }}

{{ $pending = false }}{{ end }}{{ $m.Content }}<end_of_turn>
{{ else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- if and $last (ne $m.Role "assistant") }}{{ if $pending }}<start_of_turn>user
{{ $system }}<end_of_turn>
{{ end }}<start_of_turn>model
{{ end }}
{{- end }}"""

# Base models: finetune.models.PLAIN_CHAT_TEMPLATE (system, ### Input:, ### Response: ... EOS).
PLAIN = _HEADER + """
{{- if $hasSystem }}{{ $system }}

{{ end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if and $i (eq $m.Role "system") }}{{ $m.Content }}

{{ else if eq $m.Role "user" }}### Input:
{{ $m.Content }}

{{ else if eq $m.Role "assistant" }}### Response:
{{ $m.Content }}{{ if not $last }}{{ @END@ }}

{{ end }}
{{- end }}
{{- if and $last (ne $m.Role "assistant") }}### Response:
{{ end }}
{{- end }}"""

FAMILY_TEMPLATES = {"chatml": CHATML, "phi3": TAGGED, "zephyr": TAGGED, "llama3": LLAMA3,
                    "gemma": GEMMA, "plain": PLAIN}

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


def hf_render(tokenizer: Any, messages: list[dict], model_cfg: DictConfig) -> str:
    from finetune.models import adapt_messages

    return tokenizer.apply_chat_template(adapt_messages(messages, model_cfg), tokenize=False,
                                         add_generation_prompt=True)


def template_writes_bos(tokenizer: Any) -> bool:
    """The HF chat template writes the BOS token itself (Llama 3, Gemma, our plain format); a chat
    turn opener that happens to be the BOS token (SmolLM2's <|im_start|>) does not count."""
    return bool(tokenizer.bos_token) and "bos_token" in (tokenizer.chat_template or "")


def probe_defaults(tokenizer: Any, model_cfg: DictConfig) -> dict:
    """What the HF template renders with no system message (its default system prompt, if any) and
    Llama 3's system preamble, found by rendering two probe conversations."""
    mark, user = "SYSTEM-PROBE-2f9c", "USER-PROBE-7a1e"
    with_sys = hf_render(tokenizer, [{"role": "system", "content": mark}, {"role": "user", "content": user}],
                         model_cfg)
    only_user = hf_render(tokenizer, [{"role": "user", "content": user}], model_cfg)
    info = {"has_default": False, "default": "", "preamble": ""}
    if mark in with_sys:
        pre, post = with_sys.split(mark, 1)
        if only_user.startswith(pre) and only_user.endswith(post) and len(only_user) >= len(pre) + len(post):
            info.update(has_default=True, default=only_user[len(pre):len(only_user) - len(post)])
        if LLAMA3_SYSTEM_HEADER in pre:
            info["preamble"] = pre.split(LLAMA3_SYSTEM_HEADER, 1)[1]
    return info


def ollama_template(tokenizer: Any, model_cfg: DictConfig, default_system: str | None = None,
                    bos_added: bool = True) -> str:
    """The TEMPLATE for this model's family. `default_system` replaces the HF template's own default
    system prompt (used when the system prompt cannot be written as a Modelfile SYSTEM line).
    `bos_added`: llama.cpp adds BOS itself; if it does not and the HF template writes BOS, so does this."""
    family = str(getattr(model_cfg.family, "value", model_cfg.family))
    if family not in FAMILY_TEMPLATES:
        raise ValueError(f"no Ollama template for chat family {family!r}; known: {sorted(FAMILY_TEMPLATES)}")
    probe = probe_defaults(tokenizer, model_cfg)
    has_default, default = probe["has_default"], probe["default"]
    if default_system is not None:
        has_default, default = True, default_system
    end = {"phi3": "<|end|>"}.get(family, tokenizer.eos_token or "")
    prefix = "{{- " + go_literal(tokenizer.bos_token) + " }}" if template_writes_bos(tokenizer) and not bos_added else ""
    return prefix + (FAMILY_TEMPLATES[family]
            .replace("@DEFAULT@", go_literal(default))
            .replace("@HAS_DEFAULT@", "true" if has_default else "false")
            .replace("@PREAMBLE@", go_literal(probe["preamble"]))
            .replace("@END@", go_literal(end)))


def turn_markers(family: str) -> list[str]:
    """Text that only appears when a generation runs on into a new turn."""
    return {"chatml": ["<|im_start|>"], "phi3": ["<|user|>", "<|assistant|>"], "zephyr": ["<|user|>"],
            "llama3": ["<|start_header_id|>"], "gemma": ["<start_of_turn>"], "plain": ["### Input:"]}[family]
