"""Data stage on the real bundled data: seeded splits, rows in the contract's format, loss masks with
the real SmolLM2 tokenizer (cross-checked with TRL), every input format, and the promised errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.core.config import compose
from finetune.core.errors import FinetuneError
from finetune.core.rundir import RunDir
from finetune.data.prepare import Report, prepare, split_task_data
from finetune.data.rows import read_rows, run_task, tokenize_row
from finetune.data.sources import read_records
from finetune.evaluate.metrics import read_predictions, write_predictions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.models.loading import load_tokenizer

    return load_tokenizer(compose([]).model)


def run_prepare(overrides: list[str], tmp_path: Path, tokenizer) -> tuple[dict, RunDir, dict]:
    cfg = compose(overrides)
    run = RunDir(tmp_path / "run")
    summary = prepare(cfg, run, tokenizer=tokenizer)
    report = json.loads((run.data_dir / "validation_report.json").read_text())
    return summary, run, report


def custom(path: Path, *extra: str) -> list[str]:
    return ["task=custom", f"task.data.path={path}", *extra]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- splits ------------------------------------------------------------------------------------


def split_ids(*overrides: str) -> dict[str, list[str]]:
    _, _, rows, _ = split_task_data(compose(list(overrides)).task)
    return {s: [r["id"] for r in rows[s]] for s in rows}


def test_bundled_splits_are_seeded_disjoint_and_sized():
    sizes = {}
    for task in ("extraction", "classification", "summarization"):
        ids = split_ids(f"task={task}")
        assert ids == split_ids(f"task={task}")  # same seed, same split
        sets = {s: set(v) for s, v in ids.items()}
        assert not (sets["train"] & sets["test"] or sets["train"] & sets["validation"] or sets["test"] & sets["validation"])
        sizes[task] = {s: len(v) for s, v in ids.items()}
        other = split_ids(f"task={task}", "task.data.split_seed=7")
        assert set(other["test"]) != sets["test"] and len(other["test"]) == len(ids["test"])
    assert sizes == {
        "extraction": {"train": 1190, "validation": 149, "test": 149},
        "classification": {"train": 4127, "validation": 516, "test": 516},
        "summarization": {"train": 800, "validation": 100, "test": 100},
    }


def test_split_does_not_depend_on_the_python_hash_seed():
    code = ("from finetune.data.prepare import split_task_data; from finetune.core.config import compose; "
            "print([r['id'] for r in split_task_data(compose(['task=extraction']).task)[2]['test']])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and json.loads(outs.pop().replace("'", '"')) == split_ids("task=extraction")["test"]


def test_test_inputs_never_appear_in_train(tmp_path):
    # each input 3 times; copies sort together, and a cut after 4 of 45 (10%) splits a triple
    rows = [{"input": f"text {i % 15}", "output": f"answer {i}"} for i in range(45)]
    report = Report()
    _, _, split_rows, _ = split_task_data(compose(custom(write_jsonl(tmp_path / "d.jsonl", rows))).task, report)
    inputs = {s: {r["input"] for r in split_rows[s]} for s in split_rows}
    assert not (inputs["train"] & inputs["test"] or inputs["train"] & inputs["validation"]
                or inputs["validation"] & inputs["test"])
    assert sum(report.counts.values()) > 0
    assert sum(len(v) for v in split_rows.values()) == 45 - sum(report.counts.values())


# ---- the stage on real data --------------------------------------------------------------------


def test_prepare_writes_contract_rows(tmp_path, tokenizer):
    summary, run, report = run_prepare(["task=extraction", "task.data.max_train_examples=50",
                                        "task.data.max_eval_examples=10"], tmp_path, tokenizer)
    assert (summary["train"], summary["validation"], summary["test"]) == (50, 10, 10)
    assert report["capped_from"] == {"train": 1190, "validation": 149, "test": 149}
    assert report["length_check"].startswith("smollm2") and report["token_lengths"]["train"]["max"] <= 512
    fields = list(compose(["task=extraction"]).task.fields)
    for split in ("train", "validation", "test"):
        for row in read_rows(run.data_dir / f"{split}.jsonl"):
            assert set(row) >= {"id", "prompt", "completion", "reference"} and row["id"].startswith("extraction-")
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert row["prompt"][1]["content"] == f"Address: {row['input']}"
            answer = row["completion"][0]["content"]
            assert row["completion"][0]["role"] == "assistant" and json.loads(answer) == row["reference"]
            assert list(json.loads(answer)) == [f for f in fields if f in row["reference"]]
            assert ": " not in answer.replace(row["input"], "")  # compact JSON
    train = [row["reference"] for row in read_rows(run.data_dir / "train.jsonl")]
    assert report["label_counts_train"] == {f: sum(f in r for r in train) for f in report["fields"]}
    assert report["label_counts_train"]["AddressNumber"] > 30  # the report's per-field table shows these
    # Address values copy their input: the report says so, and the later stages' task keeps it (run_task)
    assert report["copy_values"] is True and report["values_copied_share"] >= 0.98
    assert run_task(compose(["task=extraction"]).task, run).per_input
    assert not run_task(compose(["task=extraction", "task.copy_values=false"]).task, run).per_input
    # the first 50 of the full train split: caps do not change which examples a split holds
    _, _, full, _ = split_task_data(compose(["task=extraction"]).task)
    assert [r["id"] for r in read_rows(run.data_dir / "train.jsonl")] == [r["id"] for r in full["train"][:50]]


def test_too_long_examples_are_dropped_from_training(tmp_path, tokenizer):
    summary, run, report = run_prepare(["task=summarization", "method.max_length=300"], tmp_path, tokenizer)
    too_long = report["problems"]["too_long_train"]
    assert 0 < too_long < 800 and summary["train"] == 800 - too_long and report["too_long"] == "drop"
    assert report["problems"].get("too_long_test", 0) > 0 and summary["test"] == 100  # test keeps them
    issue = next(i for i in report["issues"] if i["kind"] == "too_long_train")
    assert issue["file"].endswith("bbc_headlines.jsonl") and issue["row"] >= 1 and "> method.max_length=300" in issue["message"]


def test_too_long_inputs_are_cut_to_fit_when_asked(tmp_path, tokenizer):
    """truncate: a summary's article loses its end (a word boundary, the headline and instruction whole) instead
    of its row; test rows stay whole. auto, where some training row fits: dropped, and always for extraction."""
    from finetune.data.rows import count_tokens

    overrides = ["task=summarization", "method.max_length=300", "task.data.too_long=truncate"]
    cfg = compose(overrides)
    summary, run, report = run_prepare(overrides, tmp_path / "s", tokenizer)
    cut = report["problems"]["truncated_train"]
    assert report["too_long"] == "truncate" and 0 < cut < 800 and "too_long_train" not in report["problems"]
    assert summary["train"] == 800 and summary["dropped"] == {} and report["problems"]["too_long_test"] > 0
    assert report["rows_read"] == report["rows_usable"] == 1000
    _, _, whole, _ = split_task_data(cfg.task)
    rows = read_rows(run.data_dir / "train.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in whole["train"]]
    assert max(count_tokens(rows, tokenizer, cfg.model)) <= 300
    task = run_task(cfg.task, run)
    shortened = 0
    for row, original in zip(rows, whole["train"]):
        assert row["completion"] == original["completion"] and row["input"] == original["input"]
        assert row["prompt"][:-1] == original["prompt"][:-1]  # the system prompt
        kept = task.input_of({"prompt": row["prompt"]})
        if kept != original["input"]:
            shortened += 1
            rest = original["input"][len(kept):]
            assert original["input"].startswith(kept) and kept and rest[:1].isspace()  # whole words only
    assert shortened == cut
    issue = next(i for i in report["issues"] if i["kind"] == "truncated_train")
    assert "> method.max_length=300: input cut to" in issue["message"]

    summary, _, report = run_prepare(["task=extraction", "method.max_length=140"], tmp_path / "e", tokenizer)
    assert report["too_long"] == "drop" and "truncated_train" not in report["problems"]
    assert summary["train"] == 1190 - report["problems"]["too_long_train"] < 1190
    dropped = summary["train"]
    summary, _, report = run_prepare(["task=extraction", "method.max_length=140", "task.data.too_long=truncate"],
                                     tmp_path / "t", tokenizer)  # asked for: rows whose answer alone fits are cut
    assert report["too_long"] == "truncate" and report["problems"]["truncated_train"] > 0
    assert summary["train"] == dropped + report["problems"]["truncated_train"] < 1190


def test_when_no_training_row_fits_auto_cuts_the_last_user_turn_of_chat_messages(tmp_path, tokenizer):
    from finetune.data.rows import count_tokens

    words = " ".join(f"word{i}" for i in range(300))
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
             {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [*convo, {"role": "user", "content": f"{i} {words}"},
                                                               {"role": "assistant", "content": f"answer {i}"}]}
                                                 for i in range(20)])
    cfg = compose(custom(path, "method.max_length=200"))
    summary, run, report = run_prepare(custom(path, "method.max_length=200"), tmp_path / "r", tokenizer)
    problems = report["problems"]
    assert report["too_long"] == "truncate"  # auto: every row is too long, so dropping would leave nothing
    assert problems["truncated_train"] == summary["train"] > 0
    assert problems["truncated_validation"] == summary["validation"]
    rows = read_rows(run.data_dir / "train.jsonl")
    assert max(count_tokens(rows, tokenizer, cfg.model)) <= 200
    for row in rows:
        assert row["prompt"][:3] == convo and row["completion"][0]["content"].startswith("answer")  # whole
        kept = row["prompt"][3]["content"]
        assert row["input"].startswith(kept) and len(kept) < len(row["input"]) and row["input"][len(kept)] == " "


def test_no_row_fits_says_what_to_change(tmp_path, tokenizer):
    with pytest.raises(FinetuneError, match=r"every one is longer than method.max_length=40.*too_long=truncate"):
        run_prepare(["task=extraction", "method.max_length=40"], tmp_path / "e", tokenizer)
    with pytest.raises(FinetuneError, match=r"max_length=40.*even with its input cut away none fits"):
        run_prepare(["task=summarization", "method.max_length=40"], tmp_path / "s", tokenizer)


# ---- loss masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["extraction", "classification", "summarization"])
def test_mask_covers_exactly_the_answer_and_end_of_turn(task, tokenizer):
    cfg = compose([f"task={task}"])
    _, _, rows, _ = split_task_data(cfg.task)
    for row in rows["train"][:5]:
        out = tokenize_row(row, tokenizer, cfg.model)
        trained = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
        assert tokenizer.decode(trained) == row["completion"][0]["content"] + "<|im_end|>"
        assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.pad_token_id
        first = out["labels"].index(trained[0])
        assert tokenizer.decode(out["input_ids"][:first]).endswith("<|im_start|>assistant\n")
        assert out["completion_mask"] == [int(lab != -100) for lab in out["labels"]]


def test_mask_agrees_with_trl(tokenizer):
    """TRL's own prompt/completion tokenization (what training uses) trains the same tokens, plus
    whatever the template writes after the end-of-turn token (ChatML's newline)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = compose(["task=extraction"])
    _, _, rows, _ = split_task_data(cfg.task)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows["train"][:8]]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=512, use_cpu=True, report_to=[],
                     completion_only_loss=True)
    trainer_state = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    trl_rows = SFTTrainer._prepare_dataset(trainer_state, Dataset.from_list(rows), tokenizer, args, packing=False,
                                           formatting_func=None, dataset_name="train")
    for row, theirs in zip(rows, trl_rows):
        ours = tokenize_row(row, tokenizer, cfg.model)
        assert ours["input_ids"] == theirs["input_ids"]
        end = max(i for i, lab in enumerate(ours["labels"]) if lab != -100) + 1
        assert ours["labels"][:end] == theirs["labels"][:end]
        assert tokenizer.decode(theirs["input_ids"][end:]).strip() == ""


