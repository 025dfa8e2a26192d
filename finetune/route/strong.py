"""The strong model a router escalates to: where it lives and how it is asked.

`route.strong` is one of
  a registry model name (conf/model/)   answered in transformers like evaluate.compare (answers cached)
  a local .gguf file                    answered in llama.cpp with the GGUF's own chat template
  an OpenAI-compatible base URL         asked through the `openai` client (route.strong_model names the model)
Every kind gets the same chat messages (system prompt, route.strong_few_shot examples, the input) and, where
the runtime takes it, the task's answer constraint: the GBNF grammar in llama.cpp, the JSON schema as an
endpoint's `response_format` (a label set has no such form; the answer is parsed as it comes).
`Endpoint` is also what finetune-route escalates to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from finetune.core.errors import ConfigError
from finetune.runtimes.generation import Generation, Grammars


def strong_kind(spec: str) -> str:
    if spec.startswith(("http://", "https://")):
        return "endpoint"
    if spec.endswith(".gguf"):
        return "gguf"
    return "registry"


# How an endpoint is asked for JSON of a schema, most standard first: OpenAI's json_schema (OpenAI, vLLM,
# llama.cpp's llama-server), the json_object + schema form (llama-cpp-python's server), then no constraint.
FORMS = ("json_schema", "json_object", None)


def response_format(constraint: Any, form: str | None) -> dict:
    """The endpoint form of an answer constraint; a label set (or no constraint) has none."""
    if not isinstance(constraint, dict) or form is None:
        return {}
    if form == "json_schema":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": constraint, "strict": True}}}
    return {"response_format": {"type": "json_object", "schema": constraint}}


class Endpoint:
    """An OpenAI-compatible chat endpoint through the `openai` client; the key from OPENAI_API_KEY (servers
    that need none accept any). The first response format the server accepts is kept for later calls: until one
    has worked, an error status moves on to the next form (llama-cpp-python's server answers an unknown form
    with 500, not 400)."""

    def __init__(self, base_url: str, model: str, timeout_s: float):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                             timeout=timeout_s, max_retries=0)
        self.model = model
        self.form = 0
        self.settled = False  # a call with FORMS[self.form] has succeeded

    def ask(self, messages: list[dict], max_tokens: int, constraint: Any) -> Generation:
        """One greedy chat completion; raises the client's error when the endpoint fails or times out."""
        import openai

        while True:
            extra = response_format(constraint, FORMS[self.form])
            t0 = time.perf_counter()
            try:
                reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                            max_tokens=max_tokens, **extra)
                self.settled = True
                break
            except openai.APIStatusError:
                if self.settled or not extra:
                    raise
                self.form += 1  # this server does not take that form: the next one
        choice = reply.choices[0]
        tokens = int(reply.usage.completion_tokens) if reply.usage is not None else 0
        return Generation(choice.message.content or "", tokens, time.perf_counter() - t0,
                          stopped=choice.finish_reason == "stop")


def endpoint_answers(base_url: str, model: str, conversations: list[list[dict]], max_tokens: int,
                     constraints: list[Any], timeout_s: float) -> list[Generation]:
    """Greedy answers of an endpoint, each conversation under its own answer constraint (None: none)."""
    endpoint = Endpoint(base_url, model, timeout_s)
    out = []
    for i, (messages, constraint) in enumerate(zip(conversations, constraints, strict=True)):
        gen = endpoint.ask(messages, max_tokens, constraint)
        gen.batch = i
        out.append(gen)
    return out


def gguf_answers(path: str | Path, conversations: list[list[dict]], max_tokens: int, grammar: Grammars,
                 n_threads: int | None = None) -> list[Generation]:
    """Greedy answers of a local GGUF, its chat template applied by llama.cpp, one conversation at a time
    (`grammar`: one for all, or one per conversation)."""
    from finetune.runtimes.llamacpp import llama_grammars, open_gguf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"route.strong={path}: no such GGUF file")
    out = []
    with open_gguf(path, n_ctx=4096, n_threads=n_threads) as llm:
        for i, (messages, llama_grammar) in enumerate(zip(conversations, llama_grammars(grammar, len(conversations)))):
            t0 = time.perf_counter()
            reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=max_tokens,
                                               grammar=llama_grammar)
            choice = reply["choices"][0]
            out.append(Generation(choice["message"]["content"] or "", int(reply["usage"]["completion_tokens"]),
                                  time.perf_counter() - t0, stopped=choice.get("finish_reason") == "stop", batch=i))
    return out
