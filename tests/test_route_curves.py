"""The router's arithmetic on the real extraction and classification tasks: curves, RouteLLM's measures, the
threshold choice, signals and scorers (no model needed: answers are written out)."""

from __future__ import annotations

import json
import math

import pytest

from finetune.core.config import compose
from finetune.route import curves
from finetune.route.signals import FEATURES, Scorer, features, fit_logistic, quantile
from finetune.tasks import get_task


@pytest.fixture(scope="module")
def clf():
    cfg = compose(["task=classification"])
    return get_task(cfg.task)


def test_curve_runs_from_small_alone_to_strong_alone(clf):
    labels = list(clf.cfg.labels)
    refs = [labels[i % 2] for i in range(10)]
    small = [refs[i] if i < 6 else labels[(i + 1) % 2] for i in range(10)]  # rows 6-9 wrong
    strong = list(refs)  # always right
    conf = [0.9] * 6 + [0.1, 0.2, 0.3, 0.4]  # the wrong rows are the least confident
    points = curves.curve(clf, refs, small, strong, conf)
    assert points[0]["share"] == 0 and points[-1]["share"] == 1
    assert points[0]["quality"] == curves.quality(clf, refs, small)
    assert points[-1]["quality"] == curves.quality(clf, refs, strong) == 1.0
    # Escalating the four wrong rows first recovers the whole gap with 40% of the calls.
    at40 = next(p for p in points if p["escalated"] == 4)
    assert at40["quality"] == 1.0 and 0.4 < at40["escalate_below"] < 0.9
    # Six equal confidences make one step: no threshold can split them.
    assert [p["escalated"] for p in points] == [0, 1, 2, 3, 4, 10]
    m = curves.measures(points)
    assert m["cpt50"] == pytest.approx(0.2) and m["cpt80"] == pytest.approx(0.4)
    assert 0.7 < m["apgr"] < 1.0 and m["best"] == {"share": 0.4, "quality": 1.0}


def test_no_gap_means_no_routing_measures_and_no_escalation(clf):
    labels = list(clf.cfg.labels)
    refs = [labels[i % 2] for i in range(20)]
    small = list(refs)
    small[0] = labels[1]  # one miss
    strong = [labels[(i + 1) % 2] for i in range(20)]  # always wrong
    conf = [i / 20 for i in range(20)]
    points = curves.curve(clf, refs, small, strong, conf)
    m = curves.measures(points)
    assert m["apgr"] is None and m["cpt50"] is None and "cannot" in m["note"]
    rows_small, rows_strong = curves.row_scores(clf, refs, small), curves.row_scores(clf, refs, strong)
    chosen = curves.choose(points, conf, rows_small, rows_strong, max_escalated=0.5, target_quality=None,
                           min_confidence=0.95)
    assert chosen["escalated"] == 0 and chosen["escalate_below"] is None
    applied = curves.apply(clf, refs, small, strong, conf, chosen["escalate_below"], [5] * 20)
    assert applied["share_escalated"] == 0 and applied["calls_saved"] == 1 and applied["strong_tokens_saved"] == 1


def test_choice_needs_a_gain_the_bootstrap_believes(clf):
    labels = list(clf.cfg.labels)
    refs = [labels[i % 2] for i in range(40)]
    wrong = lambda i: labels[(i + 1) % 2]  # noqa: E731
    conf = [i / 40 for i in range(40)]
    strong = list(refs)
    # One wrong small answer among the least confident: escalating it gains, but one row proves little.
    small = [wrong(i) if i == 0 else refs[i] for i in range(40)]
    points = curves.curve(clf, refs, small, strong, conf)
    rs, rt = curves.row_scores(clf, refs, small), curves.row_scores(clf, refs, strong)
    weak = curves.choose(points, conf, rs, rt, max_escalated=0.3, target_quality=None, min_confidence=0.95)
    assert weak["escalated"] == 0
    # Eight wrong answers, all least confident: a sure gain, taken within the 30% allowed.
    small = [wrong(i) if i < 8 else refs[i] for i in range(40)]
    points = curves.curve(clf, refs, small, strong, conf)
    rs = curves.row_scores(clf, refs, small)
    sure = curves.choose(points, conf, rs, rt, max_escalated=0.3, target_quality=None, min_confidence=0.95)
    assert sure["escalated"] == 8 and sure["quality"] == 1.0 and sure["bootstrap"] >= 0.95
    # A quality target takes the fewest escalations that reach it.
    target = curves.choose(points, conf, rs, rt, max_escalated=0.3, target_quality=0.9, min_confidence=0.95)
    assert target["escalated"] < 8 and target["quality"] >= 0.9
    applied = curves.apply(clf, refs, small, strong, conf, sure["escalate_below"], [10] * 40)
    assert applied["escalated"] == 8 and applied["strong_tokens"] == 80 and applied["strong_tokens_saved"] == 0.8


def test_extraction_row_scores_are_field_f1():
    task = get_task(compose(["task=extraction"]).task)
    ref = {"AddressNumber": "12", "StreetName": "Main", "PlaceName": "Reno"}
    half = {"AddressNumber": "12", "StreetName": "Oak"}
    scores = curves.row_scores(task, [ref, ref], [json.dumps(ref), json.dumps(half)])
    assert scores[0] == 1.0 and scores[1] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))


def test_signals_and_scorers():
    task = get_task(compose(["task=extraction"]).task)
    good = features(task, '{"AddressNumber": "12"}', [-0.01, -0.5, -0.02, -2.0], True)
    assert good["lp_min"] == -2.0 and good["lp_mean"] == pytest.approx(-2.53 / 4)
    assert good["lp_q10"] == pytest.approx(quantile([-0.01, -0.5, -0.02, -2.0], 0.1)) and good["valid"] == 1.0
    assert good["log_tokens"] == pytest.approx(math.log(5))
    bad_key = features(task, '{"Nonsense": "12"}', [-0.01], True)
    assert bad_key["valid"] == 0.0  # a key the task does not know
    cut = features(task, '{"AddressNumber": "12"', [-0.01], False)
    assert cut["valid"] == 0.0 and cut["stopped"] == 0.0
    signal = Scorer(kind="signal", signal="lp_min")
    assert signal.confidence(good) == -2.0 and signal.confidence(bad_key) < -100  # invalid: least confident
    # A logistic combiner learns that low minimum log-probabilities mean wrong answers.
    xs, bad = [], []
    for i in range(40):
        lp = -3.0 + i * 0.07
        xs.append(features(task, '{"AddressNumber": "1"}', [lp, -0.01], True))
        bad.append(lp < -1.5)
    scorer = fit_logistic(xs, bad)
    assert set(scorer.weights) == set(FEATURES) and scorer.weights["lp_min"] > 0
    assert scorer.confidence(xs[-1]) > 0.5 > scorer.confidence(xs[0])
    again = Scorer.from_dict(json.loads(json.dumps(scorer.to_dict())))
    assert again.confidence(xs[3]) == pytest.approx(scorer.confidence(xs[3]))
    with pytest.raises(ValueError, match="unknown scorer kind"):
        Scorer.from_dict({"kind": "oracle"})