# ---- formats -----------------------------------------------------------------------------------


def test_every_format_gives_the_same_rows(tmp_path, tokenizer):
    pairs = [(f"question {i}", f"answer {i}") for i in range(20)]
    sys_msg = {"role": "system", "content": "Be brief."}
    variants = {
        "columns.jsonl": [{"input": q, "output": a} for q, a in pairs],
        "pc_str.jsonl": [{"prompt": q, "completion": a} for q, a in pairs],
        "pc_msgs.jsonl": [{"prompt": [sys_msg, {"role": "user", "content": q}],
                           "completion": [{"role": "assistant", "content": a}]} for q, a in pairs],
        "messages.jsonl": [{"messages": [sys_msg, {"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]} for q, a in pairs],
        "alpaca.json": [{"instruction": q, "input": "", "output": a} for q, a in pairs],
    }
    results = {}
    for name, rows in variants.items():
        path = tmp_path / name
        path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
        results[name] = path
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,target\n" + "".join(f'"{q}","{a}"\n' for q, a in pairs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(variants["columns.jsonl"]), tmp_path / "data.parquet")
    runs = {name: custom(path, "task.system_prompt='Be brief.'") for name, path in results.items()}
    runs["data.csv"] = custom(csv_path, "task.system_prompt='Be brief.'", "task.data.input_column=text",
                              "task.data.output_column=target")
    runs["data.parquet"] = custom(tmp_path / "data.parquet", "task.system_prompt='Be brief.'")
    seen = {}
    for name, overrides in runs.items():
        _, run, _ = run_prepare(overrides, tmp_path / name.replace(".", "_"), tokenizer)
        seen[name] = [(r["prompt"], r["completion"], r["reference"]) for s in ("train", "validation", "test")
                      for r in read_rows(run.data_dir / f"{s}.jsonl")]
    reference = seen.pop("columns.jsonl")
    assert len(reference) == 20 and reference[0][0][0] == sys_msg
    for name, rows in seen.items():
        assert rows == reference, name


def test_explicit_split_files_override_the_seeded_split(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"input": f"t{i}", "output": "x"} for i in range(10)] +
                        [{"input": "shared", "output": "x"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"input": "shared", "output": "x"}, {"input": "only test", "output": "y"}])
    summary, run, report = run_prepare(["task=custom", f"task.data.train_path={train}", f"task.data.test_path={test}",
                                        "task.data.validation_fraction=0.2"], tmp_path, tokenizer)
    assert sorted(r["input"] for r in read_rows(run.data_dir / "test.jsonl")) == ["only test", "shared"]
    assert summary["test"] == 2 and summary["train"] + summary["validation"] == 10  # "shared" left train/validation
    assert report["problems"] == {"duplicate_of_test": 1}
    issue = report["issues"][0]
    assert issue["file"] == str(train) and issue["row"] == 11 and issue["action"].startswith("removed from")
    # a folder holding train.* and test.* files means the same
    summary2, _, _ = run_prepare(["task=custom", f"task.data.path={tmp_path}", "task.data.validation_fraction=0.2"],
                                 tmp_path / "folder", tokenizer)
    assert [summary2[k] for k in ("train", "validation", "test")] == [summary[k] for k in ("train", "validation", "test")]


# ---- bad data ----------------------------------------------------------------------------------


def error_of(overrides: list[str], tmp_path: Path) -> str:
    with pytest.raises(FinetuneError) as exc:
        prepare(compose(overrides), RunDir(tmp_path / "run"), tokenizer=None)
    return str(exc.value)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    # U+0085 and U+2028 are line breaks to str.splitlines() but plain characters inside a JSON string, which
    # json.dumps(..., ensure_ascii=False) writes unescaped (the Rotten Tomatoes snippets hold U+0085).
    text = "interwoven\u0085 [the film] addresses\u2028 a fascinating , intelligent manner"
    rows = [{"input": text, "output": "positive"}, {"input": "dull", "output": "negative"}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u0085" in path.read_text(encoding="utf-8")  # written raw, as a user's tools write it
    records = read_records(path)
    assert [(r.row, r.data["input"]) for r in records] == [(1, text), (2, "dull")]
    with path.open("a", encoding="utf-8") as f:
        f.write('{"input": "broken\n')
    assert error_of(custom(path), tmp_path).startswith(f"{path}:3: not valid JSON")  # line numbers as an editor's
    # The evaluate stage's predictions files read back the same way.
    run = RunDir(tmp_path / "run")
    run.predictions_dir.mkdir(parents=True)
    write_predictions(run, "finetuned", [{"input": text, "output": "positive"}])
    assert read_predictions(run, "finetuned") == [{"input": text, "output": "positive"}]


def test_non_utf8_is_fatal_with_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input": "ok", "output": "x"}\n{"input": "caf\xe9", "output": "x"}\n')
    assert f"{path}:2: not UTF-8 (byte 0xe9 at column 15)" in error_of(custom(path), tmp_path)


def test_broken_json_line_is_fatal_with_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "x"}\n\n{"input": "b", "output": }\n')
    assert f"{path}:3: not valid JSON" in error_of(custom(path), tmp_path)


def test_missing_column_is_fatal(tmp_path):
    path = tmp_path / "sms.csv"
    path.write_text("text,label\nhello,ham\n")
    msg = error_of(["task=classification", f"task.data.path={path}"], tmp_path)
    assert f"{path}: no column 'input'" in msg and "columns found: ['label', 'text']" in msg
    assert "cannot tell the data format" in error_of(custom(write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}])), tmp_path)


