"""Rebuild data/extraction/addresses.jsonl from usaddress==0.5.16's hand-labelled training set.

    python scripts/prepare_extraction.py [--download-dir /tmp/finetune-sdists]

Source: the sdist's training/labeled.xml (1,513 US addresses, every token labelled; MIT).
Each address becomes {"input": address text, "output": {label: text}}: the tokens of one label
joined with single spaces in their order, then stripped of edge spaces/commas/semicolons the way
usaddress.tag() does ("Chicago," -> "Chicago"). The labels are written in the order the address reads
them (a label's first token), so an answer reads the address left to right: usaddress's own LABELS order
puts a PO box after the town, the recipient last and "Second Floor" as Floor, Second: 315 of the 1,488
answers out of reading order. Exact duplicate addresses are kept once.
The labels that occur are written to conf/task/extraction.yaml in the order the answers write them
(finetune.tasks.extraction.key_order: the order training writes and the answer grammar allows).
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

from finetune.tasks.extraction import group_tokens, key_order  # noqa: E402  (the grouping the specialist uses)

PACKAGE, VERSION = "usaddress", "0.5.16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "extraction" / "addresses.jsonl")
    args = ap.parse_args()

    sdist = fetch(PACKAGE, VERSION, args.download_dir, sdist=True)
    root = ET.fromstring(read_member(sdist, "training/labeled.xml"))
    rows, seen = [], set()
    for node in root.iter("AddressString"):
        text = " ".join("".join(node.itertext()).split())
        pairs = [((child.text or "").strip(), child.tag) for child in node]
        fields = group_tokens([(t, lab) for t, lab in pairs if t])
        if not text or not fields or text in seen:
            continue
        seen.add(text)
        rows.append({"input": text, "output": fields})  # group_tokens keeps the address's reading order
    write_jsonl(args.out, rows)

    fields = key_order([r["output"] for r in rows])
    conf = ROOT / "conf" / "task" / "extraction.yaml"
    yaml = conf.read_text()
    yaml = re.sub(r"^fields:.*$", "fields: [" + ", ".join(fields) + "]", yaml, count=1, flags=re.M)
    conf.write_text(yaml)
    print(f"{args.out}: {len(rows)} addresses ({len(list(root.iter('AddressString')))} in labeled.xml), "
          f"{len(fields)} fields written to {conf}")


if __name__ == "__main__":
    main()
