"""Batch policies: item, byte and time limits; oversize objects; the unit policy."""

from __future__ import annotations

import json

import pytest

from ms1.model import BATCH_PATH, UNIT_PATH, Batch, Item
from ms1.pipeline.batching import SizeBatchPolicy, UnitPolicy


def item(i: int, pad: int = 0) -> Item:
    payload = json.dumps({"invoice_id": f"I{i}", "pad": "x" * pad},
                         separators=(",", ":")).encode()
    return Item(payload, f"I{i}", f"<m{i}>", f"ref{i}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_closes_at_max_items() -> None:
    policy = SizeBatchPolicy(max_items=3, max_bytes=10_000, max_wait=60)
    closed = [b for i in range(7) for b in policy.add(item(i))]
    assert [len(b) for b in closed] == [3, 3]
    rest = policy.flush()
    assert rest is not None and rest.invoice_ids == ("I6",)
    assert policy.flush() is None


def test_body_never_exceeds_max_bytes_and_size_accounting_is_exact() -> None:
    max_bytes = 300
    policy = SizeBatchPolicy(max_items=1000, max_bytes=max_bytes, max_wait=60)
    closed: list[Batch] = []
    for i in range(200):
        closed.extend(policy.add(item(i, pad=i % 40)))
    last = policy.flush()
    assert last is not None
    closed.append(last)
    assert sum(len(b) for b in closed) == 200
    for batch in closed:
        body = batch.body()
        assert len(body) <= max_bytes
        assert [o["invoice_id"] for o in json.loads(body)] == list(batch.invoice_ids)
    # greedy: every batch but the last was closed because the next object did not fit
    sizes = [len(b.body()) for b in closed]
    first_of_next = [len(closed[k + 1].payloads[0]) for k in range(len(closed) - 1)]
    for size, nxt in zip(sizes, first_of_next, strict=False):
        assert size + 1 + nxt > max_bytes


def test_exact_fit_closes_immediately() -> None:
    one = item(1)
    policy = SizeBatchPolicy(max_items=10, max_bytes=len(one.payload) * 2 + 3, max_wait=60)
    assert policy.add(one) == []
    closed = policy.add(item(2))
    assert len(closed) == 1 and len(closed[0].body()) == policy.max_bytes


def test_oversize_object_is_reported() -> None:
    policy = SizeBatchPolicy(max_items=10, max_bytes=100, max_wait=60)
    big = item(1, pad=200)
    reason = policy.oversize(big)
    assert reason is not None and "[batch] max_bytes" in reason and str(len(big.payload)) in reason
    assert policy.oversize(item(2)) is None


def test_max_wait_deadline_starts_with_first_object() -> None:
    clock = Clock()
    policy = SizeBatchPolicy(max_items=50, max_bytes=10_000, max_wait=0.5, clock=clock)
    assert policy.deadline() is None
    policy.add(item(1))
    assert policy.deadline() == 100.5
    clock.now = 100.4
    policy.add(item(2))
    assert policy.deadline() == 100.5  # not extended by later objects
    batch = policy.flush()
    assert batch is not None and len(batch) == 2
    assert policy.deadline() is None


def test_unit_policy_sends_single_objects_to_metadata() -> None:
    policy = UnitPolicy(max_bytes=10_000)
    closed = policy.add(item(1))
    assert len(closed) == 1
    batch = closed[0]
    assert batch.path == UNIT_PATH and not batch.array
    assert batch.body() == item(1).payload  # a JSON object, not an array
    assert json.loads(batch.body())["invoice_id"] == "I1"


def test_batch_id_is_stable_and_content_derived() -> None:
    items = [item(i) for i in range(4)]
    a = Batch.of(BATCH_PATH, items)
    b = Batch.of(BATCH_PATH, items)
    c = Batch.of(BATCH_PATH, items[:3])
    assert a.id == b.id != c.id
    left, right = a.split()
    assert len(left) == 2 and len(right) == 2
    assert len({a.id, left.id, right.id}) == 3
    assert left.refs == ("ref0", "ref1")


def test_single_object_batch_cannot_split() -> None:
    with pytest.raises(ValueError):
        Batch.of(BATCH_PATH, [item(1)]).split()


def test_payload_bytes_are_joined_not_reencoded() -> None:
    weird = Item(b'{"invoice_id":"A","total_amount":1.50}', "A", "<a>", "r")
    batch = Batch.of(BATCH_PATH, [weird, weird])
    assert batch.body() == b'[{"invoice_id":"A","total_amount":1.50},' \
                           b'{"invoice_id":"A","total_amount":1.50}]'
