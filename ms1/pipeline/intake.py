"""Stage 2: intake — processing and batching, where an inbound e-mail gets acked.

:class:`Intake` is driven by two threads. The batching thread calls
:meth:`Intake.handle`: for each inbound message it runs
:func:`~ms1.pipeline.processor.unified_email_processor`; an accepted payload goes to the batch
policy, a rejected e-mail becomes a dead letter (an internal error of the processor is
counted as ``processor_errors`` too). Dead letters keep the e-mail as it was read; the
store cuts it to ``[dead_letters] max_payload_bytes``. What that produces — closed batches,
dead letters — is *work to commit*, handed to ``handoff``. The committing thread calls
:meth:`Intake.commit` on it: store it (queue or dead letters), then acknowledge its
inbound messages to the source. So an inbound message is acknowledged only once it is
safe, and processing never waits for a Redis round trip.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from ms1.errors import Ms1Error
from ms1.heartbeat import Outage, Progress
from ms1.model import Batch, DeadLetter, InboundMessage, Item
from ms1.observers import Observers
from ms1.pipeline.batching import BatchPolicy
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger, LedgerEvent
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.processor import Accepted, unified_email_processor
from ms1.pipeline.source import Source
from ms1.pipeline.stats import RunStats

log = logging.getLogger(__name__)
T = TypeVar("T")
#: what the batching thread hands to the committing thread
Work = Batch | list[DeadLetter]


class Intake:
    """Turns inbound messages into enqueued batches and dead letters. One thread only."""

    def __init__(
        self, *, source: Source, policy: BatchPolicy, queue: QueueBackend,
        dead_letters: DeadLetterStore, observers: Observers, stats: RunStats,
        abort: threading.Event, retry_delay: float = 1.0,
        handoff: Callable[[Work], None] | None = None, progress: Progress | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        """``progress``: where the committing thread beats before each store it tries and
        marks its retries while the store is unreachable (the service's)."""
        self._progress = progress if progress is not None else Progress()
        #: where each stored batch and rejected e-mail is recorded first (None: nowhere)
        self._ledger = ledger
        self._handoff = handoff or self.commit
        self._source = source
        self._policy = policy
        self._queue = queue
        self._dead_letters = dead_letters
        self._observers = observers
        self._stats = stats
        self._abort = abort
        self._retry_delay = retry_delay
        #: storing, as the committing thread sees it (``/readyz``; one line each way)
        self.outage = Outage("storing batches and dead letters", logger=log)

    def handle(self, messages: Sequence[InboundMessage]) -> None:
        """Process a chunk of messages; close and enqueue every batch that fills up."""
        letters: list[DeadLetter] = []
        policy = self._policy
        self._stats.add("emails_read", len(messages))
        for message in messages:
            if message.problem is not None:  # not an e-mail at all: kept as it was read
                letters.append(DeadLetter(reason=message.problem, stage="source",
                                          payload=message.data, source_ref=message.ref))
                continue
            result = unified_email_processor(message.data, message.ref)
            if isinstance(result, Accepted):
                item = Item(result.payload, result.invoice_id, result.message_id, message.ref)
                reason = policy.oversize(item)
                if reason is None:
                    for batch in policy.add(item):
                        self._handoff(batch)
                    continue
                letters.append(DeadLetter(
                    reason=reason, stage="batching", payload=item.payload,
                    message_id=item.message_id, invoice_id=item.invoice_id,
                    source_ref=message.ref))
            else:
                if result.internal_error:  # logged with its traceback by the processor
                    self._stats.add("processor_errors")
                letters.append(DeadLetter(
                    reason=result.reason, stage="processor", payload=message.data,
                    message_id=result.message_id, source_ref=message.ref))
        if letters:
            self._handoff(letters)

    def deadline(self) -> float | None:
        """When the open batch must be flushed (``time.monotonic()``), or None."""
        return self._policy.deadline()

    def tick(self, now: float) -> None:
        """Flush the open batch if it has waited ``max_wait``."""
        deadline = self._policy.deadline()
        if deadline is not None and deadline <= now:
            self.flush()

    def flush(self) -> None:
        """Close and enqueue the partial batch (source ran dry, or shutdown)."""
        batch = self._policy.flush()
        if batch is not None:
            self._handoff(batch)

    def commit(self, work: Work) -> None:
        """Make ``work`` safe, then acknowledge its inbound messages (committing thread)."""
        self.commit_many([work])

    def commit_many(self, works: Sequence[Work]) -> None:
        """:meth:`commit` several pieces of work in order; consecutive batches are stored
        with one :meth:`~ms1.pipeline.outbound.QueueBackend.put_many` (one round trip to Redis) when
        the queue's ``group_commit`` says that is all-or-nothing."""
        batches: list[Batch] = []
        for work in works:
            if isinstance(work, Batch):
                batches.append(work)
                continue
            if batches:
                self._enqueue(batches)
                batches = []
            self._dead_letter(work)
        if batches:
            self._enqueue(batches)

    def _enqueue(self, batches: list[Batch]) -> None:
        if len(batches) > 1 and not self._queue.group_commit:
            for batch in batches:  # each stored and retried on its own
                self._enqueue([batch])
            return
        what = (f"enqueue batch {batches[0].id}" if len(batches) == 1
                else f"enqueue {len(batches)} batches ({batches[0].id} ...)")
        self._record([LedgerEvent("batched", batch.id, batch.invoice_ids, batch.message_ids,
                                  batch.refs, read_after=batch.created_at)
                      for batch in batches])
        acked = self._persist(lambda: self._queue.put_many(batches, self._source), what)
        if not acked:
            self._ack([ref for batch in batches for ref in batch.refs])
        self._stats.add("batches_enqueued", len(batches))
        self._stats.add("invoices_enqueued", sum(len(batch) for batch in batches))
        for batch in batches:
            self._observers.batch_enqueued(batch)

    def _dead_letter(self, letters: list[DeadLetter]) -> None:
        self._record([LedgerEvent(
            "rejected", f"e-{letter.source_ref or letter.message_id or letter.id}",
            (letter.invoice_id,) if letter.invoice_id else (),
            (letter.message_id,) if letter.message_id else (),
            (letter.source_ref,) if letter.source_ref else (), detail=letter.reason[:1000])
            for letter in letters])
        acked = self._persist(lambda: self._dead_letters.add(letters, self._source),
                              f"store {len(letters)} dead letters")
        if not acked:
            self._ack([letter.source_ref for letter in letters if letter.source_ref])
        self._stats.add("rejected", len(letters))
        self._stats.add("dead_lettered", len(letters))
        for letter in letters:
            log.info("rejected %s (%s): %s", letter.message_id or "e-mail without message_id",
                     letter.source_ref, letter.reason)
            self._observers.payload_rejected(letter)

    def _record(self, events: list[LedgerEvent]) -> None:
        """Record ``events`` in the ledger before what they describe is stored (a stored
        batch has its record; a crash between leaves a record of one batched again)."""
        ledger = self._ledger
        if ledger is not None and events:
            self._persist(lambda: ledger.record(events),
                          f"record {len(events)} {events[0].kind} events in the ledger")

    def _ack(self, refs: Sequence[str]) -> None:
        if refs:
            self._persist(lambda: self._source.ack(refs), f"ack {len(refs)} inbound e-mails")

    def _persist(self, action: Callable[[], T], what: str) -> T:
        """Run ``action`` until it succeeds: the data is held here until it is safe."""
        thread = threading.current_thread().name
        outage = self.outage
        while True:
            self._progress.beat(thread, what)
            try:
                with outage.calling():
                    result = action()
            except Ms1Error as exc:
                outage.failed("cannot %s (%s); holding the data and retrying every %.1f s",
                              what, exc, self._retry_delay)
            else:
                outage.answered("recovered: could %s again", what)
                return result
            with self._progress.waiting(thread, f"cannot {what}: retrying every "
                                                f"{self._retry_delay:g} s"):
                if self._abort.wait(self._retry_delay):
                    raise Ms1Error(f"shutdown deadline passed before we could {what}")
