"""The dead-letter store contract, over every store (memory, jsonl, a real Redis): add,
list, count, remove, and the pages the console's browser reads (scan, iterate)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ms1.errors import Ms1Error
from ms1.model import DeadLetter
from ms1.pipeline.deadletters import DeadLetterStore, JsonlDeadLetters, MemoryDeadLetters
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


# --- the console's and top's summary (ms1.ops.overview.LetterCounts), over every store ------

def counting_reads(store: DeadLetterStore) -> list[int]:
    """Make ``store`` count the letters its ``scan`` hands out: [letters read so far]."""
    read = [0]
    scan = store.scan

    def counted(after: str | None = None, limit: int = 100) -> list[DeadLetter]:
        page = scan(after, limit)
        read[0] += len(page)
        return page

    store.scan = counted  # type: ignore[method-assign]
    return read


def whole_summary(store: DeadLetterStore, limit: int, read: list[int] | None = None
                  ) -> dict[str, object]:
    """The summary of a whole read (its letters not counted in ``read``)."""
    from ms1.ops.overview import letter_summary

    before = read[0] if read is not None else 0
    summary = letter_summary(store.iterate(limit=limit), store.count())
    if read is not None:
        read[0] = before
    return summary


def varied(count: int, start: int) -> list[DeadLetter]:
    """Letters of three stages and four reasons, so the summary's order is exercised."""
    return [dataclasses.replace(letter, stage=("ms4", "processor", "batching")[n % 3],
                                reason=f"reason {n % 4}: detail {n}")
            for n, letter in enumerate(letters(count, start), start)]


def test_the_summary_reads_only_the_letters_that_came_since(store: DeadLetterStore) -> None:
    """Letters coming in while the console and top refresh every second: each refresh
    reads the new letters only (the old code read every letter again at each: 40 + k per
    refresh here, 10,000 with their payloads in production), and the summary is always
    the one a whole read gives."""
    from ms1.ops.overview import LetterCounts

    store.add(varied(40, 0))
    read = counting_reads(store)
    counts = LetterCounts(store, limit=1000, clock=lambda: 0.0)
    assert counts.read() == whole_summary(store, 1000, read) and read[0] == 40
    for round_ in range(15):
        read[0] = 0
        store.add(varied(1 + round_ % 3, 100 + 10 * round_))
        got = counts.read()
        assert read[0] == 1 + round_ % 3, (round_, read[0])
        assert got == whole_summary(store, 1000, read), round_


def test_the_summary_is_read_whole_after_letters_went(store: DeadLetterStore) -> None:
    """A replay removes letters: when the count fell, or grew by other than the letters
    after the last one counted, the letters are all read again."""
    from ms1.ops.overview import LetterCounts

    store.add(varied(10, 0))
    read = counting_reads(store)
    counts = LetterCounts(store, limit=1000, clock=lambda: 0.0)
    counts.read()
    listed = store.list()
    store.remove([listed[2].id, listed[9].id])  # the last one counted, too
    assert counts.read() == whole_summary(store, 1000, read)
    store.remove([listed[0].id])
    store.add(varied(3, 50))  # the count grows by 2; 3 letters came after the last one
    assert counts.read() == whole_summary(store, 1000, read)
    store.add(varied(2, 60))
    assert counts.read() == whole_summary(store, 1000, read)


def test_a_summary_of_the_oldest_letters_only_is_read_again_once_settled(
        store: DeadLetterStore) -> None:
    """More letters than ``limit``: the summary is the oldest ones', so letters coming in
    change only the count until it is ``settle`` s old; a fall in the count reads it all
    again at once."""
    from ms1.ops.overview import LetterCounts

    now = [0.0]
    store.add(varied(30, 0))
    read = counting_reads(store)
    counts = LetterCounts(store, limit=20, settle=10, clock=lambda: now[0])
    first = counts.read()
    assert first == whole_summary(store, 20, read) and not first["complete"] and read[0] == 20
    for n in range(5):
        now[0] += 1
        store.add(varied(1, 100 + n))
        got = counts.read()
        assert got == {**first, "count": 31 + n}
    assert read[0] == 20  # no letter read
    now[0] = 10.5
    store.add(varied(1, 200))
    assert counts.read() == whole_summary(store, 20, read) and read[0] == 40
    store.remove([store.list()[0].id])
    assert counts.read() == whole_summary(store, 20, read) and read[0] == 60
