"""Continuous batching in llama.cpp (finetune.runtimes.llamacpp_batch) answers as one prompt at a time does:
the packaged SmolLM2 GGUF, real rows of the bundled address task, real llama.cpp on both sides."""

from __future__ import annotations

import pytest

from finetune.core.config import compose
from finetune.core.errors import ConfigError
from finetune.data.prepare import split_task_data
from finetune.models.gguf_source import packaged_gguf_path
from finetune.models.loading import load_tokenizer, render_prompt
from finetune.runtimes.generation import Sampling, common_prefix
from finetune.runtimes.llamacpp import generate_llama_cpp, open_gguf, prompt_tokens
from finetune.runtimes.llamacpp_batch import (
    AnswerState,
    OWN_MIN,
    BatchedLlama,
    context_size,
    generate_llama_cpp_batched,
)

MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def address_task():
    """(GGUF, prompts, BOS text, stop strings, n_ctx): 8 test rows of the bundled address data, split as the
    data stage splits it, rendered as the evaluate stage renders them for a GGUF."""
    cfg = compose(["model=smollm2", "task=extraction"])
    rows = split_task_data(cfg.task)[2]["test"][:8]
    tokenizer = load_tokenizer(cfg.model)
    prompts = [render_prompt(tokenizer, r["prompt"], cfg.model) for r in rows]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return (packaged_gguf_path(cfg.model), prompts, tokenizer.bos_token, list(cfg.model.stop_tokens),
            context_size(longest, MAX_NEW_TOKENS))


def answers(gens):
    return [(g.text, g.n_tokens, g.stopped) for g in gens]


def test_greedy_answers_equal_one_at_a_time(address_task):
    """8 prompts through 3 slots: prompts replace finished ones, the last ones move down to consecutive
    slots. A stop string the base model writes in some answers cuts those where one-at-a-time cuts them."""
    gguf, prompts, bos, stops, n_ctx = address_task
    stops = [*stops, '"street_name_post_type"']
    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS)
    one = generate_llama_cpp(gguf, prompts, stops, sampling, n_ctx=n_ctx, n_threads=1, bos_token=bos)
    many = generate_llama_cpp_batched(gguf, prompts, stops, sampling, n_ctx=n_ctx, parallel=3, n_threads=1,
                                      bos_token=bos)
    assert answers(many) == answers(one)
    assert any(g.stopped for g in one) and any(not g.stopped for g in one)  # both endings are exercised
    assert sorted({g.batch for g in many}) == [0, 1, 2]
    assert all(g.latency_s > 0 for g in many)


