"""Rebuild data/extraction/addresses.jsonl from usaddress==0.5.16's hand-labelled training set.

    python scripts/prepare_extraction.py [--download-dir /tmp/finetune-sdists]

Source: the sdist's training/labeled.xml (1,513 US addresses, every token labelled; MIT).
Each address becomes {"input": address text, "output": {label: text}}: the tokens of one label
joined with single spaces in their order, then stripped of edge spaces/commas/semicolons the way
usaddress.tag() does ("Chicago," -> "Chicago"). Exact duplicate addresses are kept once.
The labels that occur, in usaddress's own LABELS order, are written to conf/task/extraction.yaml.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pkgdata import ROOT, fetch, read_member, write_jsonl  # noqa: E402

from finetune.tasks.extraction import group_tokens  # noqa: E402  (the same grouping the specialist uses)

PACKAGE, VERSION = "usaddress", "0.5.16"
# labeled.xml uses labels that usaddress.LABELS does not list; each goes after its neighbour.
EXTRA_LABELS = {"StreetNamePostModifier": "StreetNamePostDirectional", "ZipPlus4": "ZipCode", "CountryName": "ZipPlus4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-dir", type=Path, default=Path("/tmp/finetune-sdists"))
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "extraction" / "addresses.jsonl")
    args = ap.parse_args()

    sdist = fetch(PACKAGE, VERSION, args.download_dir, sdist=True)
    labels_order = ast.literal_eval(
        re.search(r"^LABELS = (\[.*?\])", read_member(sdist, "usaddress/__init__.py").decode(), re.S | re.M).group(1)
    )
    for extra, after in EXTRA_LABELS.items():
        labels_order.insert(labels_order.index(after) + 1, extra)
    root = ET.fromstring(read_member(sdist, "training/labeled.xml"))
    rows, seen, used = [], set(), set()
    for node in root.iter("AddressString"):
        text = " ".join("".join(node.itertext()).split())
        pairs = [((child.text or "").strip(), child.tag) for child in node]
        fields = group_tokens([(t, lab) for t, lab in pairs if t])
        if not text or not fields or text in seen:
            continue
        seen.add(text)
        used.update(fields)
        labels_order += [k for k in fields if k not in labels_order]  # any other label: at the end
        ordered = {k: fields[k] for k in labels_order if k in fields}
        rows.append({"input": text, "output": ordered})
    write_jsonl(args.out, rows)

    fields = [k for k in labels_order if k in used]
    conf = ROOT / "conf" / "task" / "extraction.yaml"
    yaml = conf.read_text()
    yaml = re.sub(r"^fields:.*$", "fields: [" + ", ".join(fields) + "]", yaml, count=1, flags=re.M)
    conf.write_text(yaml)
    print(f"{args.out}: {len(rows)} addresses ({len(list(root.iter('AddressString')))} in labeled.xml), "
          f"{len(fields)} fields written to {conf}")


if __name__ == "__main__":
    main()
