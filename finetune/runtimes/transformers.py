"""Generation and stop tokens in transformers: base, adapter, merged and GPTQ models, batched, optionally
under a GBNF grammar (finetune.runtimes.constrained)."""

from __future__ import annotations

import time
from typing import Any

from finetune.core.errors import ConfigError
from finetune.runtimes.generation import Generation, Grammars, Sampling, adds_bos, per_prompt


def stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> list[int]:
    """Ids of the model's end-of-turn tokens; an unknown token is a config error, not a silent no-stop."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == unk and token != tokenizer.unk_token):
            raise ValueError(f"stop token {token!r} (model.stop_tokens) is not in the tokenizer's vocabulary")
        ids.append(int(token_id))
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def generate_transformers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    stop_tokens: list[str],
    sampling: Sampling,
    batch_size: int = 16,
    grammar: Grammars = None,
    logprobs: bool = True,
    continuous: bool = True,
) -> list[Generation]:
    """Batched generation with left padding; prompts are length-sorted to waste little on padding.

    `grammar`: a GBNF grammar (finetune.tasks.grammar.gbnf_grammar) every answer must match, or a list of
    one per prompt, enforced through llguidance; the same grammar llama.cpp's generate_llama_cpp takes.
    `logprobs`: record each answer token's log-probability under the raw scores (Generation.logprobs).
    `continuous`: greedy answers through finetune.runtimes.transformers_batch, where finished answers leave
    the batch and waiting prompts take their slots (`batch_size` of them), where the model allows it;
    otherwise (and when sampling) each batch of `batch_size` prompts is one model.generate call, as long as
    its longest answer."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    lltokenizer = None
    grammars = per_prompt(grammar, len(prompts))
    if any(g is not None for g in grammars):
        from finetune.runtimes.constrained import llguidance_tokenizer

        head = model.get_output_embeddings()
        n_vocab = max(len(tokenizer), int(head.weight.shape[0]) if head is not None else 0)
        lltokenizer = llguidance_tokenizer(tokenizer, stop_ids, n_vocab)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    gen_cfg = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} if sampling.do_sample else {}),
    )
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    add_special = adds_bos(tokenizer.bos_token, prompts[0]) if prompts else True
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    model.eval()
    try:
        if continuous and not sampling.do_sample and prompts:
            from finetune.runtimes.transformers_batch import generate_continuous, supports_continuous

            if supports_continuous(model):
                return generate_continuous(model, tokenizer, prompts, order, stop_ids, sampling.max_new_tokens,
                                           batch_size, add_special, lltokenizer, grammars, logprobs)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special
            ).to(device)
            processors = LogitsProcessorList()
            recorder = None
            if logprobs:
                from finetune.runtimes.logprobs import TokenLogprobs

                recorder = TokenLogprobs()
                processors.append(recorder)  # first: the raw scores, before the grammar's mask
            if lltokenizer is not None:
                from finetune.runtimes.constrained import GrammarMask

                processors.append(GrammarMask(lltokenizer, [grammars[i] for i in idx], stop_ids))
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**batch, generation_config=gen_cfg, logits_processor=processors)
            latency = time.perf_counter() - t0
            generated = out[:, batch["input_ids"].shape[1] :]
            token_logprobs = recorder.rows(generated) if recorder is not None else [None] * len(idx)
            for i, tokens, lps in zip(idx, generated.tolist(), token_logprobs):
                end = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
                kept = tokens if end is None else tokens[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True)
                results[i] = Generation(text, len(kept), latency, stopped=end is not None, batch=start,
                                        logprobs=None if lps is None else [round(x, 5) for x in lps[: len(kept)]])
    finally:
        tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]


def generation_dtype(precision: str, device: str) -> Any:
    """evaluate.precision as a torch dtype: auto is bf16 on a GPU with bf16, else fp32."""
    import torch

    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError("evaluate.precision=fp16 needs a CUDA GPU; on a CPU use fp32 or bf16.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
