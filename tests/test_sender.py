"""Sender: ack on 202, retry on failures, split on 400 until the bad object is isolated."""

from __future__ import annotations

import json
import threading

import pytest

from ms1.errors import TransportError
from ms1.model import BATCH_PATH, Batch, Item
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Pacer
from ms1.pipeline.sending.sender import Sender, SendSettings
from ms1.pipeline.stats import RunStats
from ms1.pipeline.transport import MemoryTransport, Request, Response
from ms1.runtime import pluginmanager


def make_batch(ids: list[str]) -> Batch:
    items = [Item(json.dumps({"invoice_id": i}).encode(), i, f"<{i}>", "") for i in ids]
    return Batch.of(BATCH_PATH, items)


def fast_pacer() -> Pacer:
    return Pacer(SlidingWindowLimiter(100_000, 60), Breaker(1000, 0.01),
                 retry_after_default=0.01, retry_after_cap=0.05, auth_probe_interval=0.01)


class Rig:
    def __init__(self, transport: MemoryTransport) -> None:
        self.queue = MemoryQueue()
        self.transport = transport
        self.dead = MemoryDeadLetters()
        self.stats = RunStats()
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.events: list[tuple[str, object]] = []
        rig = self

        class Recorder:
            @pluginmanager.hookspecs.hookimpl
            def ms1_batch_sent(self, batch: Batch, status: int, attempt: int,
                               latency: float) -> None:
                rig.events.append(("sent", (batch.id, attempt)))

            @pluginmanager.hookspecs.hookimpl
            def ms1_batch_failed(self, batch: Batch, status: int | None, error: str,
                                 attempt: int, will_retry: bool) -> None:
                rig.events.append(("failed", (status, will_retry)))

            @pluginmanager.hookspecs.hookimpl
            def ms1_payload_rejected(self, letter) -> None:  # type: ignore[no-untyped-def]
                rig.events.append(("rejected", letter.invoice_id))

        pm = pluginmanager.make_plugin_manager(entry_points=False, plugins=[Recorder()])
        self.sender = Sender(name="s1", queue=self.queue, transport=transport,
                             dead_letters=self.dead, observers=pluginmanager.Observers(pm),
                             stats=self.stats, pacer=fast_pacer(), stop=self.stop,
                             abort=self.abort, retry_initial=0.001, retry_max=0.01)

    def drain(self) -> None:
        while (d := self.queue.get("s1", timeout=0)) is not None:
            self.sender.deliver(d)


def test_202_acks_and_sends_idempotency_key() -> None:
    rig = Rig(MemoryTransport())
    batch = make_batch(["a", "b"])
    rig.queue.put(batch)
    rig.drain()
    assert rig.queue.stats().empty
    [request] = rig.transport.requests
    assert request == Request(BATCH_PATH, batch.body(), batch.id, 2)
    assert rig.events == [("sent", (batch.id, 1))]
    assert rig.stats.get("invoices_delivered") == 2


@pytest.mark.parametrize("failure", [500, 503, 401, 429, 404,
                                     TransportError("connection refused")])
def test_failures_are_retried_with_the_same_key_until_202(failure: object) -> None:
    transport = MemoryTransport()
    transport.script(failure, failure, 202)  # type: ignore[arg-type]
    rig = Rig(transport)
    batch = make_batch(["a"])
    rig.queue.put(batch)
    rig.drain()
    assert [r.idempotency_key for r in transport.requests] == [batch.id] * 3
    assert rig.queue.stats().empty
    assert rig.events[-1] == ("sent", (batch.id, 3))
    assert [e for e in rig.events if e[0] == "failed"] == [
        ("failed", (getattr(failure, "real", None), True))] * 2


def test_400_splits_until_bad_objects_are_isolated() -> None:
    bad = {"k3", "k9"}

    def ms4(request: Request) -> Response:
        objects = json.loads(request.body)
        wrong = [o["invoice_id"] for o in objects if o["invoice_id"] in bad]
        if wrong:
            return Response(400, text=f"invalid invoice_id {wrong[0]}")
        return Response(202)

    transport = MemoryTransport(ms4)
    rig = Rig(transport)
    ids = [f"k{i}" for i in range(16)]
    rig.queue.put(make_batch(ids))
    rig.drain()
    delivered = [o["invoice_id"] for r in transport.accepted for o in json.loads(r.body)]
    assert sorted(delivered) == sorted(set(ids) - bad)
    assert len(delivered) == len(set(delivered))
    letters = rig.dead.all()
    assert {letter.invoice_id for letter in letters} == bad
    for letter in letters:
        assert letter.stage == "ms4"
        assert letter.reason == f"MS4 rejected the object: invalid invoice_id {letter.invoice_id}"
        assert json.loads(letter.payload)["invoice_id"] == letter.invoice_id
    # never resent an unchanged batch after a 400
    bodies = [r.body for r in transport.requests]
    assert len(bodies) == len(set(bodies))
    assert rig.queue.stats().empty


