"""Stage 4: the sender threads — where a batch gets acked.

Each :class:`Sender` takes a batch from the queue, sends it through the
transport and settles it by the row of MS4's answer in the answer table
(:mod:`ms1.pipeline.sending.answers`, which :meth:`Pacer.done` returns):

More: docs/internals.md, ``ms1.pipeline.sending.sender``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from ms1.errors import Ms1Error, QueueError, TransportError
from ms1.heartbeat import Outage, Progress
from ms1.model import Batch, DeadLetter
from ms1.observers import Observers
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Attempt, Ledger, LedgerEvent
from ms1.pipeline.outbound import Delivery, QueueBackend
from ms1.pipeline.sending.answers import Answer, Kind
from ms1.pipeline.sending.concurrency import Controller
from ms1.pipeline.sending.fragments import Fragments
from ms1.pipeline.sending.pacer import Aborted, Admission, Left, Pacer
from ms1.pipeline.sending.refusals import RefusalReader
from ms1.pipeline.stats import RunStats
from ms1.pipeline.transport import Request, Response, Transport

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SendSettings:
    """The ``[send]`` options a sender reads while it runs; a reload replaces the whole
    object (:meth:`SharedSettings.replace`), so an attempt sees one consistent set."""

    retry_initial: float = 0.5
    retry_max: float = 30.0
    max_deliveries: int = 0
    #: which objects a refusal names (``[send] refusal_json_details``,
    #: ``refusal_index_pattern``)
    refusals: RefusalReader = field(default_factory=RefusalReader)

    def backoff(self, state: RetryCallState) -> float:
        """Seconds before the next retry: exponential from ``retry_initial``, with jitter,
        at most ``retry_max``."""
        wait = wait_exponential_jitter(multiplier=self.retry_initial * 2, max=self.retry_max,
                                       jitter=self.retry_initial)
        return float(wait(state))


class SharedSettings:
    """The one :class:`SendSettings` every sender reads; the service swaps it on reload
    (one reference assignment: a reader sees the old object or the new one, whole)."""

    def __init__(self, settings: SendSettings) -> None:
        self._settings = settings

    @property
    def current(self) -> SendSettings:
        return self._settings

    def replace(self, settings: SendSettings) -> None:
        self._settings = settings


class InFlight:
    """Requests to MS4 in flight now, over every sender (``with in_flight:`` around a
    send); :meth:`take_peak` gives the most at once since it was last called."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self._peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self._now += 1
            self._peak = max(self._peak, self._now)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            self._now -= 1

    @property
    def current(self) -> int:
        with self._lock:
            return self._now

    def take_peak(self) -> int:
        """The most requests in flight at once since the last call (or the start)."""
        with self._lock:
            peak, self._peak = self._peak, self._now
            return peak


class _Merged(Exception):
    """The delivery was merged with other fragments into a batch of its own in the queue
    (or the merge's outcome is unknown: it is then handed out again after its lease)."""


class _SendFailed(Exception):
    """An attempt that should be retried (no answer, 5xx, 401, 429, unexpected status);
    ``paced``: the pacer decides when (a stop or a 429 pause), not the backoff."""

    def __init__(self, status: int | None, error: str, paced: bool = False) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.paced = paced


#: the longest the sender whose turn it is waits on the queue at once (a batch put wakes
#: it at once; a stop is seen within this)
IDLE_WAIT = 2.0


class IdlePoll:
    """Whose turn it is to ask the queue for work while the senders are idle: one sender
    at a time waits on the queue (a condition in memory, a blocking XREADGROUP in Redis);
    the others wait here on a condition, not a poll. The turn passes on as soon as the
    one holding it gets a batch (so the next batch is taken at once) or gives up; a stop,
    an abort or a retirement wakes everyone (:meth:`wake_all`, called by
    :class:`WakingEvent`). A wait is at most ``fallback`` s between looks at ``done``.
    Idle, 64 senders cost one queue wait per ``poll`` instead of 64."""

    def __init__(self, fallback: float = 30.0) -> None:
        self._cond = threading.Condition()
        self._polling = False
        self._fallback = fallback

    def take(self, done: Callable[[], bool]) -> bool:
        """Wait for the turn: True once it is this caller's, False once ``done()``."""
        with self._cond:
            while self._polling:
                if done():
                    return False
                self._cond.wait(self._fallback)
            if done():
                return False
            self._polling = True
            return True

    def give(self) -> None:
        with self._cond:
            self._polling = False
            self._cond.notify()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