def test_no_usable_rows_is_fatal(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"input": "", "output": "x"}, {"input": "  ", "output": "y"}])
    msg = error_of(custom(path, "task.data.on_error=drop"), tmp_path)
    assert "no usable rows of 2 (empty: 2)" in msg and f"{path}:1: empty input" in msg
    assert "no such file" in error_of(custom(tmp_path / "nope.jsonl"), tmp_path)
    empty = tmp_path / "nothing.jsonl"
    empty.write_text("")
    assert error_of(custom(empty), tmp_path) == f"{empty}: 0 rows (the file is empty)"


def test_bad_rows_stop_the_stage_by_default_each_with_file_and_line(tmp_path):
    rows = [{"input": f"message {i}", "output": "ham" if i % 3 else "spam"} for i in range(30)]
    rows[3] = {"input": "odd", "output": "Spam"}  # a label written differently is not silently dropped
    rows[9] = {"output": "spam"}
    path = write_jsonl(tmp_path / "sms.jsonl", rows)
    msg = error_of(custom(path, "task.kind=classification", "task.labels=[ham,spam]"), tmp_path)
    assert "2 row(s) the task custom cannot use (task.data.on_error=stop)" in msg
    assert f"{path}:4: label 'Spam' is not in the task's labels ['ham', 'spam'] (label_not_in_set)" in msg
    assert f"{path}:10: no value for 'input' (missing_field)" in msg and "task.data.on_error=drop" in msg
    assert not (tmp_path / "run" / "data").exists()


