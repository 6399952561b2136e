"""Stage 3: the outbound queue, the durable buffer between batching and sending.

A :class:`QueueBackend` stores batches until MS4 accepted them. Senders
``get`` a :class:`Delivery`, and the sender module decides its fate: ``ack``
(MS4 answered 202, or every object is in the dead letters), ``replace`` (a
400 split it into parts), ``merge`` (the parts of batches split before a refusal
storm was recognised, joined again), or ``release`` (give it back undelivered, on
shutdown). Built in: :class:`MemoryQueue`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ms1.model import DEFAULT_MAX_PAYLOAD_BYTES, Batch
from ms1.pipeline.source import Source


@dataclass(frozen=True, slots=True)
class Delivery:
    """A batch handed to one sender. ``token`` is the backend's handle; ``attempts``
    counts deliveries of this batch including this one."""

    batch: Batch
    token: str
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class QueueStats:
    """``ready``: batches waiting for a sender; ``in_flight``: handed out, not yet acked.
    ``losses``: stored work the backend found gone since it started (a stream evicted,
    deleted or flushed under it), each said in a line; ``lost_batches``: the batches they
    held, as last counted (at least). ``newer``: entries a newer ms1 wrote, left
    untouched for it."""

    ready: int
    in_flight: int
    invoices: int | None = 0  # None: the backend cannot count them cheaply
    losses: tuple[str, ...] = ()
    lost_batches: int = 0
    #: stored entries of a newer format than this version reads (a newer ms1 wrote them):
    #: left untouched, each named
    newer: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.ready == 0 and self.in_flight == 0


class QueueBackend(ABC):
    """Contract of a queue backend plugin. Every method is called from many threads."""

    name: str = "?"
    #: seconds one call may block by design (its own timeouts), None: not bounded here;
    #: the service warns when ``[ms1] watchdog_timeout`` is not above it
    longest_call: float | None = None
    #: whether batches survive the end of this process (decides what shutdown waits for)
    durable: bool = False
    #: whether :meth:`put_many` is all-or-nothing (atomic, or idempotent when retried
    #: after a failure), so the committer may store several batches in one call
    group_commit: bool = False
    #: most payload bytes a dead letter keeps when the backend sets aside an entry that is
    #: no batch ([dead_letters] max_payload_bytes; set when the queue is built and reloaded)
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    @abstractmethod
    def put(self, batch: Batch, source: Source | None = None) -> bool:
        """Store the batch; when this returns it is safe (durably, for a durable backend).

        If the backend can acknowledge the batch's inbound ``refs`` at ``source`` in the
        same atomic step (the Redis backend does, for a Redis source on the same server),
        it does so and returns True; otherwise it returns False and the caller acks them.
        """

    def put_many(self, batches: Sequence[Batch], source: Source | None = None) -> bool:
        """Store several batches; same meaning and return value as :meth:`put`.

        With ``group_commit`` True the committer calls this with every batch that piled
        up while it waited for the previous store, and retries the whole call after a
        failure: an override must then store all or nothing (or recognise on the retry
        what it stored). The default puts them one by one; it is used only one batch at
        a time (``group_commit`` False)."""
        acked = [self.put(batch, source) for batch in batches]
        return bool(acked) and all(acked)

    @abstractmethod
    def get(self, consumer: str, timeout: float) -> Delivery | None:
        """Hand one batch to ``consumer``, waiting at most ``timeout`` s; None if none came."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The batch is done (delivered or dead-lettered): forget it."""

    @abstractmethod
    def replace(self, delivery: Delivery, parts: Sequence[Batch]) -> None:
        """Atomically store ``parts`` and ack ``delivery`` (a batch split after a 400)."""

    def merge(self, deliveries: Sequence[Delivery], batch: Batch) -> bool:
        """Atomically store ``batch`` and ack ``deliveries`` (all held by this process),
        or change nothing and return False: a delivery is no longer this consumer's (its
        lease ran out and another took it), or the backend cannot merge (this default:
        the parts are then sent as they are). Raises :class:`~ms1.errors.QueueError`
        when the outcome is unknown: ``deliveries`` are then no longer kept alive, so if
        the merge did not happen they are handed out again after their lease."""
        return False

    def held_messages(self) -> set[str] | None:
        """The message ids of every batch the queue holds (waiting or in flight), for
        ``reconcile``; None when this backend cannot list them."""
        return None

    @abstractmethod
    def release(self, delivery: Delivery) -> None:
        """Give the batch back undelivered; it will be handed out again."""

    @abstractmethod
    def stats(self) -> QueueStats:
        """Current counts, for ``--once``, status and metrics."""

    def describe(self) -> dict[str, object]:
        """Details for ``ms1-service status`` (lengths, consumers, ...)."""
        stats = self.stats()
        return {"backend": self.name, "ready": stats.ready, "in_flight": stats.in_flight,
                "invoices": stats.invoices}

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections. Batches not acked stay queued (if durable)."""


class MemoryQueue(QueueBackend):
    """In-process queue (like dramatiq's StubBroker): FIFO, thread-safe, not durable."""

    name = "memory"
    durable = False
    group_commit = True

    def __init__(self) -> None:
        self._ready: deque[tuple[Batch, int]] = deque()
        self._in_flight: dict[str, tuple[Batch, int]] = {}
        self._cond = threading.Condition()
        self._seq = 0

    def put(self, batch: Batch, source: Source | None = None) -> bool:
        return self.put_many([batch], source)

    def put_many(self, batches: Sequence[Batch], source: Source | None = None) -> bool:
        with self._cond:
            self._ready.extend((batch, 0) for batch in batches)
            self._cond.notify(len(batches))
        return False

    def get(self, consumer: str, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            batch, attempts = self._ready.popleft()
            self._seq += 1
            token = f"{consumer}/{self._seq}"
            self._in_flight[token] = (batch, attempts + 1)
            return Delivery(batch, token, attempts + 1)

    def ack(self, delivery: Delivery) -> None:
        with self._cond:
            self._in_flight.pop(delivery.token, None)
            self._cond.notify_all()

    def replace(self, delivery: Delivery, parts: Sequence[Batch]) -> None:
        with self._cond:
            self._in_flight.pop(delivery.token, None)
            # parts go first: they are older than anything queued after the original
            for part in reversed(parts):
                self._ready.appendleft((part, 0))
            self._cond.notify_all()

    def merge(self, deliveries: Sequence[Delivery], batch: Batch) -> bool:
        with self._cond:
            if any(d.token not in self._in_flight for d in deliveries):
                return False
            for delivery in deliveries:
                del self._in_flight[delivery.token]
            self._ready.appendleft((batch, 0))
            self._cond.notify_all()
            return True

    def held_messages(self) -> set[str] | None:
        with self._cond:
            held = [*(b for b, _ in self._ready), *(b for b, _ in self._in_flight.values())]
        return {message for batch in held for message in batch.message_ids}

    def release(self, delivery: Delivery) -> None:
        with self._cond:
            entry = self._in_flight.pop(delivery.token, None)
            if entry is not None:
                self._ready.appendleft(entry)
                self._cond.notify_all()

    def stats(self) -> QueueStats:
        with self._cond:
            invoices = sum(len(b) for b, _ in self._ready)
            invoices += sum(len(b) for b, _ in self._in_flight.values())
            return QueueStats(len(self._ready), len(self._in_flight), invoices)
