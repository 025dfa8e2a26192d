"""Serving a run's router: the fine-tuned GGUF answers, its confidence decides, the strong model answers the rest.

`Router(run_dir)` reads router.json and the run's config, and refuses a router that does not belong to
this run (another task or model, another answer format, or a GGUF that changed since the router was
fitted). The small model runs in llama.cpp, in process, on the GGUF the router was fitted on (what the
run's Ollama Modelfile points at), with the same prompt, stop tokens, grammar and greedy decoding that
the evaluation used, so its confidence is computed as in the route stage. Escalations go to any
OpenAI-compatible endpoint through the `openai` client. Whatever happens on the strong side (down, slow,
an error), the caller gets the small model's answer with a `fallback` reason, never an exception.

One decision: {"answer", "escalated", "confidence", "escalate_below", "small_ms", "strong_ms", "latency_ms",
"router_ms" (the router's own time: prompt, signals, confidence), "small_answer", ["fallback"]}.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.core.config import Config
from finetune.core.errors import ConfigError
from finetune.core.fingerprint import file_sha256
from finetune.core.rundir import RunDir
from finetune.data.rows import context_size, run_task
from finetune.evaluate.stage import sampling_from, with_shots
from finetune.models.loading import saved_tokenizer, render_prompt
from finetune.route.signals import Scorer, features
from finetune.route.stage import FORMAT, answer_format_sha256
from finetune.route.strong import Endpoint
from finetune.runtimes.llamacpp_batch import BatchedLlama


def run_config(run: RunDir) -> Config:
    if not run.config_path.is_file():
        raise ConfigError(f"{run.root} is not a finetune run directory (no {run.config_path.name})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run.config_path)))


def check_router(router: Any, cfg: Config, task: Any, source: Path) -> dict:
    """router.json's served part, or ConfigError saying why this router does not belong to this run."""
    if not isinstance(router, dict) or router.get("format") != FORMAT:
        raise ConfigError(f"{source} is not a router.json of this finetune version (format {FORMAT})")
    theirs = (router.get("task"), router.get("model"))
    if theirs != (cfg.task.name, cfg.model.name):
        raise ConfigError(f"{source} was fitted for task {theirs[0]!r} on model {theirs[1]!r}; this run is task "
                          f"{cfg.task.name!r} on {cfg.model.name!r}: refit it with the route stage of this run")
    if router.get("answer_constraint_sha256") != answer_format_sha256(task):
        raise ConfigError(f"{source} was fitted for another prompt or answer format of task {cfg.task.name!r}: "
                          f"refit it (python -m finetune run_dir=... stages=[route])")
    if not router.get("served"):
        raise ConfigError(f"{source} has no GGUF router to serve (route.small named no GGUF, or the run has none)")
    return router["served"]


class Router:
    def __init__(self, run_dir: str | Path, *, router_path: str | Path | None = None, strong_url: str | None = None,
                 strong_model: str | None = None, timeout_s: float | None = None, n_threads: int | None = None):
        self.run = RunDir(Path(run_dir))
        path = Path(router_path) if router_path else self.run.router_path
        if not path.is_file():
            raise ConfigError(f"no {path}: run the route stage first (python -m finetune run_dir={self.run.root} "
                              f"stages=[route] route.strong=...)")
        try:
            self.router = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        self.cfg = run_config(self.run)
        self.task = run_task(self.cfg.task, self.run)
        served = check_router(self.router, self.cfg, self.task, path)
        gguf = self.run.root / served["gguf"]
        if not gguf.is_file() or file_sha256(gguf) != served["sha256"]:
            raise ConfigError(f"{gguf} is missing or is not the GGUF the router was fitted on (sha256 differs): "
                              f"refit the router")
        self.scorer = Scorer.from_dict(served["scorer"])
        self.escalate_below = served["escalate_below"]
        self.tokenizer = saved_tokenizer(self.cfg.model, self.run.adapter_dir, self.run.merged_dir)
        # The answer constraint when it is the same for every input; built per request where it depends on it.
        self.constrained = self.cfg.evaluate.constrained
        self.grammar = self.task.answer_grammar() if self.constrained and not self.task.per_input else None
        self.sampling = sampling_from(self.cfg)  # the decoding the route stage fitted the confidence on
        strong = self.router["strong"]
        self.strong_url = strong_url or os.environ.get("FINETUNE_STRONG_URL") or (
            strong["spec"] if strong["kind"] == "endpoint" else None)
        self.strong_model = strong_model or os.environ.get("FINETUNE_STRONG_MODEL") or strong.get("model")
        self.shots = strong.get("shots", [])
        self.timeout_s = timeout_s or self.cfg.route.timeout_s
        self.client = (Endpoint(self.strong_url, self.strong_model, self.timeout_s)
                       if self.strong_url and self.strong_model else None)
        self.llama = BatchedLlama(gguf, n_ctx=context_size(self.cfg, self.run), parallel=1, n_threads=n_threads,
                                  seed=self.cfg.method.seed)
        self.lock = threading.Lock()  # one llama.cpp context: one small answer at a time

    def close(self) -> None:
        self.llama.close()

    def small(self, text: str) -> tuple[Any, float, float]:
        t0 = time.perf_counter()
        prompt = render_prompt(self.tokenizer, self.task.prompt_messages(text), self.cfg.model)
        t1 = time.perf_counter()
        grammar = self.task.answer_grammar(text) if self.constrained and self.task.per_input else self.grammar
        with self.lock:
            gen = self.llama.generate([prompt], list(self.cfg.model.stop_tokens), self.sampling,
                                      bos_token=self.tokenizer.bos_token, grammar=grammar)[0]
        return gen, t1 - t0, time.perf_counter() - t1

    def answer(self, text: str) -> dict:
        """Route one request (see the module docstring)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a request needs a non-empty input text")
        start = time.perf_counter()
        gen, render_s, small_s = self.small(text)
        t = time.perf_counter()
        confidence = self.scorer.confidence(features(self.task, gen.text, gen.logprobs, gen.stopped))
        escalate = self.escalate_below is not None and confidence < self.escalate_below
        router_s = render_s + time.perf_counter() - t
        decision = {"answer": gen.text, "escalated": False, "confidence": round(confidence, 6),
                    "escalate_below": self.escalate_below, "small_answer": gen.text,
                    "small_ms": round(1000 * small_s, 2), "strong_ms": None}
        if escalate:
            if self.client is None:
                decision["fallback"] = "escalation wanted but no strong endpoint is configured (--strong-url, --strong-model)"
            else:
                t = time.perf_counter()
                try:
                    messages = with_shots(self.task.prompt_messages(text), self.shots)
                    constraint = self.task.answer_constraint(text) if self.constrained else None
                    strong = self.client.ask(messages, self.sampling.max_new_tokens, constraint)
                    decision.update(answer=strong.text, escalated=True)
                except Exception as exc:  # noqa: BLE001 - the caller always gets an answer
                    decision["fallback"] = f"strong endpoint failed: {type(exc).__name__}: {exc}"
                decision["strong_ms"] = round(1000 * (time.perf_counter() - t), 2)
        decision["router_ms"] = round(1000 * router_s, 3)
        decision["latency_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return decision
