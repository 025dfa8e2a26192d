"""report.md, plots and finetune-compare, on run directories re-evaluated through the real CLI.

These runs evaluate only the task's specialist baseline (and a broken artifact), so no model
generates here; test_evaluate.py covers the models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from address_rows import write_data

from finetune.core.config import compose
from finetune.core.errors import RunDirError
from finetune.core.rundir import RunDir
from finetune.evaluate.compare import main as compare_main
from finetune.evaluate.plots import plot_confusion
from finetune.evaluate.metrics import write_predictions
from finetune.evaluate.report import parse_results_table, per_label_table, results_table, scored_counts
from finetune.evaluate.stage import evaluate
from finetune.tasks import get_task

# A trainer's log_history (train_log.json), as TRL's SFTTrainer writes it.
LOG_HISTORY = [
    {"loss": 2.41, "grad_norm": 3.1, "learning_rate": 2e-4, "epoch": 0.25, "step": 5},
    {"loss": 1.12, "grad_norm": 2.0, "learning_rate": 1.6e-4, "epoch": 0.5, "step": 10},
    {"eval_loss": 1.05, "eval_runtime": 1.2, "epoch": 0.5, "step": 10},
    {"loss": 0.61, "grad_norm": 1.4, "learning_rate": 8e-5, "epoch": 0.75, "step": 15},
    {"loss": 0.48, "grad_norm": 1.1, "learning_rate": 1e-5, "epoch": 1.0, "step": 20},
    {"eval_loss": 0.57, "eval_runtime": 1.2, "epoch": 1.0, "step": 20},
    {"train_runtime": 60.0, "train_loss": 1.15, "epoch": 1.0, "step": 20},
]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, root):
    """A run with data and a training log, re-evaluated with `python -m finetune stages=[evaluate]`."""
    run = RunDir(tmp_path_factory.mktemp("cli_run"))
    write_data(run, get_task(compose().task))
    (run.root / "train_log.json").write_text(json.dumps(LOG_HISTORY))
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "stages=[evaluate]", f"run_dir={run.root}", "evaluate.base=false"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_cli_reevaluates_and_writes_metrics_and_report(cli_run):
    metrics = json.loads(cli_run.metrics_path.read_text())
    # The fair specialist (a CRF trained on the 6 train rows) and usaddress's parser as a labelled reference.
    assert list(metrics["models"]) == ["specialist", "reference-usaddress"]
    crf, usaddress = metrics["models"]["specialist"], metrics["models"]["reference-usaddress"]
    assert crf["baseline"] == "crf" and crf["train_rows"] == 6 and crf["train_rows_left_out"] == 0
    assert usaddress["baseline"] == "usaddress" and "these very rows" in usaddress["note"]
    assert crf["n"] == usaddress["n"] == 4 and crf["field_f1"] > 0.5 and usaddress["field_f1"] > 0.9
    for name in metrics["models"]:
        assert (cli_run.predictions_dir / f"{name}.jsonl").is_file()
    assert json.loads(cli_run.stage_marker("evaluate").read_text())["n"] == 4
    text = cli_run.report_path.read_text()
    table = parse_results_table(text)
    head = metrics["headline_metric"]
    assert float(table["specialist"][head]) == round(metrics["models"]["specialist"][head], 4)
    assert "- `specialist`: crf, a CRF tagger" in text and "trained on 6 rows of this run's train split" in text
    assert "- `reference-usaddress`: usaddress, " in text and "an upper bound" in text
    # The command recorded in run.json, and the data validation summary.
    command = json.loads((cli_run.root / "run.json").read_text())["command"]
    assert "evaluate.base=false" in command and command in text
    assert "- splits: train=6, validation=2, test=4" in text
    assert "Not served with vLLM (`evaluate.vllm=[]`, the default: on a CPU vLLM answers no faster" in text


def test_loss_curve_and_training_summary(cli_run):
    assert (cli_run.plots_dir / "loss.png").stat().st_size > 1000
    text = cli_run.report_path.read_text()
    assert "training loss: 2.4100 (step 5) -> 0.4800 (step 20)" in text
    assert "validation loss: last 0.5700 (step 20), best 0.5700 (step 20)" in text


def test_compare_prints_every_run(cli_run, tmp_path, capsys):
    other = RunDir(tmp_path / "other")
    cfg = compose([f"run_dir={other.root}", "evaluate.base=false", "evaluate.max_examples=2"])
    write_data(other, get_task(cfg.task))
    evaluate(cfg, other)
    assert compare_main([str(cli_run.root), str(other.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = json.loads(cli_run.metrics_path.read_text())["headline_metric"]
    assert "specialist" in out[0] and head in out[2]
    assert out[2].startswith(f"| {cli_run.root}") and out[3].startswith(f"| {other.root}")
    assert "| 2 " in out[3]  # n of the capped run
    assert compare_main([str(tmp_path / "missing")]) == RunDirError.exit_code
    assert "evaluate the run first" in capsys.readouterr().err
    # The console script pyproject.toml installs runs the same function.
    script = Path(sys.executable).parent / "finetune-compare"
    if not script.exists():
        pytest.skip("finetune-compare is not installed in this environment (pip install -e .)")
    proc = subprocess.run([str(script), str(cli_run.root), str(other.root), "--metric", "latency_s_mean"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "latency_s_mean" in lines[2] and lines[3].startswith(f"| {other.root}")


def test_a_broken_artifact_is_reported_not_fatal(tmp_path):
    run = RunDir(tmp_path / "broken")
    cfg = compose([f"run_dir={run.root}", "evaluate.base=false", "evaluate.n_threads=1"])
    write_data(run, get_task(cfg.task))
    run.gguf_dir.mkdir()
    (run.gguf_dir / "model-Q8_0.gguf").write_bytes(b"not a gguf file")
    evaluate(cfg, run)
    metrics = json.loads(run.metrics_path.read_text())
    assert "error" in metrics["models"]["gguf-Q8_0"]
    assert "specialist" in metrics["models"]
    text = run.report_path.read_text()
    assert "Could not be evaluated" in text and "gguf-Q8_0" in text
    assert "This run has no training record" in text


def test_confusion_matrix_png(tmp_path):
    predictions = [
        {"reference": "spam", "parsed": "spam"},
        {"reference": "ham", "parsed": "spam"},
        {"reference": "ham", "parsed": None},
        {"reference": "ham", "parsed": "ham"},
    ]
    path = plot_confusion(predictions, ["ham", "spam"], "finetuned", tmp_path / "cm.png")
    assert path.stat().st_size > 1000


SMS = [
    ("Are we still meeting for lunch at noon?", "ham"),
    ("WINNER! You have won a 1000 GBP prize. Call 09061701461 now to claim", "spam"),
    ("Can you pick up milk on the way home", "ham"),
    ("FREE entry in a weekly competition to win FA Cup tickets. Text FA to 87121", "spam"),
    ("Sorry, I'll call you later tonight", "ham"),
    ("URGENT! Your mobile has won a cash award. Call 09050000327 to claim", "spam"),
    ("Ok see you at home then", "ham"),
    ("Congratulations, you won a free holiday! Text WIN to 80086 to claim your prize", "spam"),
    ("Did you get my message about dinner?", "ham"),
    ("Claim your FREE ringtone now, text TONE to 85233", "spam"),
]


def test_classification_run_gets_a_confusion_matrix(tmp_path):
    run = RunDir(tmp_path / "sms")
    cfg = compose([f"run_dir={run.root}", "task=classification", "evaluate.base=false"])
    task = get_task(cfg.task)
    rows = [{"id": f"sms-{i}", "prompt": task.prompt_messages(text),
             "completion": [{"role": "assistant", "content": task.answer_text(label)}], "reference": label}
            for i, (text, label) in enumerate(SMS)]
    run.data_dir.mkdir(parents=True)
    for split, part in (("train", rows[:6]), ("test", rows[6:])):
        (run.data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    evaluate(cfg, run)
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["headline_metric"] == "macro_f1" and metrics["task_kind"] == "classification"
    assert (run.plots_dir / "confusion_matrix.png").stat().st_size > 1000
    text = run.report_path.read_text()
    assert "![confusion matrix](plots/confusion_matrix.png)" in text
    table = parse_results_table(text)
    assert float(table["specialist"]["accuracy"]) == round(metrics["models"]["specialist"]["accuracy"], 4)


def test_many_labels_get_a_per_label_table_instead_of_columns():
    """Fifty labels made a results table of 60 columns (TREC's fine question types): beyond PER_LABEL_INLINE
    labels, F1 per label moves to a table with a row per label; a few labels stay columns."""
    labels = [f"number:{i}" for i in range(8)]

    def metrics(names):
        entry = {"n": 50, "macro_f1": 0.5, "accuracy": 0.7, **{f"f1_{name}": i / 10 for i, name in enumerate(names)}}
        return {"headline_metric": "macro_f1", "models": {"finetuned": entry, "specialist": dict(entry, macro_f1=0.6)}}

    many = metrics(labels)
    many["models"]["specialist"]["vs_finetuned_95"] = [0.02, 0.18]
    header, _, tuned, specialist = results_table(many)
    assert "f1_" not in header and "| macro_f1 | accuracy | Δ macro_f1 |" in header
    assert "| 0.6000 | 0.7000 | +0.1000 (+0.020..+0.180) |" in specialist  # Δ and its 95% interval
    assert "| 0.5000 | 0.7000 |  |" in tuned
    table = per_label_table(many, {"number:0": 120, "number:7": 3}, {"number:0": 9})
    assert table[0] == "### F1 per label (8 labels)"
    assert table[2] == "| label | train rows | test rows | finetuned | specialist |"
    assert table[4] == "| number:0 | 120 | 9 | 0.0000 | 0.0000 |"
    assert table[11] == "| number:7 | 3 | — | 0.7000 | 0.7000 |"
    assert len(table) == 2 + 2 + len(labels) + 1
    few = metrics(["ham", "spam"])
    assert "| f1_ham | f1_spam |" in results_table(few)[0] and per_label_table(few) == []
    fields = dict(metrics(labels), task_kind="extraction")  # an extraction answer's fields: the same table
    assert per_label_table(fields)[0] == "### F1 per field (8 fields)"
    assert per_label_table(fields)[2] == "| field | train rows | test rows | finetuned | specialist |"


def test_per_field_table_counts_the_scored_test_rows(tmp_path):
    """The table's test rows are those evaluate scored (the first model's predictions, so evaluate.max_examples
    applies): how many of them hold each field, in the task's order; an empty value holds nothing."""
    cfg, run = compose(["task=extraction"]), RunDir(tmp_path)
    run.predictions_dir.mkdir()
    refs = [{"AddressNumber": "1", "StreetName": "Main"}, {"StreetName": "Elm", "ZipCode": ""}, {"PlaceName": "Ames"}]
    write_predictions(run, "finetuned", [{"id": str(i), "reference": r, "output": "{}"} for i, r in enumerate(refs)])
    counts = scored_counts(cfg, run, {"models": {"base": {"error": "failed"}, "finetuned": {"n": 3}}})
    assert list(counts) == list(cfg.task.fields)
    assert (counts["StreetName"], counts["AddressNumber"], counts["PlaceName"], counts["ZipCode"]) == (2, 1, 1, 0)
    assert scored_counts(cfg, run, {"models": {"base": {"error": "failed"}}}) is None
