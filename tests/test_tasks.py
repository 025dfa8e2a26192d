"""Task kinds: forgiving parsing, strict metrics checked against hand-computed values, and the
specialist baselines on the real bundled test splits."""

from __future__ import annotations

import json

import pytest

from finetune.core.config import compose
from finetune.core.errors import ConfigError
from finetune.data.prepare import split_task_data
from finetune.pipeline import check_config
from finetune.tasks import BadExample, get_task


def task_for(*overrides: str):
    return get_task(compose(["task=custom", *overrides]).task)


@pytest.fixture(scope="module")
def bundled():
    """(task, rendered rows per split) of each bundled task: the seeded split, no token check."""
    out = {}
    for name in ("extraction", "classification", "summarization"):
        task, _, rows, _ = split_task_data(compose([f"task={name}"]).task)
        out[name] = (task, rows)
    return out


# ---- extraction ----------------------------------------------------------------------------


def test_extraction_parse_is_forgiving():
    task = task_for("task.kind=extraction", "task.fields=[A,B]")
    assert task.parse('{"A": "1"}') == {"A": "1"}
    assert task.parse('```json\n{"A": "1", "B": "x"}\n```') == {"A": "1", "B": "x"}
    assert task.parse('Here you go: {"A": "1"} -- done') == {"A": "1"}
    assert task.parse('{"A": "1", "B": "x",}') == {"A": "1", "B": "x"}  # trailing comma
    assert task.parse('{"A": "1"') is None  # cut off: not an object
    assert task.parse("[1, 2]") is None and task.parse("") is None and task.parse("no json") is None


def test_extraction_metrics_match_hand_computed_values():
    task = task_for("task.kind=extraction", "task.fields=[A,B,D]")
    refs = [{"A": "1", "B": "Main"}, {"A": "2"}, {"A": "3", "B": "Elm"}, {"B": "x"}]
    outs = [
        '{"A":"1","B":"MAIN "}',  # both right after normalization: exact
        '```json\n{"A": "2", "C": "z",}\n```',  # A right, C a key outside the fields: wrong pair
        'Sure! {"A":"3", "B": ""} hope this helps',  # A right, empty B = absent: B missed
        "no json here",  # invalid: B missed
    ]
    metrics, rows = task.score(refs, outs)
    # tp = 2+1+1+0 = 4, fp = 0+1+0+0 = 1, fn = 0+0+1+1 = 2
    assert metrics["field_precision"] == pytest.approx(4 / 5)
    assert metrics["field_recall"] == pytest.approx(4 / 6)
    assert metrics["field_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    assert metrics["json_valid_rate"] == pytest.approx(3 / 4)
    assert metrics["json_strict_rate"] == pytest.approx(1 / 4)
    assert metrics["n"] == 4 and task.headline_metric == "field_f1"
    # per field: A 3 of 3 right; B 1 right, 2 missed; D in no row, C outside the fields: no F1 of their own
    assert metrics["f1_A"] == 1.0 and metrics["f1_B"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 2))
    assert "f1_D" not in metrics and "f1_C" not in metrics
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert [(r["tp"], r["fp"], r["fn"]) for r in rows] == [(2, 0, 0), (1, 1, 0), (1, 0, 1), (0, 0, 1)]
    assert rows[3]["parsed"] is None
    assert task.headline(refs, rows) == pytest.approx(metrics["field_f1"])  # pooled from the rows' counts


def test_extraction_values_are_strict_beyond_case_and_spacing():
    task = task_for("task.kind=extraction", "task.fields=[A]")
    metrics, _ = task.score([{"A": "St."}, {"A": "Chicago"}], ['{"A": "St"}', '{"A": " chicago, "}'])
    assert metrics["field_f1"] == pytest.approx(0.5)  # "St" != "St."; edge comma/space/case forgiven


