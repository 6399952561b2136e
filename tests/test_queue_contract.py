"""The queue contract, run over every backend (in-memory here; Redis joins in its issue)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from ms1.model import BATCH_PATH, Batch, Item
from ms1.pipeline.outbound import MemoryQueue, QueueBackend
from ms1_plugins.redis import RedisLink, RedisQueue


def batch(n: int, size: int = 2) -> Batch:
    items = [Item(b'{"invoice_id":"%d-%d"}' % (n, k), f"{n}-{k}", f"<{n}-{k}>", "")
             for k in range(size)]
    return Batch.of(BATCH_PATH, items)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[QueueBackend]:
    """The same contract over every backend: in-memory and a real redis-server."""
    if request.param == "memory":
        queue: QueueBackend = MemoryQueue()
    else:
        url = request.getfixturevalue("redis_url")
        queue = RedisQueue(RedisLink(url).use(), stream="test:out", group="g", consumer="c",
                           visibility_timeout=30, block_timeout=0.05)
    yield queue
    queue.close()


def test_put_get_ack_fifo(backend: QueueBackend) -> None:
    batches = [batch(i) for i in range(3)]
    for b in batches:
        backend.put(b)
    assert backend.stats().ready == 3
    got = [backend.get("c1", timeout=1) for _ in range(3)]
    assert [d.batch.id for d in got if d] == [b.id for b in batches]
    assert backend.stats().ready == 0 and backend.stats().in_flight == 3
    for d in got:
        assert d is not None
        backend.ack(d)
    assert backend.stats().empty


def test_put_many_stores_every_batch_in_order(backend: QueueBackend) -> None:
    first, *rest = [batch(i) for i in range(5)]
    backend.put(first)
    assert backend.put_many(rest) is False  # no source: nothing acked for the caller
    got = [backend.get("c1", timeout=1) for _ in range(5)]
    assert [d.batch.id for d in got if d] == [b.id for b in [first, *rest]]
    assert backend.get("c1", timeout=0.05) is None


def test_get_times_out_empty(backend: QueueBackend) -> None:
    assert backend.get("c1", timeout=0.05) is None


def test_roundtrip_keeps_payload_bytes_and_ids(backend: QueueBackend) -> None:
    original = batch(7, size=5)
    backend.put(original)
    delivery = backend.get("c1", timeout=1)
    assert delivery is not None
    got = delivery.batch
    assert (got.id, got.path, got.payloads, got.invoice_ids, got.message_ids) == (
        original.id, original.path, original.payloads, original.invoice_ids,
        original.message_ids)
    assert delivery.attempts == 1


def test_release_redelivers_with_higher_attempt_count(backend: QueueBackend) -> None:
    backend.put(batch(1))
    first = backend.get("c1", timeout=1)
    assert first is not None
    backend.release(first)
    again = backend.get("c2", timeout=1)
    assert again is not None and again.batch.id == first.batch.id
    assert again.attempts == 2


def test_replace_swaps_batch_for_parts_atomically(backend: QueueBackend) -> None:
    whole = batch(1, size=4)
    backend.put(whole)
    delivery = backend.get("c1", timeout=1)
    assert delivery is not None
    left, right = whole.split()
    backend.replace(delivery, [left, right])
    stats = backend.stats()
    assert (stats.ready, stats.in_flight) == (2, 0)
    assert stats.invoices in (4, None)  # None: a backend that does not count invoices
    ids = set()
    for _ in range(2):
        d = backend.get("c1", timeout=1)
        assert d is not None
        ids.add(d.batch.id)
        backend.ack(d)
    assert ids == {left.id, right.id}


def test_merge_swaps_parts_for_their_join_atomically(backend: QueueBackend) -> None:
    """The halves of batches split before a refusal storm was recognised, joined again:
    the join is stored and every part acked at once; halves of one batch give it back."""
    whole = batch(1, size=4)
    left, right = whole.split()
    backend.put_many([left, right])
    first, second = backend.get("c1", timeout=1), backend.get("c1", timeout=1)
    assert first is not None and second is not None
    joined = Batch.join([first.batch, second.batch])
    assert joined.id == whole.id and joined.payloads == whole.payloads
    assert backend.merge([first, second], joined) is True
    stats = backend.stats()
    assert (stats.ready, stats.in_flight) == (1, 0)
    got = backend.get("c1", timeout=1)
    assert got is not None and got.batch.id == whole.id and got.batch.payloads == whole.payloads
    backend.ack(got)
    assert backend.stats().empty


def test_merge_changes_nothing_when_a_part_is_no_longer_held(backend: QueueBackend) -> None:
    left, right = batch(1, size=4).split()
    backend.put_many([left, right])
    first, second = backend.get("c1", timeout=1), backend.get("c1", timeout=1)
    assert first is not None and second is not None
    backend.ack(second)  # finished meanwhile (sent, or taken by another instance)
    assert backend.merge([first, second], Batch.join([first.batch, second.batch])) is False
    stats = backend.stats()
    assert (stats.ready, stats.in_flight) == (0, 1)  # the first still held, nothing added
    backend.ack(first)
    assert backend.stats().empty


def test_concurrent_consumers_get_each_batch_once(backend: QueueBackend) -> None:
    total = 200
    for i in range(total):
        backend.put(batch(i, size=1))
    seen: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        while True:
            d = backend.get(threading.current_thread().name, timeout=0.1)
            if d is None:
                return
            with lock:
                seen.append(d.batch.id)
            backend.ack(d)

    threads = [threading.Thread(target=consume, name=f"c{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == total and len(set(seen)) == total
    assert backend.stats().empty
