"""The model card (README.md) written next to the merged checkpoint."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from finetune.core.config import Config
from finetune.core.rundir import SPLITS, RunDir, ollama_model_name
from finetune.export.ollama.usage import curl_command, format_note, llama_cpp_grammar_args, python_call


def _count_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _metrics_table(run: RunDir) -> list[str]:
    if not run.metrics_path.is_file():
        return ["Not evaluated yet: `python -m finetune run_dir=... stages=[evaluate]` writes metrics.json."]
    metrics = json.loads(run.metrics_path.read_text())
    head = metrics.get("headline_metric", "")
    lines = [f"Test split, n = {metrics.get('n')}; headline metric `{head}`.", "",
             f"| model | {head} | tokens/s |", "|---|---|---|"]
    for name, entry in metrics.get("models", {}).items():
        score = entry.get(head, entry.get("error", ""))
        score = f"{score:.4f}" if isinstance(score, float) else str(score)
        tps = entry.get("tokens_per_s")
        lines.append(f"| {name} | {score} | {'' if tps is None else f'{tps:.1f}'} |")
    return lines


def constrained_lines(cfg: Config, run: RunDir, quant: str) -> list[str]:
    """How to get answers held to the task's constraint, as the evaluation decoded them."""
    curl = curl_command(cfg, quant, run)
    if curl is None:
        return []
    lines = ["", "### Constrained answers", "",
             f"The evaluation decodes under the task's answer constraint; ask Ollama for the same by passing "
             f"`{run.answer_schema_path}` (written with the Modelfiles) as `format`:", "",
             "```sh", curl, "```", "", "```python", *python_call(cfg, quant, str(run.answer_schema_path)), "```", ""]
    note = format_note(cfg, run)
    if note:
        lines += [note, ""]
    lines.append(f"llama.cpp takes the grammar itself: `{llama_cpp_grammar_args(str(run.answer_grammar_path))}` "
                 f"(as in the llama-cli line above).")
    return lines


def model_card(cfg: Config, run: RunDir, merge_info: dict) -> str:
    m, t, meth = cfg.model, cfg.task, cfg.method
    name = f"{m.name}-{t.name}"
    method = str(meth.name)
    counts = {s: _count_rows(run.split_path(s)) for s in SPLITS}
    train = run.stage_summary("train") if run.is_done("train") else {}
    lora = "" if method == "full" else f", LoRA r={meth.lora_r} alpha={meth.lora_alpha}"
    steps = train.get("global_step", meth.max_steps if meth.max_steps > 0 else f"{meth.epochs} epoch(s)")
    quant = (cfg.export.gguf.quant_types[0] if cfg.export.gguf and cfg.export.gguf.quant_types else "Q4_K_M").upper()
    ollama_name = ollama_model_name(m.name, t.name, quant)
    system = t.system_prompt.strip()
    lines = [
        "---",
        f"base_model: {m.hub_id}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [finetune, {method}, {t.name}]",
        "---",
        "",
        f"# {name}",
        "",
        f"{m.hub_id} ({m.params or '?'} parameters, `{m.family}` chat format) fine-tuned for one task: "
        f"{t.description or t.name}",
        "",
        "## Task",
        "",
        f"- kind: {t.kind}; answer parsed and scored by `finetune.tasks` ({t.name})",
        f"- user turn: `{t.prompt_template}`",
        f"- system prompt: {json.dumps(system) if system else '(none)'}",
        f"- data: {t.source or t.data.path or t.data.hub_dataset or '?'}; licence: {t.license or '?'}",
        f"- examples: train {counts['train']}, validation {counts['validation']}, test {counts['test']}",
        "",
        "## Training",
        "",
        f"- method: {method}{lora}, lr {meth.lr}, {steps} steps, max length {meth.max_length}",
        f"- merged in full precision; logits of merged vs adapter model: max |diff| = "
        f"{merge_info.get('merge_logits_max_diff')}",
        "",
        "## Results",
        "",
        *_metrics_table(run),
        "",
        "## Use it",
        "",
        "Transformers (this folder):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained({json.dumps(str(run.merged_dir))})",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(str(run.merged_dir))})",
        "messages = " + json.dumps(([{"role": "system", "content": system}] if system else [])
                                   + [{"role": "user", "content": t.prompt_template.replace("{input}", "...")}]),
        "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        f"out = model.generate(**ids, max_new_tokens={t.max_new_tokens}, do_sample=False)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Ollama (the GGUF export writes one Modelfile per quantization, chat template, stop tokens and "
        "system prompt included):",
        "",
        "```sh",
        f"cd {shlex.quote(str(run.gguf_dir))}",
        f"ollama create {shlex.quote(ollama_name)} -f {shlex.quote(run.modelfile_path(quant).name)}",
        f"ollama run {shlex.quote(ollama_name)} {shlex.quote(t.prompt_template.replace('{input}', '...'))}",
        "```",
        "",
        "llama.cpp:",
        "",
        "```sh",
        f"llama-cli -m {shlex.quote(str(run.gguf_path(m.name, t.name, quant)))} -cnv --temp 0"
        + (f" -sys {shlex.quote(system)}" if system else "")
        + (f" {llama_cpp_grammar_args(str(run.answer_grammar_path))}" if curl_command(cfg, quant, run) else ""),
        "```",
    ]
    lines += constrained_lines(cfg, run, quant)
    if cfg.export.gptq:
        lines += ["", f"A 4-bit GPTQ checkpoint is in `{run.gptq_dir}` (transformers + GPTQModel/optimum kernels)."]
    return "\n".join(lines) + "\n"
