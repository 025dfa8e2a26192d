"""A dozen real US addresses as rows in the data stage's format, for the evaluation and report tests."""

from __future__ import annotations

import json

from finetune.core.rundir import RunDir

ADDRESSES = [
    ("123 Main St Springfield IL 62704", {"AddressNumber": "123", "StreetName": "Main", "StreetNamePostType": "St", "PlaceName": "Springfield", "StateName": "IL", "ZipCode": "62704"}),
    ("9 Elm Avenue Boston MA 02118", {"AddressNumber": "9", "StreetName": "Elm", "StreetNamePostType": "Avenue", "PlaceName": "Boston", "StateName": "MA", "ZipCode": "02118"}),
    ("4500 Oak Rd Austin TX 78701", {"AddressNumber": "4500", "StreetName": "Oak", "StreetNamePostType": "Rd", "PlaceName": "Austin", "StateName": "TX", "ZipCode": "78701"}),
    ("77 Pine Street Denver CO 80202", {"AddressNumber": "77", "StreetName": "Pine", "StreetNamePostType": "Street", "PlaceName": "Denver", "StateName": "CO", "ZipCode": "80202"}),
    ("15 Lake Dr Madison WI 53703", {"AddressNumber": "15", "StreetName": "Lake", "StreetNamePostType": "Dr", "PlaceName": "Madison", "StateName": "WI", "ZipCode": "53703"}),
    ("300 Hill Blvd Tampa FL 33602", {"AddressNumber": "300", "StreetName": "Hill", "StreetNamePostType": "Blvd", "PlaceName": "Tampa", "StateName": "FL", "ZipCode": "33602"}),
    ("62 Cedar Ln Portland OR 97205", {"AddressNumber": "62", "StreetName": "Cedar", "StreetNamePostType": "Ln", "PlaceName": "Portland", "StateName": "OR", "ZipCode": "97205"}),
    ("8 River Road Albany NY 12207", {"AddressNumber": "8", "StreetName": "River", "StreetNamePostType": "Road", "PlaceName": "Albany", "StateName": "NY", "ZipCode": "12207"}),
    ("210 Maple Ave Dayton OH 45402", {"AddressNumber": "210", "StreetName": "Maple", "StreetNamePostType": "Ave", "PlaceName": "Dayton", "StateName": "OH", "ZipCode": "45402"}),
    ("1400 Birch St Reno NV 89501", {"AddressNumber": "1400", "StreetName": "Birch", "StreetNamePostType": "St", "PlaceName": "Reno", "StateName": "NV", "ZipCode": "89501"}),
    ("5 Park Pl Newark NJ 07102", {"AddressNumber": "5", "StreetName": "Park", "StreetNamePostType": "Pl", "PlaceName": "Newark", "StateName": "NJ", "ZipCode": "07102"}),
    ("88 Spruce Way Boise ID 83702", {"AddressNumber": "88", "StreetName": "Spruce", "StreetNamePostType": "Way", "PlaceName": "Boise", "StateName": "ID", "ZipCode": "83702"}),
]


def address_rows(task, prefix: str, pairs: list[tuple[str, dict]]) -> list[dict]:
    """Rows in the data stage's format (notes/CONTRACTS.md), prompts as the task writes them."""
    return [
        {
            "id": f"{prefix}-{i:03d}",
            "prompt": task.prompt_messages(text),
            "completion": [{"role": "assistant", "content": task.answer_text(fields)}],
            "reference": fields,
        }
        for i, (text, fields) in enumerate(pairs)
    ]


def write_split(run: RunDir, split: str, rows: list[dict]) -> None:
    run.data_dir.mkdir(parents=True, exist_ok=True)
    (run.data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(run: RunDir, task) -> tuple[list[dict], list[dict], list[dict]]:
    """What the data stage leaves in a run: 6 train, 2 validation, 4 test rows, a report, the marker."""
    train = address_rows(task, "train", ADDRESSES[:6])
    val = address_rows(task, "val", ADDRESSES[6:8])
    test = address_rows(task, "test", ADDRESSES[8:])
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        write_split(run, split, rows)
    report = {"rows": 12, "splits": {"train": 6, "validation": 2, "test": 4}, "problems": []}
    (run.data_dir / "validation_report.json").write_text(json.dumps(report))
    run.mark_done("data", {"train": 6, "validation": 2, "test": 4})
    return train, val, test
