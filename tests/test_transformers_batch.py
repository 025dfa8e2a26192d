"""Continuous batching in transformers (finetune.runtimes.transformers_batch) against the per-batch
model.generate path, with the real packaged SmolLM2 in fp32: the same greedy answers, with and without the
task's grammar, while answers leave the batch and waiting prompts take their slots."""

from __future__ import annotations

import pytest
from address_rows import ADDRESSES, address_rows

from finetune.core.config import compose
from finetune.core.hardware import torch_threads
from finetune.evaluate.stage import with_shots
from finetune.models.loading import load_model, load_tokenizer, render_prompt
from finetune.runtimes.generation import Sampling
from finetune.runtimes.transformers import generate_transformers, stop_token_ids
from finetune.runtimes import transformers_batch
from finetune.runtimes.transformers_batch import (SHARED_MIN, decode_greedy, prefill, prefill_after, shared_prefix,
                                                  supports_continuous)
from finetune.tasks import get_task

STOP = ["<|im_end|>"]
LOOPER = "Write the numbers from 1 to 500, separated by commas, and nothing else."


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose(["task=extraction"])
    return cfg, get_task(cfg.task), load_tokenizer(cfg.model), load_model(cfg.model)


def extraction_prompts(cfg, task, tokenizer, zero_shot: bool = True) -> list[str]:
    """Address prompts, zero-shot (~80 tokens; the base model answers past 64 tokens) and two-shot (~215
    tokens; it answers in ~45), plus one chat question (~23)."""
    shots = address_rows(task, "shot", ADDRESSES[:2])
    out = []
    for k, (address, _) in enumerate(ADDRESSES[2:9]):
        if k % 2 or zero_shot:
            messages = task.prompt_messages(address)
            out.append(render_prompt(tokenizer, with_shots(messages, shots if k % 2 else []), cfg.model))
    return out + [render_prompt(tokenizer, [{"role": "user", "content": "Say hi."}], cfg.model)]


def answers(generate_out) -> list[tuple]:
    return [(g.text, g.n_tokens, g.stopped) for g in generate_out]


def both_paths(model, tokenizer, prompts, max_new_tokens, grammar=None, batch_size=3):
    sampling = Sampling(max_new_tokens=max_new_tokens)
    with torch_threads(1):
        return [generate_transformers(model, tokenizer, prompts, STOP, sampling, batch_size=batch_size,
                                      grammar=grammar, continuous=c) for c in (False, True)]


def test_the_default_model_takes_the_continuous_path(smollm2):
    _, _, _, model = smollm2
    assert supports_continuous(model)


def test_continuous_greedy_answers_equal_per_batch_generate(smollm2):
    """8 prompts through 3 slots: rows end at different steps (some at the limit), 5 join later."""
    cfg, task, tokenizer, model = smollm2
    prompts = extraction_prompts(cfg, task, tokenizer)
    per_batch, continuous = both_paths(model, tokenizer, prompts, max_new_tokens=64)
    assert answers(continuous) == answers(per_batch)
    stopped = [g.stopped for g in per_batch]
    assert any(stopped) and not all(stopped), stopped  # both kinds of ending happened
    assert len({g.n_tokens for g in per_batch}) > 2  # and at different steps
    assert tokenizer.padding_side == "right"  # restored for training code that shares the tokenizer


def test_continuous_answers_under_the_grammar_equal_per_batch_generate(smollm2):
    cfg, task, tokenizer, model = smollm2
    prompts = extraction_prompts(cfg, task, tokenizer)
    grammar = task.answer_grammar()
    per_batch, continuous = both_paths(model, tokenizer, prompts, max_new_tokens=64, grammar=grammar)
    assert answers(continuous) == answers(per_batch)
    with torch_threads(1):
        free = generate_transformers(model, tokenizer, prompts, STOP, Sampling(max_new_tokens=64), batch_size=3)
    assert answers(continuous) != answers(free)  # the grammar did change answers, and both paths followed it


def test_a_row_at_the_token_limit_leaves_the_others_unchanged(smollm2):
    """One answer that runs to max_new_tokens shares slots with the others, then leaves; theirs are the
    answers they get without it, and it gets the answer it gets alone."""
    cfg, task, tokenizer, model = smollm2
    prompts = extraction_prompts(cfg, task, tokenizer, zero_shot=False)
    looper = render_prompt(tokenizer, [{"role": "user", "content": LOOPER}], cfg.model)
    sampling = Sampling(max_new_tokens=64)
    with torch_threads(1):
        mixed = generate_transformers(model, tokenizer, [looper, *prompts], STOP, sampling, batch_size=2)
        without = generate_transformers(model, tokenizer, prompts, STOP, sampling, batch_size=2)
        alone = generate_transformers(model, tokenizer, [looper], STOP, sampling, batch_size=1)
    assert not mixed[0].stopped and mixed[0].n_tokens == 64  # it did run to the limit
    assert all(g.stopped for g in mixed[1:]) and sum(g.n_tokens for g in mixed[1:]) < 64 * 3  # the others did not
    assert answers(mixed[1:]) == answers(without)
    assert answers(mixed[:1]) == answers(alone)