class WakingEvent(threading.Event):
    """An Event that also wakes the senders waiting for their turn (:class:`IdlePoll`)
    when it is set: the service's ``senders_stop`` and ``abort``."""

    def __init__(self, idle: IdlePoll) -> None:
        super().__init__()
        self._idle = idle

    def set(self) -> None:
        super().set()
        self._idle.wake_all()


class Sender:
    """One sender thread's loop. ``stop``: take no new batch; ``abort``: give back and leave."""

    def __init__(
        self, *, name: str, queue: QueueBackend, transport: Transport,
        dead_letters: DeadLetterStore, observers: Observers, stats: RunStats,
        pacer: Pacer, stop: threading.Event, abort: threading.Event,
        settings: SharedSettings | None = None, in_flight: InFlight | None = None,
        progress: Progress | None = None, concurrency: Controller | None = None,
        retry_initial: float = 0.5, retry_max: float = 30.0, poll: float = 0.2,
        idle: IdlePoll | None = None, outage: Outage | None = None,
        max_deliveries: int = 0, fragments: Fragments | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        """``settings``: the shared settings to read (the service's); without it, the
        sender has its own, from ``retry_initial``, ``retry_max`` and ``max_deliveries``.
        ``fragments``: where the service's senders park split halves during a refusal
        storm, to merge them (None: never parked, sent as they are). ``ledger``: where each
        batch's outcome is recorded before the step that settles it (None: nowhere)."""
        self.name = name
        self._queue = queue
        self._transport = transport
        self._dead_letters = dead_letters
        self._observers = observers
        self._stats = stats
        self._pacer = pacer
        self._stop = stop
        self._abort = abort
        self.settings = settings if settings is not None else SharedSettings(SendSettings(
            retry_initial=retry_initial, retry_max=retry_max, max_deliveries=max_deliveries))
        self._in_flight = in_flight if in_flight is not None else InFlight()
        #: where this sender beats and marks its bounded waits (the service's)
        self._progress = progress if progress is not None else Progress()
        self._poll = poll
        self._idle = idle
        #: the queue's outages, shared by the service's senders (one log line each way)
        self._outage = outage if outage is not None else Outage(
            "taking and settling batches", logger=log)
        #: the gate an attempt takes a slot of, and is told its outcome (None: no gate)
        self._concurrency = concurrency
        self._fragments = fragments
        self._ledger = ledger
        self._attempts: list[Attempt] = []  # the current delivery's, for its ledger record
        self._unparked = ""  # the delivery parked once, to be sent as it is
        self._retire_lock = threading.Lock()
        self._retired = False
        self._left = False

    @property
    def retiring(self) -> bool:
        """Told to leave after its current batch (and not kept since)."""
        with self._retire_lock:
            return self._retired

    def retire(self) -> None:
        """Leave after the current batch (the sender count was lowered by a reload)."""
        with self._retire_lock:
            self._retired = True
        if self._idle is not None:
            self._idle.wake_all()

    def keep(self) -> bool:
        """Undo :meth:`retire` (the count was raised again): True if the sender stays,
        False if it has already left its loop."""
        with self._retire_lock:
            if self._left:
                return False
            self._retired = False
            return True

    def _leaving(self) -> bool:
        with self._retire_lock:
            if self._retired:
                self._left = True
            return self._retired

    def run(self) -> None:
        try:
            self._run()
        finally:
            with self._retire_lock:
                self._left = True

    def _done(self) -> bool:
        return self._stop.is_set() or self._abort.is_set() or self._leaving()

    def _take(self) -> Delivery | None:
        """A batch from the queue, or None within about ``poll`` s. While idle, one sender
        at a time asks the queue; the others wait for their turn (:class:`IdlePoll`)."""
        idle = self._idle
        if idle is None:
            return self._queue.get(self.name, timeout=self._poll)
        with self._progress.waiting(self.name, "idle: another sender asks the queue"):
            turn = idle.take(self._done)
        if not turn:
            return None
        try:  # the one asking may wait longer: a batch put wakes it, a stop within IDLE_WAIT
            wait = max(self._poll, IDLE_WAIT)
            with self._outage.calling(wait):
                return self._queue.get(self.name, timeout=wait)
        finally:
            idle.give()

    def _run(self) -> None:
        while not self._done():
            self._progress.beat(self.name, "taking a batch from the queue")
            polled = time.monotonic()
            try:
                delivery = self._take()
                if delivery is None and self._done():
                    break
            except QueueError as exc:
                self._outage.failed("cannot take batches from queue %s (%s); the senders "
                                    "wait for it", self._queue.name, exc)
                with self._progress.waiting(self.name, "queue unreachable: asking again in 1 s"):
                    self._abort.wait(1.0)
                continue
            self._outage.answered("queue %s answers again", self._queue.name)
            if delivery is not None:
                self.deliver(delivery)
            else:
                self._pacer.held.add("empty_queue", time.monotonic() - polled)

    def deliver(self, delivery: Delivery) -> None:
        """Send one delivery until it is settled (acked, split, dead-lettered) or released."""
        max_deliveries = self.settings.current.max_deliveries
        self._attempts = []
        if max_deliveries and delivery.attempts > max_deliveries:
            self._give_up(delivery, max_deliveries)
            return
        try:
            try:
                self._attempt(delivery, 1)  # the common case, without tenacity's bookkeeping
                return
            except _Merged:
                return
            except _SendFailed as first:
                failed = first
            retrying = Retrying(
                wait=self._wait,
                retry=retry_if_exception_type(_SendFailed),
                sleep=self._sleep,
                reraise=True,
            )
            # tenacity takes over from the second attempt: wait as after the first failure
            self._sleep(self._first_wait(failed))
            for attempt in retrying:
                with attempt:
                    self._attempt(delivery, attempt.retry_state.attempt_number + 1)
        except _Merged:
            return
        except Aborted:
            with contextlib.suppress(QueueError):
                self._queue.release(delivery)
            self._observers.batch_failed(
                delivery.batch, status=None,
                error="shutdown deadline passed: released back to the queue",
                attempt=0, will_retry=False)

    def _wait(self, state: RetryCallState) -> float:
        """Backoff before the next attempt; none after a stop or a 429, where the pacer
        waits."""
        outcome = state.outcome
        failure = outcome.exception() if outcome is not None else None
        if isinstance(failure, _SendFailed) and failure.paced:
            return 0.0
        return self.settings.current.backoff(state)

    def _settle(self, action: Callable[[], object], what: str) -> None:
        """Run a queue/dead-letter step until it succeeds; on abort, leave the batch queued
        (it will be redelivered: a possible duplicate, never a loss)."""
        while True:
            self._progress.beat(self.name, what)
            try:
                with self._outage.calling():
                    action()
            except Ms1Error as exc:
                self._outage.failed("cannot %s (%s); the senders retry until the queue "
                                    "answers", what, exc)
                with self._progress.waiting(self.name, f"cannot {what}: retrying"):
                    if self._abort.wait(0.5):
                        raise Aborted from exc
                continue
            self._outage.answered("the queue answers again (could %s)", what)
            return

    def _give_up(self, delivery: Delivery, max_deliveries: int) -> None:
        """Dead-letter every object of a batch delivered more than ``max_deliveries`` times."""
        batch = delivery.batch
        reason = (f"batch {batch.id} was delivered {delivery.attempts} times without being "
                  f"accepted ([send] max_deliveries = {max_deliveries})")
        letters = [DeadLetter(reason=reason, stage="ms4", payload=payload, message_id=mid,
                              invoice_id=iid)
                   for payload, iid, mid in zip(batch.payloads, batch.invoice_ids,
                                                batch.message_ids, strict=True)]
        try:
            self._record(self._event("dead_lettered", batch, detail=reason))
            self._settle(lambda: self._dead_letters.add(letters), f"dead-letter batch {batch.id}")
            self._settle(lambda: self._queue.ack(delivery), f"ack batch {batch.id}")
        except Aborted:
            return
        self._stats.add("dead_lettered", len(letters))
        log.error("%s: its %d invoices are in the dead letters", reason, len(letters))
        for letter in letters:
            self._observers.payload_rejected(letter)

    def _first_wait(self, failure: _SendFailed) -> float:
        return 0.0 if failure.paced else self.settings.current.retry_initial

    def _sleep(self, seconds: float) -> None:
        with self._progress.waiting(self.name, f"retry backoff ({seconds:.1f} s)"):
            if self._abort.wait(seconds):
                raise Aborted

    def _attempt(self, delivery: Delivery, attempt: int) -> None:
        """One attempt in a slot of the concurrency gate: taken with a batch in hand (a
        sender without one holds none), given back once the answer is settled."""
        while True:
            if self._parkable(delivery):
                self._park(delivery)  # raises _Merged once the delivery is merged
            try:
                self._attempt_gated(delivery, attempt)
                return
            except Left:  # a storm began while it waited for the pacer: park it
                continue

    def _attempt_gated(self, delivery: Delivery, attempt: int) -> None:
        controller = self._concurrency
        if controller is None:
            self._attempt_in_slot(delivery, attempt)
            return
        gate = controller.gate
        leave = (lambda: self._parkable(delivery)) if self._fragments is not None else None
        with self._progress.waiting(self.name, "waiting for a concurrency slot"):
            gate.acquire(self._abort, leave=leave)
        try:
            self._attempt_in_slot(delivery, attempt)
        finally:
            gate.release()

    def _parkable(self, delivery: Delivery) -> bool:
        """A split half, while a refusal storm holds sending (and not parked before)."""
        return self._fragments is not None and delivery.token != self._unparked and \
            self._pacer.in_storm and self._pacer.is_fragment(delivery.batch.id)

    def _park(self, delivery: Delivery) -> None:
        """Park the fragment until others join it (:mod:`ms1.pipeline.sending.fragments`); raise
        :class:`_Merged` once it is merged, return to send it as it is."""
        assert self._fragments is not None
        with self._progress.waiting(self.name, "a fragment parked: waiting for others"):
            group = self._fragments.park(delivery, lambda: self._pacer.in_storm, self._abort)
        if group is None:
            self._unparked = delivery.token
            return
        if not group:
            raise _Merged
        batch = Batch.join([part.batch for part in group])
        try:
            merged = self._queue.merge(group, batch)
        except QueueError as exc:
            log.warning("could not merge %d fragments (%s): they are handed out again after "
                        "their lease", len(group), exc)
            raise _Merged from exc
        if not merged:
            for partner in group[1:]:
                with contextlib.suppress(QueueError):
                    self._queue.release(partner)
            self._unparked = delivery.token
            return
        if len(batch) < self._fragments.limits().max_items:  # it may take more yet
            self._pacer.split_for_refusal([batch.id])
        self._record(self._event("merged", batch, parts=tuple(p.batch.id for p in group),
                                 attempts=False))
        self._stats.add("batches_merged")
        log.info("%d fragments of batches split before the refusal storm was recognised "
                 "merged into batch %s (%d invoices)", len(group), batch.id, len(batch),
                 extra={"batch": batch.id, "size": len(batch)})
        self._observers.batch_enqueued(batch)
        raise _Merged

    def _observe(self, answer: Answer, latency: float) -> None:
        if self._concurrency is not None:
            self._concurrency.observe(answer, latency)

    def _admit(self, delivery: Delivery) -> Admission:
        controller = self._concurrency
        ahead = controller.lookahead if controller is not None else 0.0
        leave = (lambda: self._parkable(delivery)) if self._fragments is not None else None
        with self._progress.waiting(self.name, "held back by the pacer"):
            admission = self._pacer.admit(self._abort, ahead, leave)
        if controller is not None:  # what the window lets go next may open the gate
            controller.admitted(self._pacer.limiter.free_hint)
        return admission

    def _attempt_in_slot(self, delivery: Delivery, attempt: int) -> None:
        batch = delivery.batch
        request = Request(batch.path, batch.body(), batch.id, len(batch), attempt)
        admission = self._admit(delivery)
        # a request in flight is no bounded wait: past watchdog_timeout it is a stall
        self._progress.beat(self.name, f"sending batch {batch.id} to MS4 (attempt {attempt})")
        started = time.perf_counter()
        sent_at = time.time()
        try:
            with self._in_flight:
                response = self._transport.send(request)
        except TransportError as exc:
            self._attempts.append(Attempt(sent_at, None, time.perf_counter() - started,
                                          request.traceparent))
            self._observe(self._pacer.done(admission, None, sent=exc.sent,
                                           misconfigured=str(exc) if exc.misconfigured else ""),
                          time.perf_counter() - started)
            self._failed(batch, None, str(exc), attempt)
            raise _SendFailed(None, str(exc)) from exc
        except BaseException:
            self._pacer.done(admission, None)
            raise
        latency = time.perf_counter() - started
        self._attempts.append(Attempt(sent_at, response.status, latency, request.traceparent))
        location = response.headers.get("location")
        detail = f"Location: {location}" if location else response.text[:200].strip()
        answer = self._pacer.done(admission, response.status,
                                  response.headers.get("retry-after"), detail, response.sent,
                                  response.headers)
        self._observe(answer, latency)
        self._stats.add(f"responses_{response.status}")
        if answer.kind is Kind.ACCEPTED:
            self._record(self._event("accepted", batch))
            self._settle(lambda: self._queue.ack(delivery), f"ack batch {batch.id}")
            self._stats.add("batches_delivered")
            self._stats.add("invoices_delivered", len(batch))
            log.info("batch sent", extra={"batch": batch.id, "size": len(batch), "status": 202,
                                          "attempt": attempt, "latency_ms": latency * 1000})
            self._observers.batch_sent(batch, status=202, attempt=attempt, latency=latency)
            return
        if answer.kind is Kind.REFUSED:
            self._split(delivery, response, attempt)
            return
        # the pacer has alerted (a stop: once per spell; the breaker: when it opens)
        error = f"MS4 answered {answer.name}: {detail}".rstrip(": ")
        self._failed(batch, response.status, error, attempt)
        raise _SendFailed(response.status, error, paced=answer.kind.paced)

    def _event(self, kind: str, batch: Batch, *, detail: str = "",
               parts: tuple[str, ...] = (), attempts: bool = True,
               batch_id: str = "") -> LedgerEvent:
        """A ledger event of ``batch`` (its invoices, e-mails and inbound refs; with this
        delivery's attempts unless ``attempts`` is False)."""
        return LedgerEvent(kind, batch_id or batch.id, batch.invoice_ids, batch.message_ids,
                           batch.refs, detail=detail, parts=parts,
                           attempts=tuple(self._attempts) if attempts else (),
                           read_after=batch.created_at)

    def _record(self, *events: LedgerEvent) -> None:
        """Record ``events`` in the ledger before the step they describe is settled (a
        settled step has its record; a crash between leaves a record of a step that
        happens again). Held and retried like a queue step while the store is down."""
        ledger = self._ledger
        if ledger is not None and events:
            self._settle(lambda: ledger.record(events),
                         f"record {events[0].kind} of batch {events[0].batch_id} in the ledger")

    def _failed(self, batch: Batch, status: int | None, error: str, attempt: int) -> None:
        log.warning("batch failed: %s", error,
                    extra={"batch": batch.id, "size": len(batch), "status": status,
                           "attempt": attempt})
        self._stats.add("send_failures")
        self._observers.batch_failed(batch, status=status, error=error, attempt=attempt,
                                     will_retry=True)

    def _split(self, delivery: Delivery, response: Response, attempt: int) -> None:
        batch = delivery.batch
        answer = f"{response.status} {response.text}".strip()
        reading = self.settings.current.refusals.read(response.status, response.text,
                                                      batch.invoice_ids)
        named = bool(reading.named)
        if not self._pacer.refusal(response.status, response.text[:300].strip(), named=named,
                                   batch_id=batch.id, single=len(batch) == 1,
                                   attempt=attempt):
            # a refusal storm (MS4 refuses everything, naming nothing), or maybe one: no
            # invoice's doing, so the batch is sent again unchanged, never split for it
            error = f"MS4 answered {answer[:300]}, naming no invoice, " + (
                "in a refusal storm" if self._pacer.in_storm else
                "as it refused other batches") + ": sent again unchanged"
            self._failed(batch, response.status, error, attempt)
            raise _SendFailed(response.status, error, paced=self._pacer.stop is not None)
        self._observers.batch_failed(batch, status=response.status, error=answer[:500],
                                     attempt=attempt, will_retry=False)
        if len(batch) > 1:
            if reading.named:
                self._set_aside(delivery, reading.named, answer)
                return
            if reading.problem is not None:
                log.info("batch %s (%d invoices) rejected with %d, and the answer is not "
                         "trusted (%s): splitting it in halves", batch.id, len(batch),
                         response.status, reading.problem)
            parts = batch.split()
            self._record(self._event("split", batch, detail=answer[:500],
                                     parts=tuple(part.id for part in parts)),
                         *(self._event("batched", part, detail=f"a half of {batch.id}",
                                       attempts=False) for part in parts))
            self._pacer.split_for_refusal([part.id for part in parts], parent=batch.id)
            self._settle(lambda: self._queue.replace(delivery, parts),
                         f"replace batch {batch.id} by its halves")
            self._stats.add("batches_split")
            log.info("batch %s (%d invoices) rejected with %d: split into %d + %d",
                     batch.id, len(batch), response.status, len(parts[0]), len(parts[1]))
            for part in parts:
                self._observers.batch_enqueued(part)
            return
        letter = DeadLetter(
            reason=f"MS4 rejected the object: {response.text[:1000] or response.status}",
            stage="ms4", payload=batch.payloads[0], message_id=batch.message_ids[0],
            invoice_id=batch.invoice_ids[0], ms4_answer=answer[:4000])
        self._record(self._event("dead_lettered", batch, detail=answer[:1000]))
        self._settle(lambda: self._dead_letters.add([letter]),
                     f"dead-letter invoice {letter.invoice_id}")
        self._settle(lambda: self._queue.ack(delivery), f"ack batch {batch.id}")
        self._stats.add("dead_lettered")
        log.warning("invoice %s (message %s) dead-lettered: MS4 answered %s",
                    batch.invoice_ids[0], batch.message_ids[0], answer[:200])
        self._observers.payload_rejected(letter)

    def _set_aside(self, delivery: Delivery, named: dict[int, str], answer: str) -> None:
        """Dead-letter the objects a refusal named (index → MS4's text for it), then put the
        rest back as one batch (a new id: another body), or ack if nothing is left."""
        batch = delivery.batch
        letters = [DeadLetter(reason=f"MS4 rejected the object: {what}", stage="ms4",
                              payload=batch.payloads[i], message_id=batch.message_ids[i],
                              invoice_id=batch.invoice_ids[i], ms4_answer=answer[:4000])
                   for i, what in named.items()]
        rest = batch.select(i for i in range(len(batch)) if i not in named)
        refused = batch.select(sorted(named))
        events = [self._event("dead_lettered", refused, detail=answer[:1000],
                              batch_id=batch.id)]
        if len(rest):
            events.append(self._event("batched", rest, detail=f"the rest of {batch.id}",
                                      attempts=False))
        self._record(*events)
        self._settle(lambda: self._dead_letters.add(letters),
                     f"dead-letter {len(letters)} invoices of batch {batch.id}")
        if len(rest):
            self._settle(lambda: self._queue.replace(delivery, [rest]),
                         f"replace batch {batch.id} by the {len(rest)} invoices not refused")
        else:
            self._settle(lambda: self._queue.ack(delivery), f"ack batch {batch.id}")
        self._stats.add("dead_lettered", len(letters))
        self._stats.add("refusals_named")
        log.info("batch %s (%d invoices) rejected; MS4 named %d: dead-lettered, the other %d "
                 "sent again as batch %s", batch.id, len(batch), len(letters), len(rest),
                 rest.id if len(rest) else "-")
        for letter in letters:
            log.warning("invoice %s (message %s) dead-lettered: %s", letter.invoice_id,
                        letter.message_id, letter.reason[:200])
        if len(rest):
            self._observers.batch_enqueued(rest)
        for letter in letters:
            self._observers.payload_rejected(letter)