def test_sampled_answers_equal_one_at_a_time(address_task):
    """Seeded temperature/top-p sampling draws each prompt's seed as create_completion does."""
    gguf, prompts, bos, stops, n_ctx = address_task
    sampling = Sampling(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    one = generate_llama_cpp(gguf, prompts[:5], stops, sampling, n_ctx=n_ctx, n_threads=1, bos_token=bos)
    many = generate_llama_cpp_batched(gguf, prompts[:5], stops, sampling, n_ctx=n_ctx, parallel=4, n_threads=1,
                                      bos_token=bos)
    assert answers(many) == answers(one)
    greedy = generate_llama_cpp_batched(gguf, prompts[:5], stops, Sampling(max_new_tokens=24), n_ctx=n_ctx,
                                        parallel=4, n_threads=1, bos_token=bos)
    assert answers(greedy) != answers(many)  # it did sample


def test_grammar_constrains_every_sequence(address_task):
    """A GBNF grammar per sequence: answers are what llama-cpp-python's own grammar path gives."""
    from llama_cpp import LlamaGrammar

    gguf, prompts, bos, stops, n_ctx = address_task
    grammar = 'root ::= "yes" | "no"'
    many = generate_llama_cpp_batched(gguf, prompts[:4], stops, Sampling(max_new_tokens=8), n_ctx=n_ctx,
                                      parallel=2, n_threads=1, bos_token=bos, grammar=grammar)
    with open_gguf(gguf, n_ctx=n_ctx, n_threads=1) as llm:
        one = [llm.create_completion(prompt_tokens(llm, p, bos), max_tokens=8, temperature=0.0, top_k=0, min_p=0.0,
                                     repeat_penalty=1.0, stop=stops, grammar=LlamaGrammar.from_string(grammar))
               for p in prompts[:4]]
    assert [g.text for g in many] == [o["choices"][0]["text"] for o in one]
    assert {g.text for g in many} <= {"yes", "no"} and all(g.stopped for g in many)


def test_greedy_grammar_checks_the_argmax_first_with_the_answers_of_the_full_mask(address_task, monkeypatch):
    """Greedy under the task's JSON-schema grammar: the batched path checks the unconstrained argmax against
    the grammar and masks the whole vocabulary only when it is refused; both happen on these rows, and the
    answers are what llama-cpp-python's grammar path (the whole vocabulary masked at every step) gives."""
    from llama_cpp import LlamaGrammar

    import finetune.runtimes.llamacpp_batch as batch
    from finetune.tasks import get_task

    gguf, prompts, bos, stops, n_ctx = address_task
    grammar = get_task(compose(["task=extraction"]).task).answer_grammar()
    checks: list[bool] = []
    accepts = batch.grammar_accepts

    def counted(*args):
        checks.append(accepts(*args))
        return checks[-1]

    monkeypatch.setattr(batch, "grammar_accepts", counted)
    many = generate_llama_cpp_batched(gguf, prompts[:4], stops, Sampling(max_new_tokens=MAX_NEW_TOKENS),
                                      n_ctx=n_ctx, parallel=3, n_threads=1, bos_token=bos, grammar=grammar)
    with open_gguf(gguf, n_ctx=n_ctx, n_threads=1) as llm:
        one = [llm.create_completion(prompt_tokens(llm, p, bos), max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                     top_k=0, min_p=0.0, repeat_penalty=1.0, stop=stops,
                                     grammar=LlamaGrammar.from_string(grammar))
               for p in prompts[:4]]
    assert [g.text for g in many] == [o["choices"][0]["text"] for o in one]
    assert True in checks and False in checks  # the argmax accepted, and refused then masked


def test_bad_settings_are_refused(address_task):
    gguf, prompts, bos, stops, n_ctx = address_task
    with pytest.raises(ConfigError, match="parallel=0"):
        generate_llama_cpp_batched(gguf, prompts, stops, Sampling(max_new_tokens=4), n_ctx=n_ctx, parallel=0)
    with pytest.raises(ConfigError, match="grammar"):
        generate_llama_cpp_batched(gguf, prompts[:2], stops, Sampling(max_new_tokens=4), n_ctx=n_ctx, n_threads=1,
                                   bos_token=bos, grammar="root ::= undefined_rule")
    with pytest.raises(ConfigError, match="more than n_ctx=256"):
        generate_llama_cpp_batched(gguf, [prompts[0] * 4], stops, Sampling(max_new_tokens=4), n_ctx=256,
                                   n_threads=1, bos_token=bos)


def test_answer_state_stops_as_create_completion():
    pieces = {1: b"ab", 2: b"cE", 3: b"ND", 6: b"xy\xe2", 7: b"\x82", 8: b"\xac!"}
    state = AnswerState([b"END"], max_tokens=10, bos=0, piece=pieces.__getitem__)
    assert not state.add(1, False) and not state.add(2, False)
    assert state.add(3, False)  # the stop string is cut off, its token counted
    assert (state.text, len(state.tokens), state.stopped) == (b"abc", 3, True)

    state = AnswerState([b"!"], max_tokens=1, bos=0, piece=pieces.__getitem__)
    assert not state.add(6, False)  # the text ends inside a UTF-8 character: no check, not even max_tokens
    assert not state.add(7, False)
    assert state.add(8, False)
    assert (state.text, len(state.tokens), state.stopped) == ("xy€".encode(), 3, True)
    state = AnswerState([], max_tokens=5, bos=0, piece=pieces.__getitem__)
    assert not state.add(1, False) and state.add(9, True)  # end of generation: not counted
    assert (state.text, len(state.tokens), state.stopped) == (b"ab", 1, True)


def test_common_prefix_leaves_each_prompt_two_tokens():
    assert common_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]], OWN_MIN) == 3
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 4]], OWN_MIN) == 2
    assert common_prefix([[1, 2, 3]], OWN_MIN) == 0
    assert context_size(107, 128) == 256 and context_size(120, 128) == 512


def test_one_prompt_per_call_keeps_the_shared_prefix_and_the_answers(address_task):
    """As a server answers (finetune-route): one prompt per call on one open BatchedLlama. From the second
    call on, the prefix shared with the previous prompt (system prompt, template) stays decoded; the answers
    are those of one-at-a-time create_completion, which keeps its own prompt cache the same way."""
    gguf, prompts, bos, stops, n_ctx = address_task
    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS)
    one = generate_llama_cpp(gguf, prompts[:4], stops, sampling, n_ctx=n_ctx, n_threads=1, bos_token=bos)
    with BatchedLlama(gguf, n_ctx=n_ctx, parallel=1, n_threads=1) as llama:
        served = [llama.generate([p], stops, sampling, bos_token=bos)[0] for p in prompts[:4]]
    assert answers(served) == answers(one)
    assert all(len(g.logprobs) == g.n_tokens for g in served)
