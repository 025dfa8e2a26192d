"""The CRF span tagger (finetune/tasks/crf.py), the extraction kind's default specialist: real
python-crfsuite training on the bundled addresses and on list-valued answers."""

from __future__ import annotations

import json

import pytest

from finetune.core.config import compose
from finetune.data.prepare import split_task_data
from finetune.tasks import get_task
from finetune.tasks.crf import SpanTagger, decode_spans, locate_spans, tokenize


@pytest.fixture(scope="module")
def addresses():
    """(task, rows per split) of the bundled address task: the seeded split the data stage writes."""
    task, _, rows, _ = split_task_data(compose(["task=extraction"]).task)
    return task, rows


def spans_of(text: str, reference: dict):
    tokens = tokenize(text)
    found = locate_spans(text, tokens, reference)
    if found is None:
        return None
    return {k: [text[tokens[a].start : tokens[b - 1].end] for a, b in v] for k, v in found.items()}


def test_tokens_keep_their_offsets():
    text = "123 N. Main St., Chicago,IL"
    tokens = tokenize(text)
    assert [t.text for t in tokens] == ["123", "N", ".", "Main", "St", ".", ",", "Chicago", ",", "IL"]
    assert all(text[t.start : t.end] == t.text for t in tokens)


def test_values_are_located_after_scoring_normalization():
    text = "DeKalb Peachtree Airport, 2000 Airport Road, CHICAGO, IL"
    reference = {"AddressNumber": "2000", "StreetName": "Airport", "StreetNamePostType": "Road",
                 "BuildingName": "DeKalb Peachtree Airport", "PlaceName": "Chicago,", "StateName": "IL"}
    # Case and an edge comma are forgiven as scoring forgives them; the longer value is placed first, so
    # the street name takes the second "Airport".
    assert spans_of(text, reference) == {
        "BuildingName": ["DeKalb Peachtree Airport"], "AddressNumber": ["2000"], "StreetName": ["Airport"],
        "StreetNamePostType": ["Road"], "PlaceName": ["CHICAGO"], "StateName": ["IL"]}
    assert spans_of("Ann and Ann", {"person": ["Ann", "Ann"]}) == {"person": ["Ann", "Ann"]}


def test_values_that_are_not_spans():
    assert spans_of("12 Main Street", {"StreetName": "Main St"}) is None  # not the words of the input
    assert spans_of("79th St. & Joliet Rd.", {"StreetName": "79th Joliet"}) is None  # two places
    assert spans_of("Main Street", {"StreetName": "Mai"}) is None  # part of a word
    assert spans_of("S . Main", {"StreetNamePreDirectional": "S."}) is None  # different spacing
    assert spans_of("age 3", {"age": 3}) is None  # not a string
    assert spans_of("Ann met Ann", {"person": ["Ann", "Ann", "Ann"]}) is None  # more often than in the input
    assert spans_of("no entity here", {}) == {}


def test_decoding_tags_into_spans():
    labels = ["B-a", "I-a", "O", "I-a", "B-b", "I-a", "B-a", "B-a"]
    assert decode_spans(labels) == [("a", 0, 2), ("a", 3, 4), ("b", 4, 5), ("a", 5, 6), ("a", 6, 7), ("a", 7, 8)]


def test_crf_beats_a_trivial_threshold_on_held_out_addresses(addresses):
    task, rows = addresses
    outputs, info = task.baseline("crf", rows["train"], rows["test"])
    metrics, _ = task.score([r["reference"] for r in rows["test"]], outputs)
    # Rows whose labels join words from two places ("103rd & Ridgeland" -> StreetName "103rd Ridgeland")
    # are left out of training and counted.
    assert info["train_rows"] + info["train_rows_left_out"] == len(rows["train"]) == 1190
    assert 0 < info["train_rows_left_out"] < 100
    # Measured 0.912 field F1, 0.745 exact match on the 149 test rows (usaddress's own parser, trained on
    # them: 0.998).
    assert metrics["n"] == 149 and metrics["json_strict_rate"] == 1.0
    assert metrics["field_f1"] > 0.85 and metrics["exact_match"] > 0.6


def test_training_is_deterministic(addresses):
    task, rows = addresses
    examples = [(task.input_of(r), r["reference"]) for r in rows["train"][:300]]
    first, second = SpanTagger.fit(examples), SpanTagger.fit(examples)
    assert first.model == second.model
    texts = [task.input_of(r) for r in rows["test"][:40]]
    assert [first.predict(t) for t in texts] == [second.predict(t) for t in texts]


PEOPLE = ["Ann", "Bob", "Carla", "Dmitri", "Eve", "Farid", "Grace", "Hiro"]
PLACES = ["Paris", "Lagos", "Boston", "Lima", "Oslo", "Pune"]
TEMPLATES = ["{0} met {1} in {2} yesterday", "flying to {2} with {0} and {1} !", "{0} and {1} say hi from {2}",
             "lunch with {0} and {1} , then {2}"]


def tweet(i: int) -> tuple[str, dict]:
    a, b, place = PEOPLE[i % 8], PEOPLE[(3 * i + 1) % 8], PLACES[i % 6]
    if a == b:
        b = PEOPLE[(i + 5) % 8]
    return TEMPLATES[i % 4].format(a, b, place), {"person": [a, b], "location": [place]}


def test_list_valued_answers():
    """Entity type -> list of spans: every tagged span of a list key is answered, in input order."""
    cfg = compose(["task=custom", "task.kind=extraction", "task.fields=[person,location]"]).task
    task = get_task(cfg)
    train = [tweet(i) for i in range(40)] + [("nothing to see here", {}), ("just coffee", {})]
    rows = [{"input": text, "reference": ref} for text, ref in train]
    tests = [tweet(i) for i in range(40, 52)] + [("sunny and quiet", {})]
    outputs, info = task.baseline("crf", rows, [{"input": text, "reference": ref} for text, ref in tests])
    assert info == {"train_rows": 42, "train_rows_left_out": 0}
    assert json.loads(outputs[0]) == tests[0][1]  # {"person": [two names], "location": [one place]}
    metrics, _ = task.score([ref for _, ref in tests], outputs)
    assert metrics["field_f1"] > 0.9 and metrics["exact_match"] > 0.8


def test_crf_does_not_apply_when_values_are_not_spans():
    task = get_task(compose(["task=custom", "task.kind=extraction", "task.fields=[date]"]).task)
    rows = [{"input": f"see you on Jan {d}, 2024", "reference": {"date": f"2024-01-{d:02d}"}} for d in range(1, 20)]
    rows.append({"input": "see you on 2024-01-20", "reference": {"date": "2024-01-20"}})
    tagger = SpanTagger.fit([(r["input"], r["reference"]) for r in rows])
    assert (tagger.rows_used, tagger.rows_left_out) == (1, 19)
    assert task.baseline("crf", rows, rows) is None  # mostly normalized values: no CRF baseline
    assert task.specialist_baseline(rows, rows) is None
    assert task.specialist_baseline([], []) is None