def test_abort_releases_the_batch_back_to_the_queue() -> None:
    transport = MemoryTransport(lambda r: Response(500))
    rig = Rig(transport)
    rig.sender = Sender(name="s1", queue=rig.queue, transport=transport, dead_letters=rig.dead,
                        observers=pluginmanager.Observers(
                            pluginmanager.make_plugin_manager(entry_points=False)),
                        stats=rig.stats, pacer=fast_pacer(), stop=rig.stop, abort=rig.abort,
                        retry_initial=5, retry_max=5)
    batch = make_batch(["a", "b"])
    rig.queue.put(batch)
    delivery = rig.queue.get("s1", timeout=1)
    assert delivery is not None
    threading.Timer(0.2, rig.abort.set).start()
    rig.sender.deliver(delivery)
    stats = rig.queue.stats()
    assert (stats.ready, stats.in_flight) == (1, 0)
    assert len(transport.requests) == 1


def test_failing_observer_plugin_does_not_stop_delivery() -> None:
    class Broken:
        @pluginmanager.hookspecs.hookimpl
        def ms1_batch_sent(self, batch: Batch, status: int, attempt: int,
                           latency: float) -> None:
            raise RuntimeError("metrics plugin bug")

    rig = Rig(MemoryTransport())
    rig.sender._observers = pluginmanager.Observers(
        pluginmanager.make_plugin_manager(entry_points=False, plugins=[Broken()]))
    rig.queue.put(make_batch(["a"]))
    rig.drain()
    assert rig.queue.stats().empty


def test_batch_handed_out_more_than_max_deliveries_is_dead_lettered() -> None:
    rig = Rig(MemoryTransport())
    rig.sender.settings.replace(SendSettings(retry_initial=0.001, retry_max=0.01,
                                             max_deliveries=2))
    batch = make_batch(["a", "b"])
    rig.queue.put(batch)
    for _ in range(2):  # two deliveries that never finished (crashed senders)
        delivery = rig.queue.get("s1", timeout=1)
        assert delivery is not None
        rig.queue.release(delivery)
    third = rig.queue.get("s1", timeout=1)
    assert third is not None and third.attempts == 3
    rig.sender.deliver(third)
    assert rig.transport.requests == []  # not sent again
    assert rig.queue.stats().empty
    letters = rig.dead.all()
    assert [letter.invoice_id for letter in letters] == ["a", "b"]
    assert "delivered 3 times" in letters[0].reason and "max_deliveries = 2" in letters[0].reason


def test_422_splits_like_400_until_the_refused_object_is_isolated() -> None:
    def ms4(request: Request) -> Response:
        ids = [o["invoice_id"] for o in json.loads(request.body)]
        return Response(422, text="unprocessable: k5") if "k5" in ids else Response(202)

    transport = MemoryTransport(ms4)
    rig = Rig(transport)
    rig.queue.put(make_batch([f"k{i}" for i in range(8)]))
    rig.drain()
    [letter] = rig.dead.all()
    assert letter.invoice_id == "k5" and letter.ms4_answer == "422 unprocessable: k5"
    bodies = [r.body for r in transport.requests]
    assert len(bodies) == len(set(bodies))  # no unchanged batch resent
    assert rig.queue.stats().empty


@pytest.mark.parametrize("status", [409, 408, 200, 204, 302])
def test_answers_that_are_no_acceptance_resend_the_unchanged_batch(status: int) -> None:
    """409 (a request with this key in progress), 408, a 2xx but 202, a redirect: never
    acked, never split (new keys would duplicate what MS4 may be storing), never dropped:
    the same batch, same key, until 202."""
    transport = MemoryTransport()
    transport.script(status, 202)
    rig = Rig(transport)
    batch = make_batch(["a", "b"])
    rig.queue.put(batch)
    rig.drain()
    assert [(r.idempotency_key, r.body) for r in transport.requests] == \
        [(batch.id, batch.body())] * 2
    assert rig.events == [("failed", (status, True)), ("sent", (batch.id, 2))]
    assert rig.dead.all() == [] and rig.queue.stats().empty
