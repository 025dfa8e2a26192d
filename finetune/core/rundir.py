"""The run directory: every path a stage reads or writes, and the markers of finished stages.

    outputs/<model>-<task>/<time>/
      run.json  config.yaml        who made the run (model, task, method, command) and its composed config
      stages/<stage>.json          the summary of a finished stage (its "done" marker)
      data/{train,validation,test}.jsonl  data/validation_report.json
      checkpoints/  adapter/  train_log.json  tracking.json
      merged/  gptq/  gguf/<model>-<task>-<QUANT>.gguf  gguf/Modelfile.<QUANT>
      predictions/<name>.jsonl  metrics.json  report.md  plots/
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.core.files import write_json_atomic

SPLITS = ("train", "validation", "test")


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

    # ---- stage markers
    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_marker(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self.stage_marker(stage).is_file()

    def stage_summary(self, stage: str) -> dict:
        return json.loads(self.stage_marker(stage).read_text())

    def mark_done(self, stage: str, summary: dict) -> None:
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.stage_marker(stage), summary)

    def clear(self, stage: str) -> None:
        self.stage_marker(stage).unlink(missing_ok=True)


_QUANT = re.compile(r"(?i)(i?q\d\w*|bf16|f16|f32)")


def quant_of(gguf: Path) -> str | None:
    """The quant type in a GGUF file name (model-Q4_K_M.gguf, model.q8_0.gguf -> Q4_K_M, Q8_0); None if
    the name shows none."""
    last = re.split(r"[-.]", Path(gguf).stem)[-1]
    return last.upper() if _QUANT.fullmatch(last) else None
