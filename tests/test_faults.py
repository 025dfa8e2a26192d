"""Fault injection on the run directory, each case run as a user would (the CLI, a real second process, a
real signal) and its outcome asserted: which exit code, which message, what is left on disk.

    two processes on one run directory      -> the second stops at once (exit 7), naming the holder
    a stale lock from a killed run          -> reported, the run goes on
    default run directories                 -> never the same for two processes
    a folder that is not a run directory    -> refused (exit 7), nothing in it touched
    bad config values                       -> exit 2 before any stage, every problem listed with its range
    changed data / changed config / deleted outputs -> the stage and everything downstream run again
    Ctrl-C / SIGTERM / SIGKILL during export     -> exit 130 / 143, no done marker, no temporary files, no
                                                    converter left running
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainutil import ROOT, TINY

from finetune.core.config import compose, compose_dict, to_typed
from finetune.core.rundir import RunDir


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def logs(out: subprocess.CompletedProcess) -> str:
    return out.stdout + out.stderr


def rows(n: int, start: int = 0) -> list[dict]:
    streets = ["Main", "Oak", "Pine", "Elm", "Lake", "Hill"]
    return [{"input": f"{100 + i} {streets[i % 6]} St, Springfield IL",
             "output": {"AddressNumber": str(100 + i), "StreetName": streets[i % 6], "StreetNamePostType": "St",
                        "PlaceName": "Springfield", "StateName": "IL"}} for i in range(start, start + n)]


def write_rows(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def data_args(path: Path) -> list[str]:
    return [f"task.data.path={path}", "task.data.validation_fraction=0.1", "task.data.test_fraction=0.1"]


# ---- the run directory itself ---------------------------------------------------------------------


def test_a_second_process_on_a_held_run_directory_stops_at_once(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        out = cli("stages=[data]", f"run_dir={run.root}")
        assert out.returncode == 7, out.stderr
        assert f"is in use by pid {os.getpid()}" in out.stderr
        assert not run.data_dir.exists()
    assert (run.root / ".lock").read_text() == ""  # released


def test_a_stale_lock_of_a_killed_run_is_reported_and_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a PID that no longer runs
    run.root.mkdir(parents=True)
    (run.root / ".lock").write_text(f"pid {proc.pid} on host since 2026-01-01 00:00:00\n")
    out = cli("stages=[]", f"run_dir={run.root}")
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert f"the previous run (pid {proc.pid}" in log and "ended without releasing it" in log


def test_default_run_directories_differ_between_processes():
    code = "from finetune.core.config import compose; print(compose().run_dir)"
    dirs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    assert len(dirs) == 2, dirs
    cfg = compose_dict()  # one composed config: one name, however often and late it is read
    first = cfg.run_dir
    time.sleep(1.1)  # past the next second of the timestamp in the name
    assert cfg.run_dir == first and to_typed(cfg).run_dir == first


def test_a_folder_that_is_not_a_run_directory_is_refused_and_left_alone(tmp_path):
    folder = tmp_path / "my-project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoints" / "keep.txt").write_text("mine too")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    out = cli("stages=[data,train]", f"run_dir={folder}", "resume=false")
    assert out.returncode == 7, out.stderr
    assert "is not a run directory" in out.stderr and "notes.txt" in out.stderr
    after = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not str(p.relative_to(folder)).startswith(
        (".hydra", ".lock")) and not p.name.endswith(".log"))
    assert after == before and (folder / "checkpoints" / "keep.txt").read_text() == "mine too"


@pytest.mark.parametrize("override, words", [
    ("method.max_steps=0", "method.max_steps=0: must be >= 1, or -1"),
    ("method.lr=-1", "method.lr=-1.0: must be > 0"),
    ("task.data.validation_fraction=1.5", "task.data.validation_fraction=1.5: must be in [0, 1)"),
    ("evaluate.compare=[no-such-model]", "evaluate.compare: no model 'no-such-model'"),
    ("export.gguf.quant_types=[Q9_X]", "unknown quant type 'Q9_X'"),
    ("export.ollama.num_ctx=0", "export.ollama.num_ctx: must be >= 1"),
    ("evaluate.vllm=[adapter]", "evaluate.vllm=['adapter']: name merged and/or gptq"),
])
def test_bad_config_values_stop_before_any_stage(tmp_path, override, words):
    out = cli(override, "method.batch_size=0", f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "method.batch_size=0: must be >= 1" in out.stderr  # every problem listed
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "run.json").exists()


def test_a_compare_model_that_is_not_available_offline_fails_at_start(tmp_path):
    out = cli("evaluate.compare=[qwen2.5-7b]", f"run_dir={tmp_path / 'run'}", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "qwen2.5-7b" in out.stderr and "HF_HUB_OFFLINE" in out.stderr


# ---- finished stages are trusted only while nothing they depend on changed ---------------------------


@pytest.mark.slow
def test_changed_inputs_rerun_the_stage_and_everything_downstream(tmp_path):
    data = write_rows(tmp_path / "addresses.jsonl", rows(40))
    run_dir = tmp_path / "run"
    args = ["task=custom", "task.kind=extraction", "task.fields=[AddressNumber,StreetName,StreetNamePostType,"
            "PlaceName,StateName]", *data_args(data), "stages=[data,train]", *TINY, "method=lora",
            f"run_dir={run_dir}"]
    run = RunDir(run_dir)

    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = (run.adapter_dir / "adapter_model.safetensors").read_bytes()

    again = cli(*args)  # nothing changed: both reused, nothing trained
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[data] already done" in logs(again) and "[train] already done" in logs(again)
    assert json.loads(run.this_run_path.read_text())["stages"]["train"].startswith("reused")

    write_rows(data, rows(40) + rows(4, start=40))  # the user's file changed under the same path
    changed = cli(*args)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert f"[data] done before, but its input {data.resolve()} changed" in logs(changed)
    assert "[train] invalidated: data runs again" in logs(changed)
    summary = run.stage_summary("train")
    assert summary["resumed_from"] is None  # the checkpoints of the old data were not resumed
    assert "made from other inputs" in logs(changed)

    (run.adapter_dir / "adapter_model.safetensors").unlink()  # an output removed by hand
    removed = cli(*args)
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert "[data] already done" in logs(removed)
    assert "[train] done before, but its outputs were changed or removed" in logs(removed)

    relearn = cli(*args, "method.lr=1e-4")  # a config value train depends on
    assert relearn.returncode == 0, relearn.stderr[-3000:]
    assert "[train] done before, but its config" in logs(relearn)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() != adapter


@pytest.mark.slow
def test_rerunning_an_upstream_stage_invalidates_the_stages_after_it(tmp_path):
    """The reported case: stages=[gguf] re-made the GGUFs and deleted the Modelfiles while ollama stayed
    "done". Re-running merge must leave gguf and ollama to run again, and say so."""
    data = write_rows(tmp_path / "addresses.jsonl", rows(30))
    run_dir = tmp_path / "run"
    base = ["task=custom", "task.kind=extraction", "task.fields=[AddressNumber,StreetName,StreetNamePostType,"
            "PlaceName,StateName]", *data_args(data), *TINY, "method=lora", "export.gguf.quant_types=[Q8_0]",
            "task.max_new_tokens=24", f"run_dir={run_dir}", "evaluate.base=false", "evaluate.max_examples=2"]
    run = RunDir(run_dir)
    out = cli(*base, "stages=[data,train,merge,gguf,ollama]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(run.is_done(s) for s in ("merge", "gguf", "ollama"))

    gguf = cli(*base, "stages=[gguf]", "force=true")  # re-makes the GGUFs, which removes the Modelfiles ...
    assert gguf.returncode == 0, gguf.stderr[-3000:]
    assert "[ollama] invalidated: gguf runs again" in logs(gguf)
    assert not list(run.gguf_dir.glob("Modelfile.*")) and not run.is_done("ollama")
    ollama = cli(*base, "stages=[gguf,ollama]")  # ... so ollama runs again; gguf is reused
    assert ollama.returncode == 0, ollama.stderr[-3000:]
    assert "[gguf] already done" in logs(ollama) and "[ollama] already done" not in logs(ollama)
    assert (run.gguf_dir / "Modelfile.Q8_0").is_file() and run.is_done("ollama")

    merge = cli(*base, "stages=[merge]", "force=true")
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert "[gguf] invalidated: merge runs again" in logs(merge)
    assert "[ollama] invalidated: merge runs again" in logs(merge)
    refused = cli(*base, "stages=[ollama]")
    assert refused.returncode == 7 and "needs stage(s) ['gguf']" in refused.stderr


# ---- interrupts ---------------------------------------------------------------------------------------


def _converters(run_dir: Path, kinds: tuple[str, ...] = ("convert_hf_to_gguf", "finetune.export.llama_quantize")
                ) -> list[int]:
    """PIDs of llama.cpp converter (convert_hf_to_gguf) or quantizer (finetune.export.llama_quantize) processes
    working on this run directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if str(run_dir) in cmdline and any(kind in cmdline for kind in kinds):
            found.append(int(proc.name))
    return found


