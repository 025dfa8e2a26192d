"""The base and comparison models' answers are reused across runs only when nothing they depend on changed."""

from __future__ import annotations

import json

import pytest
from trainutil import tiny_run

import finetune.evaluate.cache as answer_cache
from finetune.evaluate.stage import evaluate


@pytest.mark.slow
def test_base_answers_are_reused_only_when_nothing_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(answer_cache, "answers_dir", lambda: tmp_path / "answers")
    common = ["evaluate.max_examples=2", "evaluate.artifacts=false", "evaluate.specialist=false",
              "evaluate.n_threads=1", "evaluate.unconstrained=[]"]
    cfg, run = tiny_run(tmp_path / "run", [*common, "task.max_new_tokens=12"])

    def base_entry(cfg) -> tuple[dict, list[str]]:
        evaluate(cfg, run)
        metrics = json.loads(run.metrics_path.read_text())
        answers = [json.loads(line)["output"] for line in (run.predictions_dir / "base.jsonl").open()]
        return metrics["models"]["base"], answers

    first, answers = base_entry(cfg)
    assert "cached" not in first and len(list((tmp_path / "answers").glob("*.json"))) == 1
    second, again = base_entry(cfg)
    assert second.get("cached") is True and again == answers
    assert second["field_f1"] == first["field_f1"]
    cfg.method.seed = 7  # another training seed: greedy answers do not depend on it (bench_quality.py --seeds)
    assert base_entry(cfg)[0].get("cached") is True

    # Any change to what the answers depend on is a new key: here the decoding length and the grammar.
    cfg.task.max_new_tokens = 10
    third, _ = base_entry(cfg)
    assert "cached" not in third
    cfg.evaluate.constrained = False
    assert "cached" not in base_entry(cfg)[0]
    assert len(list((tmp_path / "answers").glob("*.json"))) == 3
    cfg.evaluate.cache = False
    assert "cached" not in base_entry(cfg)[0]
