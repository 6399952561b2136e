"""The dead-letter store contract, over every store (memory, jsonl, a real Redis): add,
list, count, remove, and the pages the console's browser reads (scan, iterate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ms1.deadletters import DeadLetterStore, JsonlDeadLetters, MemoryDeadLetters
from ms1.errors import Ms1Error
from ms1.model import DeadLetter
from ms1_plugins.redis import RedisDeadLetters, RedisLink


@pytest.fixture(params=["memory", "jsonl", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeadLetterStore]:
    if request.param == "memory":
        letters: DeadLetterStore = MemoryDeadLetters()
    elif request.param == "jsonl":
        letters = JsonlDeadLetters(tmp_path / "dl.jsonl")
    else:
        url = request.getfixturevalue("redis_url")
        letters = RedisDeadLetters(RedisLink(url).use(), stream="test:dead-letters")
    yield letters
    letters.close()


def letters(count: int, start: int = 0) -> list[DeadLetter]:
    return [DeadLetter(reason=f"reason {n}", stage="ms4" if n % 2 else "processor",
                       payload=b'{"invoice_id":"INV-%d"}' % n, invoice_id=f"INV-{n}",
                       message_id=f"<{n}@x>", source_ref=f"ref-{n}", ms4_answer="answer",
                       at=1_700_000_000.0 + n) for n in range(start, start + count)]


def test_add_list_count_remove(store: DeadLetterStore) -> None:
    store.add(letters(5))
    listed = store.list()
    assert [x.invoice_id for x in listed] == [f"INV-{n}" for n in range(5)]
    assert all(x.id for x in listed) and len({x.id for x in listed}) == 5
    assert store.count() == 5
    assert sorted(x.invoice_id for x in store.list(ids=[listed[3].id, listed[1].id])) == \
        ["INV-1", "INV-3"]
    first = listed[0]
    assert (first.stage, first.message_id, first.source_ref, first.ms4_answer, first.at) == \
        ("processor", "<0@x>", "ref-0", "answer", 1_700_000_000.0)
    assert store.remove([listed[0].id, listed[2].id]) == 2
    assert store.remove([listed[0].id]) == 0  # already gone
    assert store.count() == 3


def test_scan_pages_through_every_letter_in_order(store: DeadLetterStore) -> None:
    store.add(letters(23))
    seen = []
    after = None
    while True:
        page = store.scan(after, 5)
        assert len(page) <= 5
        seen.extend(page)
        if len(page) < 5:
            break
        after = page[-1].id
    assert [x.invoice_id for x in seen] == [f"INV-{n}" for n in range(23)]
    assert [x.invoice_id for x in store.iterate(page=4)] == [f"INV-{n}" for n in range(23)]
    assert [x.invoice_id for x in store.iterate(limit=7, page=3)] == \
        [f"INV-{n}" for n in range(7)]
    assert store.scan(seen[-1].id, 5) == []
    assert store.scan(None, 0) == []


def test_scan_sees_letters_added_after_a_page(store: DeadLetterStore) -> None:
    store.add(letters(3))
    page = store.scan(None, 10)
    store.add(letters(2, start=3))
    assert [x.invoice_id for x in store.scan(page[-1].id, 10)] == ["INV-3", "INV-4"]


def test_scan_after_a_removed_letter(store: DeadLetterStore) -> None:
    """Stores with ordered ids (memory, redis) go on where the removed letter stood; the
    jsonl store starts over from the oldest (its ids carry no order)."""
    store.add(letters(6))
    page = store.scan(None, 3)
    store.remove([page[-1].id])
    rest = [x.invoice_id for x in store.scan(page[-1].id, 10)]
    if store.name == "jsonl":
        assert rest == ["INV-0", "INV-1", "INV-3", "INV-4", "INV-5"]
    else:
        assert rest == ["INV-3", "INV-4", "INV-5"]


def test_scan_with_a_cursor_that_is_no_id(store: DeadLetterStore) -> None:
    store.add(letters(2))
    try:
        page = store.scan("not an id", 10)
    except Ms1Error:
        return  # Redis refuses it: the console shows the error
    assert len(page) <= 2