def _start_and_wait_for(args: list[str], marker: str, log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while marker not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    return proc


SWALLOWED = """
import os, signal, sys, time
from pathlib import Path
from finetune.core import interrupts
from finetune.core.files import staged_dir
from finetune.core.rundir import RunDir
interrupts.install()
run = RunDir(Path(sys.argv[1]))
for step in ("commit", "mark_done"):
    try:
        with staged_dir(run.merged_dir) if step == "commit" else open(os.devnull) as tmp:
            try:  # what importing GPTQModel does with a Ctrl-C that lands during the import
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except BaseException:
                pass
            if step == "commit":
                (tmp / "model.safetensors").write_text("weights")
        run.mark_done("merge", {})
        print(step, "not interrupted")
    except KeyboardInterrupt:
        print(step, "interrupted")
"""


def test_an_interrupt_a_library_swallows_still_stops_the_stage(tmp_path):
    out = subprocess.run([sys.executable, "-c", SWALLOWED, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["commit interrupted", "mark_done interrupted"], out.stdout + out.stderr
    run = RunDir(tmp_path)
    assert not run.merged_dir.exists() and not run.is_done("merge") and not list(tmp_path.rglob(".tmp-*"))


IMPORTED = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a module initialises (torch's first import crashed on it)
time.sleep(0.5)
done = True
"""

INTERRUPTED_IMPORT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from finetune.core import interrupts
interrupts.install()
started = time.monotonic()
try:
    import slow_module
    time.sleep(10)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", "slow_module" in sys.modules, round(time.monotonic() - started, 1))
"""


def test_an_interrupt_during_an_import_waits_for_the_import_to_end(tmp_path):
    (tmp_path / "slow_module.py").write_text(IMPORTED)
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    verdict, imported, seconds = out.stdout.split()
    assert (verdict, imported) == ("interrupted", "True"), out.stdout + out.stderr  # the module whole, then raised
    assert 0.5 <= float(seconds) < 2  # right after the import, not at the end of the next sleep


@pytest.mark.slow
def test_interrupts_during_export_leave_no_done_marker_no_temp_files_and_no_children(tmp_path):
    data = write_rows(tmp_path / "addresses.jsonl", rows(30))
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    base = ["task=custom", "task.kind=extraction", "task.fields=[AddressNumber,StreetName,StreetNamePostType,"
            "PlaceName,StateName]", *data_args(data), *TINY, "method=lora", "export.gguf.quant_types=[Q8_0]",
            f"run_dir={run_dir}"]
    prepared = cli(*base, "stages=[data,train]")
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    proc = _start_and_wait_for([*base, "stages=[merge]"], "[merge] starting", tmp_path / "merge.log")
    time.sleep(0.3)  # while it loads and merges the weights
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "merge.log").read_text()[-3000:]
    assert not run.is_done("merge") and not run.merged_dir.exists() and not list(run_dir.rglob(".tmp-*"))
    merged = cli(*base, "stages=[merge]")
    assert merged.returncode == 0, merged.stderr[-3000:]

    # Ctrl-C while quantizing (it used to be swallowed inside llama.cpp's log callback), SIGTERM while converting.
    for sig, code, child in ((signal.SIGINT, 130, "finetune.export.llama_quantize"),
                             (signal.SIGTERM, 143, "convert_hf_to_gguf")):
        proc = _start_and_wait_for([*base, "stages=[gguf]"], "[gguf] starting", tmp_path / "gguf.log")
        deadline = time.time() + 120
        while not _converters(run_dir, (child,)):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "gguf.log").read_text()[-2000:]
            time.sleep(0.02)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, (tmp_path / "gguf.log").read_text()[-3000:]
        assert "the stage in flight was not marked done" in (tmp_path / "gguf.log").read_text()
        assert not run.is_done("gguf")
        assert not list(run_dir.rglob(".tmp-*")), list(run_dir.rglob(".tmp-*"))
        time.sleep(0.5)
        assert not _converters(run_dir)

    proc = _start_and_wait_for([*base, "stages=[gguf]"], "[gguf] starting", tmp_path / "gguf.log")
    deadline = time.time() + 120
    while not _converters(run_dir):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the children must still go
    proc.wait(timeout=60)
    time.sleep(1.0)
    assert not _converters(run_dir) and not run.is_done("gguf")

    done = cli(*base, "stages=[gguf]")  # and the next run cleans up and finishes
    assert done.returncode == 0, done.stderr[-3000:]
    assert run.is_done("gguf") and not list(run_dir.rglob(".tmp-*"))