def test_logprobs_are_the_raw_log_softmax_of_each_chosen_token(smollm2):
    """decode_greedy's per-token log-probabilities (what Generation.logprobs records) equal a teacher-forced
    forward pass over prompt + answer (+ the stop token), one row alone: no padding, no other rows."""
    import torch

    cfg, task, tokenizer, model = smollm2
    prompts = extraction_prompts(cfg, task, tokenizer, zero_shot=False)[-2:]  # a two-shot one and "Say hi"
    stop_ids = stop_token_ids(tokenizer, STOP)
    with torch_threads(1), torch.inference_mode():
        got = decode_greedy(model, tokenizer, prompts, [1, 0], stop_ids, 32, 2, True, want_logprobs=True)
        assert [a.stopped for a in got] == [False, True]  # one cut at the limit, one stopped
        for prompt, a in zip(prompts, got):
            assert len(a.logprobs) == len(a.tokens) + a.stopped
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            chosen = torch.tensor([a.tokens + ([stop_ids[0]] if a.stopped else [])])
            logits = model(input_ids=torch.cat([ids, chosen], dim=1)).logits[0, ids.shape[1] - 1 : -1]
            expected = torch.log_softmax(logits.float(), dim=-1).gather(1, chosen.T)[:, 0]
            assert torch.allclose(torch.tensor(a.logprobs), expected, atol=1e-4), (a.logprobs[:5], expected[:5])
            assert max(a.logprobs) <= 0 and min(a.logprobs) < -1e-3


def test_an_answer_the_grammar_never_steered_is_the_unconstrained_answer(smollm2):
    """Generation.steered: True exactly where the grammar changed a choice, so exactly where the unconstrained
    greedy answer differs; the evaluate stage reuses the others instead of decoding them again."""
    cfg, task, tokenizer, model = smollm2
    prompts = extraction_prompts(cfg, task, tokenizer, zero_shot=False)
    sampling = Sampling(max_new_tokens=64)
    with torch_threads(1):
        held = generate_transformers(model, tokenizer, prompts, STOP, sampling, batch_size=3,
                                     grammar=task.answer_grammar())
        free = generate_transformers(model, tokenizer, prompts, STOP, sampling, batch_size=3)
    steered = [g.steered for g in held]
    assert any(steered) and not all(steered), steered  # both kinds of row
    assert steered == [answers([h]) != answers([f]) for h, f in zip(held, free)]
    assert all(g.steered is None for g in free)  # nothing to steer without a grammar


def test_a_shared_opening_is_computed_once_and_gives_the_same_cache_and_answers(smollm2, monkeypatch):
    """Prompts that begin alike (the task's system prompt and template opening, zero- and two-shot) have that
    opening computed once: each row's cache, mask and first logits equal a whole-prompt prefill's (the padding
    moved in front of the prefix), and the answers equal per-batch generate's, with and without the grammar."""
    import torch

    import inspect

    cfg, task, tokenizer, model = smollm2
    parameters = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in parameters else "past_key_values"  # as decode_greedy names it
    prompts = extraction_prompts(cfg, task, tokenizer)[:-1]  # "Say hi" has another opening
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch_threads(1), torch.inference_mode():
        length, prefix = shared_prefix(model, ids, cache_kw)
        assert length >= SHARED_MIN and all(i[:length] == ids[0][:length] for i in ids)
        assert all(len(i) > length for i in ids) and len({i[length] for i in ids}) > 1  # the longest common opening
        logits, cache, mask = prefill_after(model, prefix, length, [i[length:] for i in ids], 0, cache_kw)
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = "right"
        logits_whole, cache_whole, mask_whole = prefill(model, enc["input_ids"], enc["attention_mask"], cache_kw)
    assert torch.equal(mask, mask_whole)
    assert torch.allclose(logits, logits_whole, atol=1e-4)
    real = mask.bool()[:, None, :, None]  # padding columns hold different filler on the two sides
    for ours, whole in zip(cache.layers, cache_whole.layers):
        assert ours.keys.shape == whole.keys.shape
        assert torch.allclose(ours.keys * real, whole.keys * real, atol=1e-4)
        assert torch.allclose(ours.values * real, whole.values * real, atol=1e-4)

    calls = []
    real_prefill_after = transformers_batch.prefill_after
    monkeypatch.setattr(transformers_batch, "prefill_after",
                        lambda *a, **k: calls.append(1) or real_prefill_after(*a, **k))
    for grammar in (None, task.answer_grammar()):
        per_batch, continuous = both_paths(model, tokenizer, prompts, max_new_tokens=48, grammar=grammar)
        assert answers(continuous) == answers(per_batch)
    assert len(calls) >= 4  # 7 prompts through 3 slots: later admissions went through the shared opening too
