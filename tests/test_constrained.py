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
from finetune.tasks.copying import AUTO_SHARE, copy_pattern, pieces, with_copy_patterns
from finetune.tasks.copying import fits as copy_fits
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


# ---- values copied from the input (finetune.tasks.copying) ------------------------------------------------


def address_data(root) -> list[dict]:
    return [json.loads(x) for x in (root / "data/extraction/addresses.jsonl").read_text().splitlines() if x]


def copying_task(overrides=(), root=None):
    """The extraction task after learn_from_train on every bundled address (as the data stage settles it)."""
    task = get_task(compose(["task=extraction", *overrides]).task)
    rows = address_data(root)
    task.learn_from_train([task.check_output(r["output"]) for r in rows], [r["input"] for r in rows])
    return task, rows


def test_address_answers_copy_their_input_so_the_constraint_turns_on(root):
    task, rows = copying_task(root=root)
    assert task.copy_values and task.per_input
    assert AUTO_SHARE <= task.learned["values_copied_share"] < 1  # a few answers normalize their input
    assert "from 98%" in task.learned["values_copied_from"]
    off, _ = copying_task(["task.copy_values=false"], root)
    assert not off.copy_values and off.learned["values_copied_share"] == task.learned["values_copied_share"]
    assert off.answer_grammars(["1 Main St"]) == off.answer_grammar()  # one grammar for every row
    # Answers that rewrite their input (a normalized date) leave it off by themselves.
    dates = get_task(compose(["task=custom", "task.kind=extraction", "task.fields=[date,who]"]).task)
    dates.learn_from_train([{"date": "2020-01-02", "who": "Ann"}] * 3, ["Ann wrote on Jan 2, 2020"] * 3)
    assert dates.copy_values is False and dates.learned["values_copied_share"] == 0.0


def test_copy_pattern_is_the_inputs_pieces():
    text = '8128 S. DR MARTIN-LUTHER KING JR Drive, Apt #4 (rear) 1/2 a+b say "hi" C:\\x'
    assert pieces(text)[:6] == ["8128", "S", ".", "DR", "MARTIN", "-"]
    assert '"' not in pieces(text) and "\\" not in pieces(text)  # a pattern cannot say their JSON escapes
    answer = {"AddressNumber": "8128", "StreetNamePreDirectional": "S.", "StreetName": "DR MARTIN-LUTHER KING JR",
              "OccupancyIdentifier": "#4", "BuildingName": "(rear)", "LandmarkName": "1/2 a+b", "x": 3}
    assert copy_fits(text, answer)
    for wrong in ("Brockwood", "8129", "dr", "S. ", " S", "S  .", "", "hi\"", "Drivex", "KINGJR"):
        assert not copy_fits(text, {"StreetName": wrong}), wrong
    assert copy_fits(text, {"StreetName": ["DR", "KING JR"]}) and not copy_fits(text, {"StreetName": ["DR", "KNG"]})
    schema = {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}}, "n": {"type": "integer"},
        "e": {"type": "string", "enum": ["x"]}}}
    held = with_copy_patterns(schema, text)
    ref = {"$ref": "#/$defs/copied"}
    assert held["properties"]["a"] == held["properties"]["b"]["items"] == ref
    assert held["$defs"]["copied"] == {"type": "string", "pattern": copy_pattern(text)}
    assert held["properties"]["n"] == schema["properties"]["n"]
    assert held["properties"]["e"] == {"type": "string", "enum": ["x"]}
    assert schema["properties"]["a"] == {"type": "string"}  # the task's schema is not changed