def test_classification_label_set_is_learned_from_the_training_split(tmp_path, tokenizer):
    kinds = ["NUM", "HUM", "LOC", "NUM", "DESC"] * 8  # no task.labels: the set comes from the training answers
    rows = [{"input": f"question {i}?", "output": kind} for i, kind in enumerate(kinds)]
    path = write_jsonl(tmp_path / "questions.jsonl", rows)
    summary, run, report = run_prepare(custom(path, "task.kind=classification"), tmp_path, tokenizer)
    train = [r["reference"] for r in read_rows(run.data_dir / "train.jsonl")]
    counts = {label: train.count(label) for label in set(train)}
    assert set(report["labels"]) == {"NUM", "HUM", "LOC", "DESC"} and report["labels"][0] == "NUM"
    assert report["label_counts_train"] == counts and summary["labels"] == report["labels"]
    assert report["labels_from"] == "the training answers (task.labels empty)"
    # The later stages (train, export, evaluate) ask for the same set: the answer constraint is the learned set.
    task = run_task(compose(custom(path, "task.kind=classification")).task, run)
    assert task.labels == report["labels"] and task.answer_constraint() == report["labels"]
    assert report["labels_outside_training"] == {}
    # A label only the test file holds cannot be learned: the report counts it per split.
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30])
    test = write_jsonl(tmp_path / "test.jsonl", [*rows[30:], {"input": "what does NASA stand for?", "output": "ABBR"}])
    _, _, report = run_prepare(["task=custom", "task.kind=classification", f"task.data.train_path={train}",
                                f"task.data.test_path={test}"], tmp_path / "split-files", tokenizer)
    assert report["labels_outside_training"] == {"ABBR": {"test": 1}} and "ABBR" not in report["labels"]
    # One label in all the training answers: nothing to learn to tell apart, said before any training.
    single = write_jsonl(tmp_path / "one.jsonl", [{"input": f"q {i}", "output": "NUM"} for i in range(20)])
    msg = error_of(custom(single, "task.kind=classification"), tmp_path)
    assert "1 distinct label(s) ['NUM']" in msg and "task.labels=[a,b,...]" in msg


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    msg = error_of(["task=custom", "task.data.hub_dataset=someone/some-data"], tmp_path)
    assert "hub dataset 'someone/some-data': cannot load" in msg and "task.data.path" in msg


