"""Every config value outside its valid range, each with the range: checked before any stage runs."""

from __future__ import annotations

import importlib.util

from finetune.core.config import Config


def value_problems(cfg: Config) -> list[str]:
    """Every config value outside its valid range, each with the range (checked before any stage runs)."""
    m, d, ev, ex, r = cfg.method, cfg.task.data, cfg.evaluate, cfg.export, cfg.route
    checks = [
        (m.max_steps >= 1 or m.max_steps == -1, f"method.max_steps={m.max_steps}: must be >= 1, or -1 (use epochs)"),
        (m.max_steps != -1 or m.epochs > 0, f"method.epochs={m.epochs}: must be > 0 when method.max_steps=-1"),
        (m.lr > 0, f"method.lr={m.lr}: must be > 0 (typical LoRA: 1e-4 to 1e-3)"),
        (m.budget_minutes is None or m.budget_minutes > 0,
         f"method.budget_minutes={m.budget_minutes}: must be > 0, or null (train method.epochs / max_steps)"),
        (m.batch_size >= 1, f"method.batch_size={m.batch_size}: must be >= 1"),
        (m.grad_accum >= 1, f"method.grad_accum={m.grad_accum}: must be >= 1"),
        (m.max_length >= 16, f"method.max_length={m.max_length}: must be >= 16 tokens"),
        (str(m.name) == "full" or m.lora_r >= 1, f"method.lora_r={m.lora_r}: must be >= 1"),
        (str(m.name) == "full" or m.lora_alpha > 0, f"method.lora_alpha={m.lora_alpha}: must be > 0"),
        (0 <= m.lora_dropout < 1, f"method.lora_dropout={m.lora_dropout}: must be in [0, 1)"),
        (0 <= m.warmup_ratio < 1, f"method.warmup_ratio={m.warmup_ratio}: must be in [0, 1)"),
        (m.weight_decay >= 0, f"method.weight_decay={m.weight_decay}: must be >= 0"),
        (m.max_grad_norm > 0, f"method.max_grad_norm={m.max_grad_norm}: must be > 0"),
        (m.eval_steps >= 0, f"method.eval_steps={m.eval_steps}: must be >= 0 (0: no evaluation loss)"),
        (m.metric_examples is None or m.metric_examples >= 0,
         f"method.metric_examples={m.metric_examples}: must be >= 0 (0: no task metric)"),
        (m.best_by in ("loss", "task"), f"method.best_by={m.best_by}: must be loss or task"),
        (m.best_by == "loss" or m.metric_examples is None or m.metric_examples > 0,
         "method.best_by=task needs validation rows to score: set method.metric_examples > 0"),
        (m.save_steps >= 1, f"method.save_steps={m.save_steps}: must be >= 1"),
        (m.logging_steps >= 1, f"method.logging_steps={m.logging_steps}: must be >= 1"),
        (m.eval_examples is None or m.eval_examples >= 1, f"method.eval_examples={m.eval_examples}: must be >= 1"),
        (not m.liger_kernel or (str(cfg.device) != "cpu" and importlib.util.find_spec("liger_kernel") is not None),
         "method.liger_kernel=true needs a CUDA GPU (device=auto or cuda) and `pip install liger-kernel`"),
        (0 <= d.validation_fraction < 1, f"task.data.validation_fraction={d.validation_fraction}: must be in [0, 1)"),
        (0 <= d.test_fraction < 1, f"task.data.test_fraction={d.test_fraction}: must be in [0, 1)"),
        (d.validation_fraction + d.test_fraction < 1,
         f"task.data.validation_fraction + test_fraction = {d.validation_fraction + d.test_fraction}: must be < 1"),
        (d.max_train_examples is None or d.max_train_examples >= 1,
         f"task.data.max_train_examples={d.max_train_examples}: must be >= 1"),
        (d.max_eval_examples is None or d.max_eval_examples >= 1,
         f"task.data.max_eval_examples={d.max_eval_examples}: must be >= 1"),
        (cfg.task.max_new_tokens >= 1, f"task.max_new_tokens={cfg.task.max_new_tokens}: must be >= 1"),
        (ev.max_examples is None or ev.max_examples >= 1, f"evaluate.max_examples={ev.max_examples}: must be >= 1"),
        (ev.batch_size >= 1, f"evaluate.batch_size={ev.batch_size}: must be >= 1"),
        (ev.base_few_shot >= 0, f"evaluate.base_few_shot={ev.base_few_shot}: must be >= 0"),
        (not ev.do_sample or ev.temperature > 0, f"evaluate.temperature={ev.temperature}: must be > 0"),
        (0 < ev.top_p <= 1, f"evaluate.top_p={ev.top_p}: must be in (0, 1]"),
        (ev.llama_cpp_parallel >= 1, f"evaluate.llama_cpp_parallel={ev.llama_cpp_parallel}: must be >= 1"),
        (ev.n_threads is None or ev.n_threads >= 1, f"evaluate.n_threads={ev.n_threads}: must be >= 1"),
        (set(ev.vllm) <= {"merged", "gptq"},
         f"evaluate.vllm={list(ev.vllm)}: name merged and/or gptq, the checkpoints vLLM can serve"),
        (ev.vllm_parallel >= 1, f"evaluate.vllm_parallel={ev.vllm_parallel}: must be >= 1"),
        (r.strong_few_shot >= 0, f"route.strong_few_shot={r.strong_few_shot}: must be >= 0"),
        (r.validation_examples is None or r.validation_examples >= 10,
         f"route.validation_examples={r.validation_examples}: must be >= 10 (the threshold is chosen on them)"),
        (0 <= r.max_escalated <= 1, f"route.max_escalated={r.max_escalated}: must be in [0, 1]"),
        (0.5 <= r.min_confidence < 1, f"route.min_confidence={r.min_confidence}: must be in [0.5, 1)"),
        (r.timeout_s > 0, f"route.timeout_s={r.timeout_s}: must be > 0"),
        (not r.strong or not str(r.strong).startswith(("http://", "https://")) or bool(r.strong_model),
         f"route.strong={r.strong} is an endpoint: name its model with route.strong_model=NAME"),
        (ex.gptq is None or ex.gptq.bits in (2, 3, 4, 8), "export.gptq.bits: must be 2, 3, 4 or 8"),
        (ex.gptq is None or ex.gptq.calibration_samples >= 1, "export.gptq.calibration_samples: must be >= 1"),
        (ex.ollama is None or ex.ollama.num_ctx is None or ex.ollama.num_ctx >= 1,
         "export.ollama.num_ctx: must be >= 1 (or null: sized to the data)"),
        (ex.merge or (ex.gptq is None and ex.gguf is None),
         "export.merge=false, but GPTQ and GGUF are made from the merged model: set export.merge=true"),
        (ex.ollama is None or ex.gguf is not None, "export.ollama needs export.gguf (a Modelfile points at a GGUF)"),
    ]
    return [message for ok, message in checks if not ok]
