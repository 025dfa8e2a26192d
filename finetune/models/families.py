"""Model families: one record per chat-template family, everything that differs between them.

A family decides how a conversation becomes text (the Hugging Face chat template, or ours for base
models), what Ollama's TEMPLATE must be to render the same text (Go text/template, the `.Messages`
form), which text only appears when a generation runs on into a new turn, and the quirks. What differs
per model of a family (end-of-turn token, stop tokens, LoRA targets, system-role support, attention
kernel) is in its conf/model/<name>.yaml.

Adding a family: one `Family(...)` in FAMILIES below, plus conf/model/<name>.yaml with `family: <name>`.
The export checks that the TEMPLATE renders exactly what the HF chat template renders, for every
Modelfile it writes, so a wrong record fails at export, not in a user's Ollama.

TEMPLATE placeholders filled at export time (finetune.export.ollama.template): @DEFAULT@ / @HAS_DEFAULT@
(the HF template's own default system prompt), @PREAMBLE@ (Llama 3's date preamble), @END@ (the family's
end-of-turn text) — each as a Go string literal, so no content can break the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.core.errors import ConfigError

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
# exactly as finetune.models.loading.adapt_messages folds it (and Gemma 3's own template does).
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

# Base models: PLAIN_CHAT_TEMPLATE below (system, ### Input:, ### Response: ... EOS).
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

# Prompt format for base (non-instruct) models that have no chat template of their own. The
# assistant turn ends with eos_token, which the model learns to emit, so generation stops.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Input:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    ollama_template: str  # Go text/template with the placeholders above
    turn_markers: list[str]  # text that only appears when a generation runs on into a new turn
    end: str | None = None  # end-of-turn text in the TEMPLATE (@END@); None: the tokenizer's EOS token
    chat_template: str | None = None  # our Jinja chat template, for models that have none of their own
    quirks: str = ""  # what docs/families.md explains at length
    examples: list[str] = field(default_factory=list)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("chatml", CHATML, ["<|im_start|>"], examples=["smollm2", "qwen2.5-*"]),
    Family("phi3", TAGGED, ["<|user|>", "<|assistant|>"], end="<|end|>", examples=["phi3"],
           quirks="fused qkv/gate_up projections; SentencePiece whitespace rules after chat tokens"),
    Family("zephyr", TAGGED, ["<|user|>"], examples=["tinyllama"]),
    Family("llama3", LLAMA3, ["<|start_header_id|>"], examples=["llama3.2-*"],
           quirks="two stop tokens (<|eot_id|>, <|eom_id|>); a dated system preamble"),
    Family("gemma", GEMMA, ["<start_of_turn>"], examples=["gemma2", "gemma3-1b"],
           quirks="no system role (folded into the first user turn); Gemma 2 soft-capping needs eager attention"),
    Family("plain", PLAIN, ["### Input:"], chat_template=PLAIN_CHAT_TEMPLATE, examples=["gemma3-270m"],
           quirks="base models: our plain '### Input: / ### Response:' format, the answer ends with EOS"),
]}


def family(name: str) -> Family:
    """The record of a family name (model.family), or ConfigError listing the known ones."""
    try:
        return FAMILIES[str(name)]
    except KeyError:
        raise ConfigError(f"model.family={name!r} is not a known chat-template family; known: "
                          f"{', '.join(sorted(FAMILIES))} (finetune/models/families.py)") from None