def test_extraction_list_items_are_pairs_of_their_own():
    """{type: [spans]} answers: one wrong span of three is not zero credit; order is free, repeats count."""
    task = task_for("task.kind=extraction", "task.fields=[person,location,n]")
    refs = [{"person": ["Ann", "Bob", "Cy"], "location": ["Paris"]}, {"person": ["Ann", "Ann"]}, {},
            {"n": [1, 2], "person": ["", None, "Eve"]}]
    outs = [
        '{"person": ["bob", "Ann", "Dan"], "location": "Paris"}',  # Dan wrong, Cy missed; a string = one item
        '{"person": ["Ann"]}',  # the second Ann missed
        "{}",  # nothing to find, nothing found: exact
        '{"n": [2, 1], "person": ["Eve"]}',  # non-string items compared as JSON; empty items are absent
    ]
    metrics, rows = task.score(refs, outs)
    assert [(r["tp"], r["fp"], r["fn"]) for r in rows] == [(3, 1, 1), (1, 0, 1), (0, 0, 0), (3, 0, 0)]
    assert metrics["field_precision"] == pytest.approx(7 / 8)
    assert metrics["field_recall"] == pytest.approx(7 / 9)
    assert metrics["exact_match"] == pytest.approx(2 / 4)
    assert [r["correct"] for r in rows] == [False, False, True, True]
    # person: 4 right (bob, Ann, Ann, Eve), Dan wrong, Cy and an Ann missed; location and n all right
    assert metrics["f1_person"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert metrics["f1_location"] == 1.0 and metrics["f1_n"] == 1.0


def test_extraction_checks_and_writes_answers():
    task = task_for("task.kind=extraction", "task.fields=[A,B]")
    assert task.check_output('{"B": "2", "A": "1"}') == {"A": "1", "B": "2"}
    assert task.answer_text({"B": "2", "A": "1"}) == '{"A":"1","B":"2"}'  # compact, field order
    with pytest.raises(BadExample, match="not valid JSON") as exc:
        task.check_output('{"A": 1')
    assert exc.value.kind == "invalid_json"
    with pytest.raises(BadExample, match=r"\['Z'\] are not among") as exc:
        task.check_output({"A": "1", "Z": "2"})
    assert exc.value.kind == "unknown_keys"


def test_extraction_json_schema_gives_fields_and_types():
    cfg = compose(["task=custom", "task.kind=extraction",
                   "+task.json_schema={properties: {name: {type: string}, age: {type: integer}}}"]).task
    task = get_task(cfg)
    assert task.fields == ["name", "age"]
    assert task.check_output({"age": 3, "name": "x"}) == {"name": "x", "age": 3}
    with pytest.raises(BadExample, match="'age' should be integer"):
        task.check_output({"age": "three"})


def test_extraction_learns_its_field_list_from_the_training_answers():
    task = task_for("task.kind=extraction")  # no task.fields: any key, learned from the training split
    assert task.check_output({"b": "1", "a": "2"}) == {"b": "1", "a": "2"}
    learned = task.learn_from_train([{"name": "x", "city": "y"}, {"name": "z", "zip": "1"}, {"city": "q", "zip": "2"}])
    assert learned["fields"] == task.fields == ["name", "city", "zip"]
    assert task.answer_text({"zip": "1", "name": "x"}) == '{"name":"x","zip":"1"}'
    with pytest.raises(ValueError, match="no training answer has any key"):
        task_for("task.kind=extraction").learn_from_train([{}, {}])


def test_extraction_keeps_the_datas_key_order_not_the_field_lists():
    task = task_for("task.kind=extraction", "task.fields=[zip,city,name,unused]")  # listed alphabetically reversed
    answers = [task.check_output({"name": "a", "city": "b"}), task.check_output({"city": "c", "zip": "1"})]
    assert list(answers[0]) == ["name", "city"]  # the row's own order is kept
    learned = task.learn_from_train(answers)
    assert task.fields == ["name", "city", "zip", "unused"] and learned["fields_never_in_training"] == ["unused"]
    assert task.answer_text({"zip": "1", "city": "c", "name": "a"}) == '{"name":"a","city":"c","zip":"1"}'
    with pytest.raises(BadExample, match="not among the task's fields"):
        task.check_output({"street": "x"})


def test_extraction_learns_value_types_so_the_constraint_admits_lists_of_spans():
    task = task_for("task.kind=extraction")
    learned = task.learn_from_train([{"person": ["Ann", "Bob"], "year": 2020}, {"person": ["Cy"], "city": "Oslo"}])
    assert learned["field_types"] == {"person": {"type": "array", "items": {"type": "string"}},
                                      "year": {"type": "integer"}, "city": {"type": "string"}}
    schema = task.answer_constraint()
    assert list(schema["properties"]) == task.fields == ["person", "year", "city"]
    assert schema["properties"]["person"] == {"type": "array", "items": {"type": "string"}}
    with pytest.raises(BadExample, match="should be array"):
        task.check_output({"person": "Ann"})


@pytest.mark.parametrize("answers, order", [
    ([["a", "b", "c"], ["b", "c"], ["a", "c"]], ["a", "b", "c"]),          # consistent: exactly that order
    ([["c"], ["a", "b"], ["b", "c"]], ["a", "b", "c"]),                    # first seen is not first in order
    ([["a", "b"], ["a", "b"], ["b", "a"]], ["a", "b"]),                    # disagreement: the majority
    ([["x"], ["y"]], ["x", "y"]),                                           # never together: first seen
    ([["a", "e", "c", "d"], ["d", "b", "a", "e"]], ["b", "a", "e", "c", "d"]),  # a cycle: fewest pairs broken (3)
])
def test_key_order_agrees_with_the_answers(answers, order):
    from finetune.tasks.extraction import key_order

    assert key_order([dict.fromkeys(keys, "v") for keys in answers]) == order


def test_key_order_of_the_bundled_addresses_follows_how_an_address_reads(root):
    """The bundled answers list their labels in reading order; one order for all of them must keep most
    answers as they read (the answer grammar allows only that order), e.g. a street's direction before its name."""
    from finetune.tasks.extraction import key_order

    answers = [json.loads(x)["output"] for x in (root / "data/extraction/addresses.jsonl").read_text().splitlines() if x]
    order = key_order(answers)
    rank = {k: i for i, k in enumerate(order)}
    out_of_order = sum(list(a) != sorted(a, key=rank.get) for a in answers)
    assert out_of_order <= 0.12 * len(answers), (out_of_order, order)
    for first, then in [("AddressNumber", "StreetNamePreDirectional"), ("StreetNamePreDirectional", "StreetName"),
                        ("StreetNamePreType", "StreetName"), ("StreetName", "StreetNamePostType"),
                        ("USPSBoxType", "USPSBoxID"), ("USPSBoxID", "PlaceName"), ("PlaceName", "StateName"),
                        ("StateName", "ZipCode"), ("Recipient", "AddressNumber")]:
        assert rank[first] < rank[then], (first, then, order)


# ---- classification -------------------------------------------------------------------------


def test_classification_parse_is_forgiving_about_form_only():
    task = task_for("task.kind=classification", "task.labels=[ham,spam]")
    for text in ["spam", "Spam.", " SPAM! ", '"spam"', "**spam**", "Label: spam", "The answer is spam",
                 "```\nspam\n```", "spam\nIt offers a prize.", "Spam - it offers a prize"]:
        assert task.parse(text) == "spam", text
    for text in ["not spam", "I cannot tell", "", "spammy"]:
        assert task.parse(text) is None, text


def test_classification_metrics_match_hand_computed_values():
    task = task_for("task.kind=classification", "task.labels=[ham,spam]")
    refs = ["ham", "ham", "spam", "spam", "ham"]
    outs = ["ham", "Spam.", "spam", "I think it is not clear", "HAM\nbecause it is personal"]
    metrics, rows = task.score(refs, outs)
    assert [r["parsed"] for r in rows] == ["ham", "spam", "spam", None, "ham"]
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["invalid_rate"] == pytest.approx(1 / 5)
    # ham: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8; spam: tp 1, fp 1, fn 1 -> F1 0.5
    assert metrics["f1_ham"] == pytest.approx(0.8)
    assert metrics["f1_spam"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(0.65)
    assert task.headline_metric == "macro_f1"
    assert task.headline(refs, rows) == metrics["macro_f1"]  # from the rows' scores, as a bootstrap redraws them
    assert task.headline(refs[:2], rows[:2]) == task.score(refs[:2], outs[:2])[0]["macro_f1"] == pytest.approx(
        (2 / 3 + 0) / 2)  # ham: P 1, R 1/2; spam only answered (a false positive): F1 0


def test_classification_data_labels_must_be_in_the_set():
    task = task_for("task.kind=classification", "task.labels=[ham,spam]")
    assert task.check_output("spam") == "spam"
    with pytest.raises(BadExample, match="'Spam' is not in") as exc:
        task.check_output("Spam")
    assert exc.value.kind == "label_not_in_set"
    learned = task.learn_from_train(["ham", "spam", "ham"])
    assert learned == {"labels": ["ham", "spam"], "labels_from": "task.labels",
                       "label_counts_train": {"ham": 2, "spam": 1}}


def test_classification_learns_its_label_set_from_the_training_answers():
    task = task_for("task.kind=classification")  # no task.labels: any label, the set learned from training
    assert task.check_output("Spam") == "Spam" and task.check_output(7) == "7"
    learned = task.learn_from_train(["LOC", "HUM", "NUM", "HUM", "NUM", "HUM", "ABBR"])
    assert task.labels == learned["labels"] == ["HUM", "NUM", "LOC", "ABBR"]  # most frequent first, ties in order
    assert learned["label_counts_train"] == {"HUM": 3, "NUM": 2, "LOC": 1, "ABBR": 1}
    assert learned["labels_from"] == "the training answers (task.labels empty)"
    assert task.parse("hum.") == "HUM" and task.parse("DESC") is None  # parsed against the learned set
    assert task.answer_constraint() == ["HUM", "NUM", "LOC", "ABBR"]
    metrics, _ = task.score(["HUM", "LOC", "DESC"], ["HUM", "NUM", "LOC"])  # DESC never in training: a miss
    assert metrics["accuracy"] == pytest.approx(1 / 3) and set(metrics) >= {"f1_ABBR", "f1_HUM"}
    # macro-F1 over the labels the references or answers hold (no test row of ABBR: not a zero), as scikit-learn
    from sklearn.metrics import f1_score

    refs = ["HUM", "NUM", "LOC", "HUM", "DESC", "NUM", "HUM", "LOC"]
    outs = ["HUM", "NUM", "HUM", "human", "NUM", "no idea", "LOC", "LOC"]
    metrics, rows = task.score(refs, outs)
    present = ["HUM", "NUM", "LOC", "DESC"]
    parsed = [r["parsed"] or "(invalid)" for r in rows]
    assert metrics["macro_f1"] == pytest.approx(f1_score(refs, parsed, labels=present, average="macro"))
    assert metrics["f1_ABBR"] == 0.0 and metrics["f1_DESC"] == 0.0
    assert metrics["invalid_rate"] == 2 / 8  # "no idea", and "human": the label is HUM
    with pytest.raises(ConfigError, match=r"1 distinct label\(s\) \['ham'\].*task.labels=\[a,b,...\]"):
        task_for("task.kind=classification").learn_from_train(["ham", "ham"])
    with pytest.raises(ConfigError, match="not distinct after case"):
        task_for("task.kind=classification").learn_from_train(["Spam", "spam", "ham"])


# ---- generation ------------------------------------------------------------------------------


def test_generation_metrics_match_hand_computed_values():
    task = task_for("task.kind=generation")
    metrics, rows = task.score(["the cat sat", "Dogs bark"], ["the cat", 'Headline: "Dogs bark"'])
    # row 1: unigrams P 2/2 R 2/3 -> 0.8; bigrams P 1/1 R 1/2 -> 2/3; LCS 2 -> 0.8. row 2: exact.
    assert metrics["rouge1"] == pytest.approx((0.8 + 1) / 2)
    assert metrics["rouge2"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["rougeL"] == pytest.approx((0.8 + 1) / 2)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert [r["correct"] for r in rows] == [False, True] and rows[1]["parsed"] == "Dogs bark"
    assert task.headline_metric == "rougeL"
    assert task.headline(["the cat sat", "Dogs bark"], rows) == pytest.approx(metrics["rougeL"])
    assert task.score(["x"], [""])[0]["empty_rate"] == 1.0


def test_input_of_reads_rows_without_an_input_field():
    task = task_for("task.prompt_template='Text: {input} (end)'")
    row = {"prompt": [{"role": "user", "content": "Text: hello (end)"}]}
    assert task.input_of(row) == "hello"
    with pytest.raises(ValueError, match="prompt_template"):
        task_for("task.prompt_template='Text: {input} {other}'")


# ---- specialist baselines on the real test splits ------------------------------------------------


def test_usaddress_baseline(bundled):
    task, rows = bundled["extraction"]
    outputs, _ = task.baseline("usaddress", rows["train"], rows["test"])
    metrics, _ = task.score([r["reference"] for r in rows["test"]], outputs)
    # usaddress's CRF was trained on this very file (test split included): close to perfect.
    assert metrics["n"] == len(rows["test"]) == 149
    assert metrics["json_strict_rate"] == 1.0 and metrics["field_f1"] > 0.98


def test_tfidf_baseline(bundled):
    task, rows = bundled["classification"]
    outputs = task.specialist_baseline(rows["train"], rows["test"])
    metrics, _ = task.score([r["reference"] for r in rows["test"]], outputs)
    assert metrics["invalid_rate"] == 0.0
    assert metrics["accuracy"] > 0.97 and metrics["macro_f1"] > 0.93  # measured: 0.983 / 0.955


def test_tfidf_baseline_with_more_than_two_labels():
    task = task_for("task.kind=classification")  # labels learned, as a user's own data gives them
    stems = {"human": "who wrote", "location": "where is", "number": "how many"}
    things = ["the bridge", "the song", "the treaty", "the river", "the novel", "the tower", "the anthem", "the map"]
    rows = [{"input": f"{stem} {thing} ?", "reference": label} for label, stem in stems.items() for thing in things]
    task.learn_from_train([r["reference"] for r in rows])
    test = [{"input": f"{stem} the castle ?", "reference": label} for label, stem in stems.items()]
    outputs = task.specialist_baseline(rows, test)
    assert outputs == ["human", "location", "number"]


def test_lead_baseline(bundled):
    task, rows = bundled["summarization"]
    outputs = task.specialist_baseline(rows["train"], rows["test"])
    for row, lead in zip(rows["test"], outputs):
        assert " ".join(row["input"].split()).startswith(lead) and 20 < len(lead) < len(row["input"])
    metrics, _ = task.score([r["reference"] for r in rows["test"]], outputs)
    assert 0.12 < metrics["rougeL"] < 0.3  # measured 0.18: headlines are not first sentences


def test_baselines_a_task_names():
    """The fair specialist plus reference baselines, checked when the task is built (at a run's start)."""
    task = get_task(compose(["task=extraction"]).task)
    assert (task.specialist, task.reference_baselines) == ("crf", ["usaddress"])
    assert "these very rows" in task.baseline_notes["usaddress"]
    # As before: task.specialist=<name> picks the specialist; a reference that is now the specialist is not repeated.
    task = get_task(compose(["task=extraction", "task.specialist=usaddress"]).task)
    assert (task.specialist, task.reference_baselines) == ("usaddress", [])
    task = get_task(compose(["task=extraction", "task.specialist=none", "task.reference_baselines=[]"]).task)
    assert (task.specialist, task.reference_baselines) == ("none", [])
    assert task.specialist_baseline([], []) is None
    assert task_for("task.kind=extraction", "task.fields=[A]").specialist == "crf"  # the kind's default
    with pytest.raises(ConfigError, match="specialist 'lead' is not one of"):
        task_for("task.kind=extraction", "task.fields=[A]", "task.specialist=lead")
    with pytest.raises(ConfigError, match=r"reference_baselines \['lead'\] are not baselines of kind extraction"):
        check_config(compose(["task=extraction", "task.reference_baselines=[usaddress,lead]"]), [])


def test_paired_intervals_of_the_headline_against_the_finetuned_model():
    """The Δ column's interval (finetune/evaluate/intervals.py): rows matched by id, both models' headlines
    recomputed on the same resampled rows."""
    from finetune.evaluate.intervals import against

    task = task_for("task.kind=classification", "task.labels=[ham,spam]")
    refs = ["ham", "spam"] * 20

    def predictions(outputs, ids=None):
        _, rows = task.score(refs, outputs)
        return [{"id": f"r{i}", "reference": ref, **row} for i, ref, row in zip(ids or range(40), refs, rows)]

    tuned = predictions(refs[:20] + ["?"] * 20)  # right on the first 20 rows, no valid answer on the rest
    better = predictions(refs)
    same = predictions(refs[:20] + ["?"] * 20)
    # Only its first 20 rows (no valid answer) are the tuned model's last 20 (none either): level, by id.
    shifted = predictions(["?"] * 20 + refs[20:], ids=[i + 20 for i in range(40)])
    out = against(task, {"finetuned": tuned, "better": better, "same": same, "shifted": shifted,
                         "alone": predictions(refs, ids=[100 + i for i in range(40)])})
    assert set(out) == {"better", "same", "shifted"}  # "alone" shares no row with the fine-tuned model
    assert out["same"] == [0.0, 0.0]
    low, high = out["better"]
    assert 0.2 < low < high < 0.8  # macro-F1 1.0 against ~0.5: ahead on every draw
    assert out["shifted"] == [0.0, 0.0]  # by position it would trail: its first 20 wrong, the tuned model's right
