"""Constrained decoding with the real packaged SmolLM2 (untrained for these tasks): each task kind's answer
constraint, its GBNF grammar in transformers (llguidance) and llama.cpp, what the base model answers
under it, and the files the export writes for Ollama and llama.cpp users."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from address_rows import ADDRESSES, address_rows

from finetune.core.config import compose
from finetune.core.hardware import torch_threads
from finetune.core.rundir import RunDir
from finetune.evaluate.stage import with_shots
from finetune.models.gguf_source import packaged_gguf_path
from finetune.models.loading import load_model, load_tokenizer, render_prompt
from finetune.runtimes.constrained import accepts, grammar_matcher, llguidance_tokenizer
from finetune.runtimes.generation import Sampling
from finetune.runtimes.llamacpp import generate_llama_cpp
from finetune.runtimes.transformers import generate_transformers, stop_token_ids
from finetune.tasks import get_task
from finetune.tasks.grammar import gbnf_literal, labels_gbnf

STOP = ["<|im_end|>"]
SMS = [
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! Call 09061701461.",
    "Are we still on for lunch tomorrow? I can be there by one.",
    "URGENT! Your mobile number has won £2000 bonus caller prize. Call 09058094455 from land line.",
    "Sorry, I'll call later, in a meeting.",
]


def tasks():
    return {kind: get_task(compose([f"task={kind}"]).task) for kind in ("extraction", "classification")}


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose(["task=extraction"])
    return cfg, load_tokenizer(cfg.model), load_model(cfg.model)


@pytest.fixture(scope="module")
def lltok(smollm2):
    _, tokenizer, _ = smollm2
    return llguidance_tokenizer(tokenizer, stop_token_ids(tokenizer, STOP), len(tokenizer))


def fits(lltok, tokenizer, grammar: str, text: str) -> bool:
    """The whole text is an answer the grammar accepts (the stop token may follow)."""
    return accepts(grammar_matcher(lltok, grammar), tokenizer(text, add_special_tokens=False)["input_ids"])


def is_prefix(lltok, tokenizer, grammar: str, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return grammar_matcher(lltok, grammar).validate_tokens(ids) == len(ids)


def prompts(task, tokenizer, model_cfg, inputs: list[str], shots: list[dict]) -> list[str]:
    return [render_prompt(tokenizer, with_shots(task.prompt_messages(x), s), model_cfg) for x in inputs for s in
            ([], shots)]


# ---- the constraint and its grammar (tokenizer only) ---------------------------------------------------


def test_extraction_constraint_is_the_field_list_as_a_schema():
    task = tasks()["extraction"]
    schema = task.answer_constraint()
    assert list(schema["properties"]) == task.fields  # the order trained answers write
    assert all(p == {"type": "string"} for p in schema["properties"].values())
    assert schema["type"] == "object" and schema["additionalProperties"] is False and "required" not in schema

    typed = get_task(compose(["task=custom", "task.kind=extraction", "task.fields=[when,tags,n,who]",
                              "+task.json_schema={properties: {who: {type: string}, n: {type: integer}, "
                              "tags: {type: array}, when: {type: array, items: {type: number}}}}"]).task)
    props = typed.answer_constraint()["properties"]
    assert list(props) == ["when", "tags", "n", "who"]
    assert props == {"when": {"type": "array", "items": {"type": "number"}},
                     "tags": {"type": "array", "items": {"type": "string"}},
                     "n": {"type": "integer"}, "who": {"type": "string"}}
    assert get_task(compose(["task=summarization"]).task).answer_grammar() is None


def test_label_grammar_is_the_bare_labels(smollm2, lltok):
    _, tokenizer, _ = smollm2
    task = tasks()["classification"]
    grammar = task.answer_grammar()
    assert grammar == labels_gbnf(["ham", "spam"]) == 'root ::= "ham" | "spam"\n'
    for label in ("ham", "spam"):
        assert fits(lltok, tokenizer, grammar, label)
    for wrong in ("Ham", "spam.", " ham", '"ham"', "hamspam"):
        assert not fits(lltok, tokenizer, grammar, wrong), wrong
    hostile = ['say "no"', "back\\slash", "two\nlines", "tab\there"]
    assert gbnf_literal(hostile[0]) == '"say \\"no\\""' and gbnf_literal(hostile[2]) == '"two\\nlines"'
    for label in hostile:
        assert fits(lltok, tokenizer, labels_gbnf(hostile), label), label


def test_every_trained_answer_fits_its_grammar(smollm2, lltok, root):
    """The constraint never blocks an answer the model is trained to write (bundled data, every row)."""
    _, tokenizer, _ = smollm2
    task = tasks()["extraction"]
    grammar = task.answer_grammar()
    rows = [json.loads(x) for x in (root / "data/extraction/addresses.jsonl").read_text().splitlines() if x]
    rejected = [r["input"] for r in rows if not fits(lltok, tokenizer, grammar,
                                                     task.answer_text(task.check_output(r["output"])))]
    assert not rejected, rejected[:5]


# ---- generation under the constraint: transformers and llama.cpp ------------------------------------------


def check_extraction(task, lltok, tokenizer, free, held) -> None:
    grammar = task.answer_grammar()
    assert sum(g.stopped for g in held) >= len(held) // 2
    for g in held:
        assert is_prefix(lltok, tokenizer, grammar, g.text), g.text  # even an answer cut at max_new_tokens
        if g.stopped:
            answer = json.loads(g.text)
            assert set(answer) <= set(task.fields) and all(isinstance(v, str) for v in answer.values()), answer
            assert list(answer) == [k for k in task.fields if k in answer]  # the field order
    satisfied = [i for i, g in enumerate(free) if g.stopped and fits(lltok, tokenizer, grammar, g.text)]
    assert satisfied, [g.text for g in free]  # otherwise the identity below would test nothing
    for i in satisfied:
        assert (held[i].text, held[i].n_tokens) == (free[i].text, free[i].n_tokens)


def check_classification(task, free, held) -> None:
    assert all(g.text in task.labels and g.stopped for g in held), [g.text for g in held]
    satisfied = [i for i, g in enumerate(free) if g.text in task.labels and g.stopped]
    assert satisfied, [g.text for g in free]
    for i in satisfied:
        assert held[i].text == free[i].text


def both(generate, task, prompt_list, max_new_tokens):
    sampling = Sampling(max_new_tokens=max_new_tokens)
    return generate(prompt_list, sampling, None), generate(prompt_list, sampling, task.answer_grammar())


def check_both_tasks(generate, ts, cfg, tokenizer, lltok) -> None:
    """Few-shot address extraction and SMS classification through `generate`, with and without the constraint."""
    ext = ts["extraction"]
    shots = address_rows(ext, "shot", ADDRESSES[:3])
    ext_prompts = prompts(ext, tokenizer, cfg.model, [a for a, _ in ADDRESSES[3:5]], shots)
    check_extraction(ext, lltok, tokenizer, *both(generate, ext, ext_prompts, 64))

    cls = ts["classification"]
    shots = [{"prompt": cls.prompt_messages(SMS[0]), "completion": [{"role": "assistant", "content": "spam"}]},
             {"prompt": cls.prompt_messages(SMS[1]), "completion": [{"role": "assistant", "content": "ham"}]}]
    check_classification(cls, *both(generate, cls, prompts(cls, tokenizer, cfg.model, SMS[2:], shots), 4))


def test_transformers_answers_fit_the_constraint(smollm2, lltok):
    """Zero-shot and few-shot prompts in one padded batch; the few-shot answers of the base model already
    fit the schema, and must come out unchanged."""
    cfg, tokenizer, model = smollm2
    ts = tasks()

    def generate(prompt_list, sampling, grammar):
        with torch_threads(1):
            return generate_transformers(model, tokenizer, prompt_list, STOP, sampling, batch_size=8, grammar=grammar)

    check_both_tasks(generate, ts, cfg, tokenizer, lltok)


def test_llama_cpp_answers_fit_the_constraint(smollm2, lltok):
    cfg, tokenizer, _ = smollm2
    gguf = packaged_gguf_path(cfg.model)
    ts = tasks()

    def generate(prompt_list, sampling, grammar):
        return generate_llama_cpp(gguf, prompt_list, STOP, sampling, n_ctx=1024, n_threads=1,
                                  bos_token=tokenizer.bos_token, grammar=grammar)

    check_both_tasks(generate, ts, cfg, tokenizer, lltok)


# ---- what the export gives users ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["extraction", "classification", "summarization"])
def test_export_writes_the_schema_ollama_gets(tmp_path, kind):
    from finetune.export.card import model_card
    from finetune.export.ollama.gotemplate import go_available
    from finetune.export.ollama.modelfile import write_modelfiles

    verify = kind == "extraction" and go_available()  # Ollama's parser reads the Modelfile with its new header
    cfg = compose([f"task={kind}", f"run_dir={tmp_path}", "export.ollama.create=false", "evaluate.n_threads=1",
                   f"export.verify={str(verify).lower()}"])
    run = RunDir(tmp_path)
    run.gguf_dir.mkdir()
    os.symlink(packaged_gguf_path(cfg.model), run.gguf_path(cfg.model.name, cfg.task.name, "Q4_1"))
    run.answer_schema_path.write_text("{}")  # stale, from an earlier task
    write_modelfiles(cfg, run)
    task = get_task(cfg.task)
    modelfile = run.modelfile_path("Q4_1").read_text()
    card = model_card(cfg, run, {})
    if kind == "summarization":
        assert not run.answer_schema_path.exists() and not run.answer_grammar_path.exists()
        assert "format" not in modelfile and "### Constrained answers" not in card
        return
    schema = json.loads(run.answer_schema_path.read_text())
    assert schema == (task.answer_constraint() if kind == "extraction" else {"type": "string", "enum": task.labels})
    assert run.answer_grammar_path.read_text() == task.answer_grammar()
    curl = next(line for line in modelfile.splitlines() if line.startswith("#   curl "))
    args = shlex.split(curl[len("#   "):])
    assert args[:3] == ["curl", "http://localhost:11434/api/chat", "-d"]
    body = json.loads(args[3])
    assert body["format"] == schema and body["stream"] is False and body["model"] == "smollm2-" + kind + ":q4_1"
    assert "--grammar-file answer.gbnf" in modelfile
    assert f"json.load(open({json.dumps(str(run.answer_schema_path))}))" in card and "format=schema" in card
    assert f"--grammar-file {run.answer_grammar_path}" in card
    assert ("label in quotes" in card) == (kind == "classification")
