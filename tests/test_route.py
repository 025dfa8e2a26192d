"""The route stage and finetune-route on a real tiny run: the bundled address data (data stage), a real LoRA
adapter, the packaged SmolLM2 GGUF as the served small model, and llama.cpp's OpenAI-compatible server
(llama-cpp-python[server]) started here as the strong model's endpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.core.config import compose
from finetune.core.errors import ConfigError
from finetune.core.hardware import torch_threads
from finetune.core.processes import free_port, wait_http
from finetune.core.rundir import RunDir
from finetune.data.prepare import prepare
from finetune.data.rows import read_rows
from finetune.evaluate import stage as ev
from finetune.models.gguf_source import packaged_gguf_path
from finetune.models.loading import load_model, load_tokenizer, render_prompt
from finetune.route.curves import ALWAYS
from finetune.route.serve import Router
from finetune.route.stage import route
from finetune.runtimes.cpu_kernels import server_env
from finetune.runtimes.generation import Sampling
from finetune.runtimes.llamacpp import open_gguf, prompt_tokens
from finetune.runtimes.llamacpp_batch import generate_llama_cpp_batched
from finetune.runtimes.transformers import generate_transformers

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 48
STRONG_ALIAS = "strong-smollm2"


@pytest.fixture(scope="module")
def strong_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on the packaged SmolLM2 GGUF: the strong side's endpoint."""
    cfg = compose([])
    port = free_port()
    log = tmp_path_factory.mktemp("strong") / "server.log"  # a file: llama.cpp logs more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_gguf_path(cfg.model)), "--host",
         "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "2048", "--model_alias", STRONG_ALIAS],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=server_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, log, 120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def train_lora(cfg, run: RunDir, steps: int = 8) -> None:
    """A real PEFT LoRA adapter: a few AdamW steps of completion-only loss on the run's train rows."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    model = get_peft_model(load_model(cfg.model), LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                             target_modules=list(cfg.model.lora_target_modules)))
    rows = read_rows(run.split_path("train"), required=("prompt", "completion"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(steps):
        row = rows[step % len(rows)]
        prompt = tokenizer(render_prompt(tokenizer, row["prompt"], cfg.model), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["completion"][0]["content"] + cfg.model.eos_token + "\n",
                           add_special_tokens=False)["input_ids"]
        loss = model(input_ids=torch.tensor([prompt + answer]),
                     labels=torch.tensor([[-100] * len(prompt) + answer])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    run.mark_done("train", {"steps": steps})


@pytest.fixture(scope="module")
def routed(tmp_path_factory, strong_server):
    """A run with data, adapter, a GGUF and an evaluation, then the route stage with the endpoint as strong."""
    root = tmp_path_factory.mktemp("routerun")
    cfg = compose([
        f"run_dir={root}", "task.data.max_train_examples=24", "task.data.max_eval_examples=14",
        f"task.max_new_tokens={MAX_NEW_TOKENS}", "evaluate.max_examples=6", "evaluate.base=false",
        "evaluate.unconstrained=[]", "evaluate.n_threads=1", "evaluate.batch_size=8",
        f"route.strong={strong_server}", f"route.strong_model={STRONG_ALIAS}", "route.small=[gguf-Q4_1,finetuned]",
        "route.validation_examples=14", "route.max_escalated=0.5", "route.timeout_s=60",
    ])
    run = RunDir(root)
    with torch_threads(1):
        prepare(cfg, run)
        run.mark_done("data", {})
        train_lora(cfg, run)
        run.gguf_dir.mkdir()  # the packaged GGUF stands in for an export: the same runtime and file format
        os.symlink(packaged_gguf_path(cfg.model), run.gguf_dir / "smollm2-extraction-Q4_1.gguf")
        OmegaConf.save(OmegaConf.structured(cfg), run.config_path, resolve=True)  # as the pipeline writes it
        ev.evaluate(cfg, run)
        summary = route(cfg, run)
    return cfg, run, summary


def test_router_json_curves_and_report(routed):
    cfg, run, summary = routed
    router = json.loads(run.router_path.read_text())
    assert router["task"] == "extraction" and router["model"] == "smollm2"
    assert set(router["routers"]) == {"gguf-Q4_1", "finetuned"} and summary["served"] == "gguf-Q4_1"
    assert router["served"]["gguf"] == "gguf/smollm2-extraction-Q4_1.gguf"
    assert router["strong"]["kind"] == "endpoint" and router["strong"]["entry"]["n"] == 6
    metrics = json.loads(run.metrics_path.read_text())
    for name, r in router["routers"].items():
        for split, n in (("validation", 14), ("test", 6)):
            curve = r[split]["curve"]
            assert curve[0]["share"] == 0 and curve[-1]["share"] == 1 and r[split]["n"] == n
            assert [p["share"] for p in curve] == sorted(p["share"] for p in curve)
        # Escalating nothing on the test rows is the small model as the evaluate stage scored it.
        assert r["test"]["small"] == pytest.approx(metrics["models"][name]["field_f1"])
        at = r["test"]["at_threshold"]
        assert at["n"] == 6 and 0 <= at["share_escalated"] <= 1 and at["calls_saved"] == 1 - at["share_escalated"]
        assert r["validation"]["curve"][0]["quality"] <= r["choice"]["quality"]  # never worse than no routing
        assert r["scorer"]["kind"] in ("signal", "logistic") and len(r["scorers_compared"]) >= 4
        if r["test"]["gap"] <= 0:
            assert r["test"]["apgr"] is None
    assert metrics["route"]["served"] == "gguf-Q4_1"
    assert (run.plots_dir / "route.png").stat().st_size > 1000
    report = run.report_path.read_text()
    assert "## Routing" in report and "APGR" in report and "plots/route.png" in report
    ev.evaluate(cfg, run)  # a later evaluation keeps the routing results in its files
    assert "## Routing" in run.report_path.read_text() and "route" in json.loads(run.metrics_path.read_text())


def test_logprobs_are_the_models_own():
    """Recorded log-probabilities equal a teacher-forced forward pass (transformers) and llama-cpp-python's
    own logprobs (llama.cpp), token for token."""
    cfg = compose(["task=extraction"])
    tokenizer = load_tokenizer(cfg.model)
    messages = [[{"role": "user", "content": f"Write the number {n} in words."}] for n in (7, 12)]
    prompts = [render_prompt(tokenizer, m, cfg.model) for m in messages]
    sampling = Sampling(max_new_tokens=12)
    with torch_threads(1):
        model = load_model(cfg.model)
        gens = generate_transformers(model, tokenizer, prompts, list(cfg.model.stop_tokens), sampling, batch_size=2)
        for prompt, gen in zip(prompts, gens):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(gen.text, add_special_tokens=False)["input_ids"]
            assert len(gen.logprobs) == gen.n_tokens == len(answer)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + answer])).logits[0].float()
            forced = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1).gather(1, torch.tensor(answer)[:, None])
            assert forced.squeeze(1).tolist() == pytest.approx(gen.logprobs, abs=2e-3)
    gguf = packaged_gguf_path(cfg.model)
    gens = generate_llama_cpp_batched(gguf, prompts, list(cfg.model.stop_tokens), sampling, n_ctx=512, parallel=2,
                                      n_threads=1, bos_token=tokenizer.bos_token)
    with open_gguf(gguf, n_ctx=512, n_threads=1, logits_all=True) as llm:
        for prompt, gen in zip(prompts, gens):
            out = llm.create_completion(prompt_tokens(llm, prompt, tokenizer.bos_token), max_tokens=12,
                                        temperature=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0, logprobs=1,
                                        stop=list(cfg.model.stop_tokens))
            theirs = out["choices"][0]["logprobs"]["token_logprobs"]
            assert out["choices"][0]["text"] == gen.text and len(gen.logprobs) == gen.n_tokens
            assert theirs[: gen.n_tokens] == pytest.approx(gen.logprobs, abs=1e-3)


def _router_copy(run: RunDir, tmp_path: Path, **served) -> Path:
    router = json.loads(run.router_path.read_text())
    router["served"].update(served)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(router))
    return path


def test_serve_stdin_escalates_below_threshold(routed, strong_server, tmp_path):
    """finetune-route over stdin: a router that escalates every answer sends each request to the endpoint and
    returns its answer; one that escalates none answers locally. One JSON line per decision."""
    cfg, run, _ = routed
    inputs = [json.dumps({"input": "123 Main St Springfield IL 62704"}), "9 Elm Avenue Boston MA 02118"]
    lines = {}
    for name, below in (("always", ALWAYS), ("never", None)):
        proc = subprocess.run(
            [sys.executable, "-m", "finetune.route", str(run.root), "--router", str(_router_copy(run, tmp_path, escalate_below=below)),
             "--strong-url", strong_server, "--strong-model", STRONG_ALIAS, "--threads", "1"],
            input="\n".join(inputs) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines[name] = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines["always"]) == len(lines["never"]) == 2
    for up, local in zip(lines["always"], lines["never"]):
        assert up["escalated"] is True and "fallback" not in up and up["strong_ms"] > 0
        assert local["escalated"] is False and local["strong_ms"] is None
        assert up["small_answer"] == local["answer"] == local["small_answer"]  # same small model, greedy
        assert up["router_ms"] < up["small_ms"] and isinstance(up["confidence"], float)
    # The escalated answer is what the endpoint answers for the same messages.
    router = Router(run.root, router_path=_router_copy(run, tmp_path, escalate_below=ALWAYS),
                    strong_url=strong_server, strong_model=STRONG_ALIAS, n_threads=1)
    try:
        assert router.answer("9 Elm Avenue Boston MA 02118")["answer"] == lines["always"][1]["answer"]
    finally:
        router.close()


def test_strong_down_or_slow_falls_back_to_small(routed, tmp_path):
    cfg, run, _ = routed
    path = _router_copy(run, tmp_path, escalate_below=ALWAYS)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        for url, timeout, why in ((dead, 5.0, "Connection"), (f"http://127.0.0.1:{silent.getsockname()[1]}/v1", 1.0,
                                                              "Timeout")):
            router = Router(run.root, router_path=path, strong_url=url, strong_model="m", timeout_s=timeout,
                            n_threads=1)
            try:
                decision = router.answer("77 Pine Street Denver CO 80202")
            finally:
                router.close()
            assert decision["escalated"] is False and why in decision["fallback"]
            assert decision["answer"] == decision["small_answer"] and decision["answer"]
            assert decision["strong_ms"] < 1000 * (timeout + 5)
    finally:
        stop.set()
        thread.join()
        silent.close()
        for conn in held:
            conn.close()


def test_foreign_router_or_changed_gguf_is_refused(routed, tmp_path):
    cfg, run, _ = routed
    router = json.loads(run.router_path.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**router, "task": "classification"}))
    with pytest.raises(ConfigError, match="fitted for task 'classification'"):
        Router(run.root, router_path=other)
    other.write_text(json.dumps({**router, "answer_constraint_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="another prompt or answer format"):
        Router(run.root, router_path=other)
    changed = _router_copy(run, tmp_path, sha256="f" * 64)
    with pytest.raises(ConfigError, match="not the GGUF the router was fitted on"):
        Router(run.root, router_path=changed)
    proc = subprocess.run([sys.executable, "-m", "finetune.route", str(run.root), "--router", str(other)],
                          input="", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "another prompt or answer format" in proc.stderr


def test_serve_http(routed, tmp_path):
    cfg, run, _ = routed
    port = free_port()
    log = tmp_path / "route.log"
    proc = subprocess.Popen([sys.executable, "-m", "finetune.route", str(run.root), "--threads", "1",
                             "--serve", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, 120)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/route", method="POST",
                                         data=json.dumps({"input": "5 Park Pl Newark NJ 07102"}).encode())
        decision = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert decision["answer"] and "confidence" in decision and decision["latency_ms"] > 0
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/route", method="POST", data=b'{"text": 1}')
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert json.loads(out.splitlines()[0])["answer"] == decision["answer"]  # the decision log on stdout