def test_bad_rows_are_counted_with_file_and_row(tmp_path, tokenizer):
    rows = [{"input": f"message {i}", "output": "ham" if i % 3 else "spam"} for i in range(30)]
    rows[3] = {"input": "odd", "output": "maybe"}
    rows[5] = {"input": 42, "output": "ham"}
    rows[7] = {"input": "", "output": "ham"}
    rows[9] = {"output": "spam"}
    path = write_jsonl(tmp_path / "sms.jsonl", rows)
    summary, _, report = run_prepare(custom(path, "task.kind=classification", "task.labels=[ham,spam]",
                                            "task.data.on_error=drop"), tmp_path, tokenizer)
    assert report["problems"] == {"label_not_in_set": 1, "wrong_type": 1, "empty": 1, "missing_field": 1}
    where = {i["kind"]: (i["file"], i["row"]) for i in report["issues"]}
    assert where == {"label_not_in_set": (str(path), 4), "wrong_type": (str(path), 6), "empty": (str(path), 8),
                     "missing_field": (str(path), 10)}
    assert summary["train"] + summary["validation"] + summary["test"] == 26 and report["rows_read"] == 30


def test_bad_extraction_answers_are_counted(tmp_path, tokenizer):
    path = tmp_path / "addr.csv"
    path.write_text('input,output\n1 Main St,"{""AddressNumber"": ""1""}"\n'
                    '2 Elm St,"{""AddressNumber"": ""2"",}"\n'
                    '3 Oak St,"{""Number"": ""3""}"\n'
                    '"4 Pine\nSt","{""AddressNumber"": ""4""}"\n'
                    '5 Fir St,"{""AddressNumber"": ""5""}",extra\n'
                    + "".join(f'{i} Ash St,"{{""AddressNumber"": ""{i}""}}"\n' for i in range(6, 16)))
    _, _, report = run_prepare(["task=extraction", f"task.data.path={path}", "task.data.on_error=drop"], tmp_path,
                               tokenizer)
    assert report["problems"] == {"invalid_json": 1, "unknown_keys": 1, "malformed_row": 1}
    where = {i["kind"]: i["row"] for i in report["issues"]}
    assert where == {"invalid_json": 3, "unknown_keys": 4, "malformed_row": 7}  # the quoted newline spans 5-6


def test_a_damaged_split_file_stops_every_reader_with_file_and_line(tmp_path):
    """train, evaluate and the export checks read the split files through read_rows: one error format."""
    from finetune.core.errors import DataError
    from finetune.evaluate.stage import load_rows

    good = {"id": "x-1", "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "ok"}], "reference": "ok"}
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({k: v for k, v in good.items() if k != "reference"}) + "\n")
    assert read_rows(path) == [good, {k: v for k, v in good.items() if k != "reference"}]
    with pytest.raises(DataError, match=r"test.jsonl:3: expected .* missing \['reference'\]"):
        load_rows(path)
    path.write_text(json.dumps(good) + "\n" + '{"prompt": [], "completion": "x"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: .*missing \['prompt'\]"):
        read_rows(path)
    path.write_text('{"id": 1,\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: not a JSON object"):
        read_rows(path)