def test_copy_grammar_admits_copies_of_its_own_row_only(smollm2, lltok, root):
    """The per-row grammar (llama.cpp's converter of the schema with patterns) accepts what copying.fits
    accepts, in llguidance and in llama.cpp's own grammar parser; another row's words are refused."""
    from llama_cpp import LlamaGrammar

    _, tokenizer, _ = smollm2
    task, rows = copying_task(root=root)
    text = "1044 Lake Shore Boulevard, Evanston, 60202 Apt #4 (rear) 1/2"
    grammar = task.answer_grammar(text)
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp parses it
    good = [{"AddressNumber": "1044", "StreetName": "Lake Shore", "StreetNamePostType": "Boulevard",
             "PlaceName": "Evanston", "ZipCode": "60202"}, {"OccupancyIdentifier": "#4"},
            {"BuildingName": "(rear)"}, {"AddressNumberSuffix": "1/2"}, {"PlaceName": "Evanston,"}]
    bad = [{"PlaceName": "Evanstone"}, {"PlaceName": "Chicago"}, {"StreetName": "lake shore"}, {"ZipCode": "60202 "}]
    for answer in good + bad:
        expected = answer in good
        assert copy_fits(text, answer) == expected, answer
        assert fits(lltok, tokenizer, grammar, task.answer_text(answer)) == expected, answer
    assert not fits(lltok, tokenizer, grammar, '{"AddressNumber":1044}')  # still the schema's types
    assert task.answer_grammars([text, "9 Elm Avenue"])[0] == grammar
    assert not fits(lltok, tokenizer, task.answer_grammar("9 Elm Avenue"), task.answer_text(good[0]))
    # The training answers that copy their input fit their own row's grammar (every 25th row: ~60 compiles).
    for row in rows[::25]:
        answer = task.check_output(row["output"])
        assert fits(lltok, tokenizer, task.answer_grammar(row["input"]), task.answer_text(answer)) == \
            copy_fits(row["input"], answer), row


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


def test_each_row_decodes_under_its_own_copy_grammar(smollm2, root):
    """One grammar per prompt in one call, in every generation path: every value of a finished answer is
    copied from that row's input, and llama.cpp's batched answers equal its one-at-a-time ones. With the
    grammars handed to the wrong rows, the answers copy the wrong rows' inputs: each row follows its own."""
    from finetune.runtimes.llamacpp_batch import generate_llama_cpp_batched

    cfg, tokenizer, model = smollm2
    gguf = packaged_gguf_path(cfg.model)
    task, _ = copying_task(root=root)
    shots = address_rows(task, "shot", ADDRESSES[:3])
    inputs = ["1044 Lake Shore Boulevard, Evanston, 60202", "9912 S. Avenue H", ADDRESSES[3][0], ADDRESSES[4][0]]
    prompt_list = prompts(task, tokenizer, cfg.model, inputs, shots)  # zero- and few-shot of each input
    row_inputs = [x for x in inputs for _ in range(2)]
    sampling = Sampling(max_new_tokens=64)

    def llama(grammars, parallel=1):
        common = dict(n_ctx=1024, n_threads=1, bos_token=tokenizer.bos_token, grammar=grammars)
        if parallel > 1:
            return generate_llama_cpp_batched(gguf, prompt_list, STOP, sampling, parallel=parallel, **common)
        return generate_llama_cpp(gguf, prompt_list, STOP, sampling, **common)

    def check(outputs, texts):
        finished = [(x, json.loads(g.text)) for x, g in zip(texts, outputs) if g.stopped]
        assert len(finished) >= len(outputs) // 2, [g.text for g in outputs]
        assert any(answer for _, answer in finished)
        for x, answer in finished:
            assert copy_fits(x, answer), (x, answer)

    own = task.answer_grammars(row_inputs)
    one_at_a_time = llama(own)
    check(one_at_a_time, row_inputs)
    assert [g.text for g in llama(own, parallel=4)] == [g.text for g in one_at_a_time]
    with torch_threads(1):
        for continuous in (True, False):
            check(generate_transformers(model, tokenizer, prompt_list, STOP, sampling, batch_size=4, grammar=own,
                                        continuous=continuous), row_inputs)
    swapped = row_inputs[2:] + row_inputs[:2]
    check(llama(task.answer_grammars(swapped), parallel=4), swapped)


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
