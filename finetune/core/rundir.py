"""The run directory: every path a stage reads or writes, and the markers of finished stages.

    outputs/<model>-<task>/<time>/
      run.json  config.yaml        who made the run (model, task, method, command) and its composed config
      stages/<stage>.json          the summary of a finished stage (its "done" marker)
      data/{train,validation,test}.jsonl  data/validation_report.json
      checkpoints/  adapter/  train_log.json  tracking.json
      merged/  gptq/  gguf/<model>-<task>-<QUANT>.gguf  gguf/Modelfile.<QUANT>  gguf/schema.json  gguf/answer.gbnf
      predictions/<name>.jsonl  metrics.json  report.md  plots/
      router.json                  the route stage's router (finetune.route), served by finetune-route
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from finetune.core import interrupts
from finetune.core.errors import RunDirError
from finetune.core.files import TMP_PREFIX, write_json_atomic

log = logging.getLogger("finetune")

SPLITS = ("train", "validation", "test")
LOCK_NAME = ".lock"
# What Hydra writes into the run directory before our code runs (its config copy and the log).
HYDRA_ENTRIES = (".hydra",)


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory. Every stage reads and writes through these."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- what the run is
    @property
    def run_json(self) -> Path:  # model, task, method and the command that made the run
        return self.root / "run.json"

    @property
    def config_path(self) -> Path:  # the composed config, resolved
        return self.root / "config.yaml"

    # ---- data
    @property
    def data_dir(self) -> Path:  # train/validation/test.jsonl + validation_report.json
        return self.root / "data"

    def split_path(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"

    @property
    def validation_report_path(self) -> Path:
        return self.data_dir / "validation_report.json"

    # ---- training
    @property
    def checkpoints_dir(self) -> Path:  # trainer checkpoints (resume)
        return self.root / "checkpoints"

    @property
    def budget_path(self) -> Path:  # steps decided by method.budget_minutes, kept for a resume
        return self.checkpoints_dir / "budget.json"

    @property
    def adapter_dir(self) -> Path:  # final LoRA adapter (or full model for method=full)
        return self.root / "adapter"

    @property
    def train_log_path(self) -> Path:  # the trainer's log history
        return self.root / "train_log.json"

    @property
    def tracking_path(self) -> Path:  # W&B / MLflow run ids, so later stages log into the same run
        return self.root / "tracking.json"

    # ---- exports
    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gptq_dir(self) -> Path:
        return self.root / "gptq"

    @property
    def gguf_dir(self) -> Path:  # *.gguf + Modelfile.*
        return self.root / "gguf"

    def gguf_path(self, model: str, task: str, quant: str) -> Path:
        """gguf/<model>-<task>-<QUANT>.gguf: the one place this name is made (quant_of reads it back)."""
        return self.gguf_dir / f"{model}-{task}-{quant}.gguf"

    def gguf_files(self, model: str, task: str) -> list[Path]:
        """The run's GGUFs of this model and task, sorted by name."""
        return sorted(self.gguf_dir.glob(f"{model}-{task}-*.gguf")) if self.gguf_dir.is_dir() else []

    def modelfile_path(self, quant: str) -> Path:
        return self.gguf_dir / f"Modelfile.{quant}"

    @property
    def answer_schema_path(self) -> Path:  # the JSON schema a user passes as Ollama's `format`
        return self.gguf_dir / "schema.json"

    @property
    def answer_grammar_path(self) -> Path:  # the GBNF grammar for llama.cpp's --grammar-file
        return self.gguf_dir / "answer.gbnf"

    # ---- evaluation
    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def router_path(self) -> Path:  # the route stage's router: signals, weights, threshold, curves
        return self.root / "router.json"

    # ---- stage markers
    @property
    def this_run_path(self) -> Path:  # what the latest invocation ran, reused or invalidated
        return self.root / "this_run.json"

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_marker(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def started_marker(self, stage: str) -> Path:  # the inputs a stage last started from (resumable state)
        return self.stages_dir / f"{stage}.started.json"

    def is_done(self, stage: str) -> bool:
        return self.stage_marker(stage).is_file()

    def stage_summary(self, stage: str) -> dict:
        return json.loads(self.stage_marker(stage).read_text())

    def mark_done(self, stage: str, summary: dict) -> None:
        interrupts.check()  # a stage interrupted on the way (even where a library caught it) is not done
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.stage_marker(stage), summary)

    def clear(self, stage: str) -> None:
        self.stage_marker(stage).unlink(missing_ok=True)

    # ---- ownership
    def is_run_dir(self) -> bool:
        """A folder this program made: it has run.json, or markers of finished stages."""
        return self.run_json.is_file() or (self.stages_dir.is_dir() and any(self.stages_dir.glob("*.json")))

    def foreign_entries(self) -> list[str]:
        """What the folder holds that neither Hydra nor a run wrote: a reason to refuse it as a run directory."""
        if not self.root.is_dir():
            return []
        own = {*HYDRA_ENTRIES, LOCK_NAME}
        return sorted(p.name for p in self.root.iterdir()
                      if p.name not in own and not p.name.endswith(".log") and not p.name.startswith(TMP_PREFIX))

    def check_adoptable(self) -> None:
        """Refuse a folder that is not a run directory and holds anything of its own: we never write into,
        or delete from, a user's folder."""
        foreign = self.foreign_entries()
        if foreign and not self.is_run_dir():
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RunDirError(f"{self.root} is not a run directory (no run.json, no stages/) and is not empty "
                              f"({shown}); refusing to use it, so nothing in it is overwritten or deleted. "
                              f"Pass a new run_dir, or leave run_dir unset for a fresh one.")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process: a second run on it fails at once, naming the holder.

        flock is released by the kernel when its process ends, however it ends; the PID written into the
        lock file only says who holds it, and whether an earlier holder ended without cleaning up."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        fh = open(path, "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunDirError(f"run directory {self.root} is in use by {holder}; wait for that run to end, "
                                  f"or use another run_dir") from None
            fh.seek(0)
            before = fh.read().strip()
            pid = _pid_in(before)
            if pid is not None and pid != os.getpid() and not _alive(pid):
                log.warning("run directory %s: the previous run (%s) ended without releasing it (killed?); "
                            "its finished stages are checked before they are reused", self.root, before)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fh.flush()
                fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()


def ollama_model_name(model: str, task: str, quant: str) -> str:
    """The name `ollama create` gets for a run's GGUF: <model>-<task>:<quant>, lower case."""
    return f"{model}-{task}:{quant}".lower()


def comment_safe(text: str) -> str:
    """`text` on one line with only printable characters: safe inside a '#' comment of a Modelfile."""
    return "".join(c if c.isprintable() else " " for c in str(text))


def _pid_in(text: str) -> int | None:
    match = re.match(r"pid (\d+)", text)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_QUANT = re.compile(r"(?i)(i?q\d\w*|bf16|f16|f32)")


def quant_of(gguf: Path) -> str | None:
    """The quant type in a GGUF file name (model-Q4_K_M.gguf, model.q8_0.gguf -> Q4_K_M, Q8_0); None if
    the name shows none."""
    last = re.split(r"[-.]", Path(gguf).stem)[-1]
    return last.upper() if _QUANT.fullmatch(last) else None
