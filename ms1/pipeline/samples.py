"""Generated EmailMessage records for demos, tests and benchmarks.

``generate(n, invalid_every=k)`` yields :class:`Sample` s whose ``data`` is the
EmailMessage JSON; every k-th one is broken in one of several ways the
processor must reject (``defect`` says which).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CURRENCIES = ("USD", "EUR", "GBP", "CHF", "JPY", "SEK")

#: ways a sample can be broken, cycled through in order
DEFECTS = (
    "bad_currency", "bad_date", "bad_amount", "missing_invoice_id", "raw_json_not_json",
    "not_json", "bad_line_item", "nan_amount",
)


@dataclass(frozen=True, slots=True)
class Sample:
    data: bytes
    invoice_id: str
    message_id: str
    defect: str | None = None

    @property
    def valid(self) -> bool:
        return self.defect is None


def invoice(i: int, prefix: str = "INV") -> dict[str, Any]:
    """A valid MS4 object number ``i`` (also used as ``raw_json``)."""
    lines = [(f"Item {k + 1}", (i + k) % 5 + 1, round(10.0 + (i * 7 + k) % 990 + 0.25, 2))
             for k in range(i % 3 + 1)]
    items = [{"description": d, "quantity": q, "unit_price": p} for d, q, p in lines]
    total = round(sum(q * p for _, q, p in lines), 2)
    return {
        "invoice_id": f"{prefix}-{i:07d}",
        "vendor_name": f"Vendor {i % 97}",
        "invoice_date": f"2025-{i % 12 + 1:02d}-{i % 28 + 1:02d}",
        "total_amount": total,
        "currency": CURRENCIES[i % len(CURRENCIES)],
        "line_items": items,
    }


def email(i: int, raw_json: Any, prefix: str = "INV") -> dict[str, Any]:
    return {
        "message_id": f"<{prefix.lower()}.{i}@mail.vendor-{i % 97}.example>",
        "received_at": "2025-11-01T09:30:00Z",
        "sender": f"billing@vendor-{i % 97}.example",
        "subject": f"Invoice {prefix}-{i:07d}",
        "raw_json": raw_json,
    }


def _break(raw: dict[str, Any], defect: str) -> Any:
    broken = dict(raw)
    if defect == "bad_currency":
        broken["currency"] = "EURO"
    elif defect == "bad_date":
        broken["invoice_date"] = "31/11/2025"
    elif defect == "bad_amount":
        broken["total_amount"] = "twelve hundred"
    elif defect == "missing_invoice_id":
        del broken["invoice_id"]
    elif defect == "raw_json_not_json":
        return "{not json"
    elif defect == "bad_line_item":
        broken["line_items"] = [{"description": "Item 1", "quantity": "two", "unit_price": 5}]
    elif defect == "nan_amount":
        broken["total_amount"] = "NaN"
    return broken


def generate(n: int, *, invalid_every: int = 0, prefix: str = "INV",
             start: int = 0) -> Iterator[Sample]:
    """``n`` samples numbered from ``start``; every ``invalid_every``-th is broken (0: none)."""
    for i in range(start, start + n):
        raw = invoice(i, prefix)
        message = email(i, raw, prefix)
        defect = None
        if invalid_every and i % invalid_every == invalid_every - 1:
            defect = DEFECTS[(i // invalid_every) % len(DEFECTS)]
        if defect == "not_json":
            data = b'{"message_id": "<broken.%d@example>", "raw_json": {' % i
        else:
            if defect is not None:
                message["raw_json"] = _break(raw, defect)
            data = json.dumps(message).encode("utf-8")
        yield Sample(data, raw["invoice_id"], message["message_id"], defect)


def write_jsonl(path: str, samples: Iterator[Sample]) -> int:
    """Write samples to a JSONL file; return how many."""
    count = 0
    with open(path, "wb") as fh:
        for sample in samples:
            fh.write(sample.data + b"\n")
            count += 1
    return count
