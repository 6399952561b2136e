"""The service: the stage threads, shutdown and reload.

Threads (all named, all watching the same events)::

    reader ──inbox──> batcher ──outbox──> committer ──QueueBackend──> sender-1 .. sender-N
                      (Intake.handle)     (Intake.commit: store, then ack inbound)

Three events steer shutdown: ``intake_stop`` (stop reading; the batcher then
flushes the partial batch and ends), ``senders_stop`` (take no new batch) and
``abort`` (the deadline passed: give in-flight batches back to the queue).
The parts it runs are built by :mod:`ms1.runtime.components`.
"""

from __future__ import annotations

import logging
import queue as stdqueue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from ms1.config import Config, Secret
from ms1.errors import Ms1Error
from ms1.heartbeat import Outage, Progress, Stall
from ms1.model import InboundMessage
from ms1.observers import Observers
from ms1.ops.fleet import Fleet, MemoryFleet
from ms1.ops.logs import apply_log_settings
from ms1.ops.metrics import Exporter, QueueWatch, ServiceView
from ms1.ops.publisher import Publisher, Sampler
from ms1.pipeline.intake import Intake, Work
from ms1.pipeline.outbound import QueueBackend, QueueStats
from ms1.pipeline.reconcile import Reconciler
from ms1.pipeline.sending.concurrency import Controller
from ms1.pipeline.sending.fragments import Fragments, Limits
from ms1.pipeline.sending.sender import (
    IdlePoll,
    InFlight,
    Sender,
    SharedSettings,
    WakingEvent,
)
from ms1.pipeline.source import Source
from ms1.pipeline.stats import RunStats
from ms1.pipeline.transport import Transport
from ms1.runtime import settings
from ms1.runtime.components import Components, make_pacer

if TYPE_CHECKING:
    from ms1.console.run import Console

log = logging.getLogger(__name__)

_EOF: list[InboundMessage] = []  # sentinel: identity-compared
#: seconds the threads get, after the shutdown deadline, to give their work back
ABORT_GRACE = 1.0
#: seconds the final reading of the queue (the summary) may take after that grace:
#: shutdown returns by ``timeout + ABORT_GRACE + FINAL_READ`` whatever Redis does
FINAL_READ = 0.5
#: seconds the queue's counts are read every (``QueueWatch``: /readyz, /metrics; a scrape
#: asks for fresh ones): the parts' own outages name a failing Redis sooner
QUEUE_READ_INTERVAL = 2.0
#: seconds without a successful reading before the queue counts as unreachable
QUEUE_STALE_AFTER = 5.0
#: seconds the reader waits on the source, and the batcher on the reader, while idle (an
#: e-mail ends the wait at once; a stop is seen within it; a Redis read waits at most
#: [redis] block_timeout): an idle service wakes every few seconds per stage
IDLE_READ = 2.0
#: seconds the batcher, with no batch open, waits for the reader's next chunk: the reader
#: always ends with an end mark that wakes it, so this only bounds the wait
IDLE_BATCH = 5.0
#: most batches (or dead-letter lists) the committer stores in one round trip
COMMIT_GROUP = 16


#: the [batch] options a reload sets on the running batch policy

#: most skipped inputs the summary lists one by one (the log names every one)
SUMMARY_SKIPPED_LISTED = 20


@dataclass(frozen=True)
class Summary:
    """What a ``--once`` run (or a shutdown) did.

    ``undelivered`` is what was still queued at the end, None when the queue could not be
    read (``queue_error`` says why: the state is unknown, nothing is claimed). ``skipped``
    lists the inputs the source could not read, ``(input, why)``; ``not_stored`` counts the
    e-mails read that were neither enqueued in a batch nor dead-lettered by the end, and
    ``unacked_fate`` says what becomes of them (the source's words).
    """

    stats: dict[str, int]
    elapsed: float
    undelivered: QueueStats | None
    queue_name: str
    queue_durable: bool
    queue_error: str = ""
    skipped: tuple[tuple[str, str], ...] = ()
    not_stored: int = 0
    unacked_fate: str = ""
    #: a --once run stopped by a signal; ``source_drained``: its source had been read to
    #: the end before
    interrupted: bool = False
    source_drained: bool = True

    @property
    def ok(self) -> bool:
        """Everything read was stored and delivered (or dead-lettered), every input read."""
        return (self.undelivered is not None and self.undelivered.empty
                and not self.undelivered.losses
                and not self.skipped and self.not_stored == 0 and not self.interrupted)

    @property
    def lost(self) -> bool:
        """The queue backend found stored work gone during the run (evicted, deleted)."""
        return self.undelivered is not None and bool(self.undelivered.losses)

    def render(self) -> str:
        s = self.stats
        delivered = s.get("invoices_delivered", 0)
        rate = delivered / self.elapsed if self.elapsed > 0 else 0.0
        lines = [
            f"e-mails read: {s.get('emails_read', 0)}, rejected: {s.get('rejected', 0)}",
            f"batches enqueued: {s.get('batches_enqueued', 0)} "
            f"({s.get('invoices_enqueued', 0)} invoices), "
            f"delivered: {s.get('batches_delivered', 0)} batches "
            f"({delivered} invoices), dead-lettered: {s.get('dead_lettered', 0)}",
            f"elapsed: {self.elapsed:.2f} s, {rate:,.0f} invoices/s",
        ]
        if self.interrupted:
            lines.append(
                "INTERRUPTED by a signal: the source had been read to the end"
                if self.source_drained else
                "INTERRUPTED by a signal before the source was read to the end: the e-mails "
                "not read were not processed (a Redis stream keeps them for the next run; "
                "input files must be given again)")
        if self.skipped:
            lines.append(f"inputs skipped: {len(self.skipped)} (not processed):")
            lines += [f"  {name}: {why}" for name, why in
                      self.skipped[:SUMMARY_SKIPPED_LISTED]]
            if len(self.skipped) > SUMMARY_SKIPPED_LISTED:
                lines.append(f"  ... and {len(self.skipped) - SUMMARY_SKIPPED_LISTED} more "
                             "(each named in the log)")
        if self.not_stored:
            lines.append(f"NOT STORED: {self.not_stored} e-mails read were neither queued "
                         f"nor dead-lettered: {self.unacked_fate}")
        u = self.undelivered
        if u is not None and u.losses:
            lines.append(f"LOST: {len(u.losses)} stored streams found gone during the run, "
                         f"with at least {u.lost_batches} batches:")
            lines += [f"  {loss}" for loss in u.losses[:SUMMARY_SKIPPED_LISTED]]
        durable = ("durable: delivered by the next run" if self.queue_durable
                   else "in memory: LOST when this process exits")
        if u is None:
            lines.append(f"UNDELIVERED: unknown: cannot read queue {self.queue_name!r} "
                         f"({self.queue_error}); whatever it holds stays there ({durable})")
        elif not u.empty:
            where = (f"queue {self.queue_name!r} ({durable})" if self.queue_durable else
                     f"in-memory queue {self.queue_name!r}: LOST when this process exits")
            invoices = "" if u.invoices is None else f" ({u.invoices} invoices)"
            lines.append(f"UNDELIVERED: {u.ready + u.in_flight} batches{invoices} still in "
                         f"{where}")
        return "\n".join(lines)


class Service:
    """One ms1 process: ``start()``, then ``run_once()`` or ``wait()`` + ``shutdown()``."""

    def __init__(
        self, config: Config, pm: pluggy.PluginManager, components: Components,
        *, once: bool = False,
    ) -> None:
        self.config = config
        self.pm = pm
        self.parts = components
        self.once = once
        self.stats = RunStats()
        self.observers = Observers(pm)
        self.intake_stop = threading.Event()
        #: whose turn it is to ask the queue while the senders are idle; the stop and the
        #: abort wake every sender waiting for it
        self.idle = IdlePoll()
        #: the queue's outages as the senders see them: one line each way for all of them
        self.outage = Outage("taking and settling batches",
                             logger=logging.getLogger("ms1.pipeline.sending.sender"))
        #: the source's, as the reader sees them
        self.reading = Outage("reading the source", logger=log)
        #: split halves parked by the senders during a refusal storm, to merge them
        self.fragments = Fragments(self._fragment_limits)
        self.senders_stop: threading.Event = WakingEvent(self.idle)
        self.abort: threading.Event = WakingEvent(self.idle)
        self._inbox: stdqueue.Queue[list[InboundMessage]] = stdqueue.Queue(maxsize=8)
        self._outbox: stdqueue.Queue[Work | None] = stdqueue.Queue(maxsize=32)
        self._threads: list[threading.Thread] = []
        self._failed: list[str] = []
        self._gave_up = ""  # why the committer stopped storing at the deadline
        self._source_drained = False  # the reader read the source to its end
        self._started = 0.0
        #: what the service reads of the configuration (settings.service); a reload
        #: builds it again
        self.settings = settings.service(config)
        self._read_chunk = self.settings.read_chunk
        #: each pipeline thread's last sign of progress: the watchdog and /healthz read it
        self.progress = Progress()
        self.watchdog_timeout = self.settings.watchdog_timeout
        #: the queue's counts, read in a thread of its own: health checks, --once and the
        #: shutdown never wait on the queue backend longer than they choose
        self.queue_watch = QueueWatch(components.queue.stats, interval=QUEUE_READ_INTERVAL,
                                      stale_after=QUEUE_STALE_AFTER)
        self.intake = Intake(
            source=components.source, policy=components.policy, queue=components.queue,
            dead_letters=components.dead_letters, observers=self.observers,
            stats=self.stats, abort=self.abort, handoff=self._to_committer,
            progress=self.progress, ledger=components.ledger)
        self._batcher_done = threading.Event()
        self.pacer = make_pacer(config, components.limiter)
        #: what every sender reads per delivery and per retry; a reload replaces it
        self.send_settings = SharedSettings(settings.send(config))
        #: requests to MS4 in flight now, over every sender (ms1_requests_in_flight)
        self.in_flight = InFlight()
        #: sizes the gate every sender takes a slot of around an attempt: fixed at
        #: ``[send] threads`` when the config sets it, else adaptive (ms1_concurrency_target)
        self.concurrency = Controller(
            rate=self._allowed_rate, held_back=self.pacer.holding,
            **settings.concurrency(config))
        #: active senders first, then retiring ones (leaving after their current batch)
        self._senders: list[tuple[Sender, threading.Thread]] = []
        self._sender_seq = 0
        #: what /metrics, the fleet snapshot and the console read of this service
        self.view = ServiceView(
            counters=self.stats.snapshot, alive=self.alive, pacer=self.pacer,
            queue_stats=components.queue.stats,
            dead_letter_count=components.dead_letters.count, health=self.health,
            queue_watch=self.queue_watch, in_flight=lambda: self.in_flight.current,
            concurrency=self.concurrency, blocked=self.not_storing_or_sending,
            unreconciled=self._unreconciled)
        #: reconciles the ledger's last day now and then (ms1_ledger_unreconciled_emails)
        self.reconciler: Reconciler | None = None
        ledger_settings = settings.ledger(config)
        if components.ledger is not None and ledger_settings.reconcile_interval > 0 \
                and components.queue.durable and components.ledger.shared:
            self.reconciler = Reconciler(components.ledger, components.queue,
                                         interval=ledger_settings.reconcile_interval,
                                         window=ledger_settings.reconcile_window)
        self.exporter: Exporter | None = None
        address = self.settings.metrics_address
        if address:
            try:
                self.exporter = Exporter(self.view, address)
            except (OSError, ValueError) as exc:
                raise config.error("metrics", "address",
                                   f"cannot listen on {address!r}: {exc}") from None
            pm.register(self.exporter, name=f"ms1-metrics-{id(self)}")
        #: where this instance publishes its snapshot (ms1.ops.fleet), about once a second
        self.fleet: Fleet = components.fleet if components.fleet is not None else MemoryFleet()
        sampler = Sampler(self.view, label=self.fleet.label,
                          consumer=getattr(components.queue, "consumer", None))
        self.publisher = Publisher(self.fleet, sampler.id, sampler.sample)
        self.console = self._console(config, components) if self.settings.console else None

    def _console(self, config: Config, parts: Components) -> Console:
        """The web console (``[console] address``): imported only when it is on."""
        try:
            try:
                from ms1.console.run import Console  # Flask, waitress: only with a console
            except ImportError as exc:
                raise config.error("console", "address", f"the console needs Flask and "
                                   f"waitress ({exc}): pip install flask waitress") from None
            console_settings = settings.console(config)
            try:
                return Console(console_settings, fleet=self.fleet, source=parts.source,
                               queue=parts.queue, dead_letters=parts.dead_letters,
                               ceiling=lambda: settings.ceiling(self.config),
                               sender_threads=self.concurrency.pool, ledger=parts.ledger)
            except (OSError, ValueError) as exc:
                raise config.error("console", "address", f"cannot listen on "
                                   f"{console_settings.host}:{console_settings.port}: "
                                   f"{exc}") from None
        except BaseException:
            if self.exporter is not None:  # bound already: let go of its port
                self.exporter.close()
                self.pm.unregister(self.exporter)
            raise

    def _unreconciled(self) -> int | None:
        """E-mails of the last reconcile_window pending by the ledger but in no queue, at
        the last reconciliation; None: none ran (or it failed)."""
        return self.reconciler.unreconciled if self.reconciler is not None else None

    # --- threads ---------------------------------------------------------------

    def start(self) -> None:
        self._started = time.perf_counter()
        self._check_watchdog_timeout()
        self.queue_watch.start()
        log.info("ms1 starting: source=%s policy=%s queue=%s transport=%s senders=%d "
                 "(concurrency %s)", self.parts.source.name, self.parts.policy.name,
                 self.parts.queue.name, self.parts.transport.name, self.concurrency.pool,
                 "adaptive" if self.concurrency.adaptive else "fixed: [send] threads")
        self._spawn("reader", self._read_loop)
        self._spawn("batcher", self._batch_loop)
        self._spawn("committer", self._commit_loop)
        self._set_sender_count(self.concurrency.pool)
        if self.exporter is not None:
            self.exporter.start()
        self.publisher.start()
        if self.reconciler is not None:
            self.reconciler.start()
        if self.console is not None:
            self.console.start()
        self.observers.service_started(self.config)

    def _new_sender(self) -> Sender:
        self._sender_seq += 1
        return Sender(
            name=f"sender-{self._sender_seq}", queue=self.parts.queue,
            transport=self.parts.transport, dead_letters=self.parts.dead_letters,
            observers=self.observers, stats=self.stats, pacer=self.pacer,
            stop=self.senders_stop, abort=self.abort, settings=self.send_settings,
            in_flight=self.in_flight, progress=self.progress, concurrency=self.concurrency,
            idle=self.idle, outage=self.outage, fragments=self.fragments,
            ledger=self.parts.ledger)

    def _fragment_limits(self) -> Limits:
        """What a batch merged of fragments may hold: the running policy's limits."""
        policy = self.parts.policy
        items, size = getattr(policy, "max_items", None), getattr(policy, "max_bytes", None)
        return Limits(items if isinstance(items, int) else 1,
                      size if isinstance(size, int) else 1)

    def _allowed_rate(self) -> float:
        """Requests per second the rate limiter allows (the whole limit, every instance)."""
        limiter = self.pacer.limiter
        return limiter.limit / limiter.window

    def _set_sender_count(self, count: int) -> None:
        """``count`` active senders: keep retiring ones that have not left yet, then start
        new ones; or retire the newest (each leaves after its current batch, releasing
        nothing). Never more than ``count`` take new batches."""
        alive = [(s, t) for s, t in self._senders if t.is_alive()]
        active = [pair for pair in alive if not pair[0].retiring]
        retiring = [pair for pair in alive if pair[0].retiring]
        while len(active) < count and retiring:
            pair = retiring.pop()
            if pair[0].keep():
                active.append(pair)
        while len(active) < count:
            sender = self._new_sender()
            active.append((sender, self._spawn(sender.name, sender.run)))
        while len(active) > count:
            pair = active.pop()
            pair[0].retire()
            retiring.append(pair)
        self._senders = active + retiring

    def _spawn(self, name: str, target: Any) -> threading.Thread:
        thread = threading.Thread(target=self._guard, args=(name, target), name=name,
                                  daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _guard(self, name: str, target: Any) -> None:
        self.progress.beat(name, "starting")
        try:
            target()
        except Ms1Error as exc:
            if not self.abort.is_set():
                self._died(name)
            else:  # told to stop at the deadline: what it held is accounted for at the end
                log.warning("thread %s stopped at the shutdown deadline: %s", name, exc)
        except Exception:
            self._died(name)
        finally:
            self.progress.leave(name)  # ended (a death is in _failed): no stall to watch

    def _died(self, name: str) -> None:
        """In an ``except`` block: log the traceback, stop everything."""
        self._failed.append(name)
        log.critical("thread %s died; stopping the service", name, exc_info=True)
        self.abort.set()
        self.intake_stop.set()
        self.senders_stop.set()

    def _read_loop(self) -> None:
        source = self.parts.source
        progress = self.progress
        reading = self.reading
        wait = 0.2
        try:
            while not self.intake_stop.is_set():
                progress.beat("reader", f"reading source {source.name}")
                try:
                    with reading.calling(wait):
                        messages = source.read(self._read_chunk, timeout=wait)
                except Ms1Error as exc:
                    reading.failed("cannot read from source %s (%s); waiting for it",
                                   source.name, exc)
                    with progress.waiting("reader", f"source {source.name} unreachable: "
                                                    "reading again in 1 s"):
                        self.intake_stop.wait(1.0)
                    continue
                reading.answered("source %s answers again", source.name)
                # idle: read with a longer wait (an e-mail arriving ends it at once; a stop is
                # seen within it); while e-mails flow, and with --once, 0.2 s
                wait = 0.2 if messages or self.once else IDLE_READ
                if messages:
                    self.stats.add("emails_taken", len(messages))
                    self._hand_over(messages)
                elif source.exhausted or self.once:
                    self._source_drained = True
                    break
        finally:
            self._hand_over(_EOF, force=True)

    def _hand_over(self, messages: list[InboundMessage], force: bool = False) -> None:
        with self.progress.waiting("reader", "waiting for the batcher to take a chunk"):
            while True:
                try:
                    self._inbox.put(messages, timeout=0.2)
                    return
                except stdqueue.Full:
                    if self.abort.is_set() and not force:
                        raise Ms1Error("aborted while handing over a chunk") from None

    def _to_committer(self, work: Work | None) -> None:
        with self.progress.waiting("batcher", "waiting for the committer to take work"):
            while True:
                try:
                    self._outbox.put(work, timeout=0.2)
                    return
                except stdqueue.Full:
                    if self.abort.is_set():
                        if work is None:
                            return  # the committer is gone; nothing waits for the end mark
                        raise Ms1Error("aborted with work not yet committed") from None

    def _commit_loop(self) -> None:
        """Commit what the batcher hands over; whatever piled up meanwhile goes together
        (group commit: one round trip to the queue for up to ``COMMIT_GROUP`` batches)."""
        outbox = self._outbox
        progress = self.progress
        try:
            ended = False
            while not ended:
                with progress.waiting("committer", "waiting for work from the batcher"):
                    work = outbox.get()
                if work is None:
                    break
                works = [work]
                while len(works) < COMMIT_GROUP:
                    try:
                        more = outbox.get_nowait()
                    except stdqueue.Empty:
                        break
                    if more is None:
                        ended = True
                        break
                    works.append(more)
                try:
                    self.intake.commit_many(works)  # beats before each store it tries
                except Ms1Error as exc:  # only raised once the shutdown deadline passed
                    if not self.abort.is_set():
                        raise
                    self._gave_up = str(exc)
                    self._discard_outbox()
                    return
        finally:
            self._batcher_done.set()

    def _discard_outbox(self) -> None:
        """After the deadline: take what the batcher still hands over, storing nothing, so it
        never waits on a full outbox. Those e-mails stay unacknowledged in the source; the
        summary counts them (``not_stored``)."""
        end = time.monotonic() + ABORT_GRACE
        while time.monotonic() < end:
            try:
                if self._outbox.get(timeout=0.1) is None:
                    return
            except stdqueue.Empty:
                continue

    def _batch_loop(self) -> None:
        intake = self.intake
        progress = self.progress
        try:
            while True:
                progress.beat("batcher", "batching")
                deadline = intake.deadline()
                # nothing pending: wait for a chunk (a put wakes it; the reader always ends
                # with _EOF)
                wait = IDLE_BATCH if deadline is None else min(0.2, deadline - time.monotonic())
                try:
                    with progress.waiting("batcher", "waiting for e-mails"):
                        chunk = self._inbox.get(timeout=max(wait, 0.0))
                except stdqueue.Empty:
                    chunk = None
                if chunk is _EOF:
                    intake.flush()
                    return
                if chunk:
                    intake.handle(chunk)
                intake.tick(time.monotonic())
        finally:
            self._to_committer(None)  # the committer ends after what was handed to it

    def set_api_key(self, api_key: Secret | None) -> None:
        """Use a new API key from now on; ends a 401 spell."""
        self.parts.transport.set_api_key(api_key)
        self.pacer.key_changed(api_key)

    # --- running and stopping ---------------------------------------------------

    def alive(self) -> bool:
        """True unless a pipeline thread died of an error (or the service aborted).

        A thread that finished its work is fine: the reader, batcher and committer end
        when a finite source (files) is done, a sender when a reload retired it.
        """
        return not self._failed and not self.abort.is_set()

    @property
    def source_drained(self) -> bool:
        """The reader has read the source to its end (a ``--once`` run: all its input)."""
        return self._source_drained

    def stalls(self) -> list[Stall]:
        """Pipeline threads that have shown no progress for longer than ``[ms1]
        watchdog_timeout`` outside a bounded wait (see :mod:`ms1.heartbeat`)."""
        return self.progress.stalled(self.watchdog_timeout)

    def health(self) -> str | None:
        """None while the service is healthy; else why not: a pipeline thread died, or one
        is stalled (named, with what it was doing). The watchdog and /healthz ask this."""
        if self._failed:
            return f"thread {', '.join(self._failed)} died"
        stalls = self.stalls()
        if stalls:
            return "; ".join(str(stall) for stall in stalls)
        return None

    @property
    def outages(self) -> tuple[Outage, ...]:
        """Every part whose outage makes the service not ready (``/readyz``)."""
        return (self.reading, self.intake.outage, self.outage, self.pacer.limiter_outage)

    def not_storing_or_sending(self) -> str | None:
        """Why the pipeline cannot read, store, take or send now (the first part that
        cannot), or None."""
        for outage in self.outages:
            problem = outage.problem()
            if problem is not None:
                return problem
        return None

    def healthy(self) -> bool:
        return self.health() is None

    def _check_watchdog_timeout(self) -> None:
        """WARNING when one call may by design last longer than ``watchdog_timeout``: it
        would count as a stall while it is still within its own deadline."""
        limit = self.watchdog_timeout
        parts: dict[str, Transport | QueueBackend | Source] = {
            "transport": self.parts.transport, "queue": self.parts.queue,
            "source": self.parts.source}
        for kind, part in parts.items():
            longest = part.longest_call
            if isinstance(longest, (int, float)) and longest >= limit:
                log.warning("[ms1] watchdog_timeout (%g s) is not above the longest call the "
                            "%s %r may make by design (%g s, its own timeouts): a call still "
                            "within its deadline counts as a stall", limit, kind, part.name,
                            longest)

    def reload(self, config: Config) -> list[str]:
        """Apply a new, already validated config without losing anything; return the
        changed keys that need a restart, as ``[section] key``.

        Every reloadable option (``Option.reloadable``) that changed takes effect at once:
        the core's here (API key, rate limit, retry, pause, breaker and probe settings,
        ``max_deliveries``, batch limits, sender count, log level and format...), then the
        plugins' in their ``ms1_config_reloaded`` hook. Any other changed key keeps its
        running value (``self.config`` holds what is in effect) and is returned.
        """
        old = self.config
        restart = [key for key in old.changed(config)
                   if not (key in config.options and config.options[key].reloadable)
                   or not self._can_apply(key)]
        new = config.keeping(old, restart)
        changed = old.changed(new)
        # the log first: what the reload logs is in the new format already
        self.settings = settings.service(new)
        apply_log_settings(self.settings.log_level, self.settings.log_format)
        self.config = new
        if new.api_key != old.api_key:
            self.set_api_key(new.api_key)
        self.send_settings.replace(settings.send(new))
        self.pacer.configure(settings.pacer(new))
        self._read_chunk = self.settings.read_chunk
        max_payload = self.settings.max_payload_bytes
        self.parts.dead_letters.max_payload_bytes = max_payload
        self.parts.queue.max_payload_bytes = max_payload
        self._apply_batch_limits(self.settings)
        self.concurrency.configure(**settings.concurrency(new))
        self._set_sender_count(self.concurrency.pool)
        self.observers.config_reloaded(old, new, changed)
        return [f"[{sec}] {key}" for sec, key in sorted(set(restart))]

    def _can_apply(self, key: tuple[str, str]) -> bool:
        """False for a ``[batch]`` limit the running policy has no attribute for (a
        third-party policy): that change needs a restart."""
        section, name = key
        return section != "batch" or name not in settings.BATCH_LIMITS \
            or hasattr(self.parts.policy, name)

    def _apply_batch_limits(self, service: settings.ServiceSettings) -> None:
        """Set the ``[batch]`` limits on the running policy, where it has them."""
        policy = self.parts.policy
        for key, value in service.batch_limits.items():
            if key == "max_items" and policy.name == "unit":
                continue  # one object per request, whatever max_items says
            if hasattr(policy, key):
                setattr(policy, key, value)

    def run_once(self, timeout: float, stop: threading.Event | None = None) -> Summary:
        """Process what the source holds, wait until all is delivered (or ``timeout``, or
        a stop of every sender that only a restart ends:
        :attr:`ms1.pipeline.sending.pacer.Stop.needs_restart`).

        When ``stop`` is set (SIGTERM, SIGINT) the run ends as a running service's does:
        intake stops at once, in-flight sends finish (an in-memory queue is drained)
        within ``[ms1] shutdown_timeout``, and the summary says the run was interrupted.
        """
        stop = stop if stop is not None else threading.Event()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and not self.abort.is_set() \
                and not stop.is_set():
            if (stopped := self.pacer.stop) is not None and stopped.needs_restart:
                # nothing goes out before a restart: the rest of once_timeout is no use,
                # nor is waiting for the stopped senders to drain the queue
                log.error("--once ends now: %s", stopped.reason)
                return self.shutdown(0.1)
            if self._batcher_done.is_set():
                if self._queue_empty(min(1.0, left)):
                    break
                stop.wait(0.01)
            else:
                stop.wait(min(0.05, left))
        if stop.is_set():
            log.warning("--once interrupted: stopping intake, delivering what is in flight "
                        "within shutdown_timeout")
            return self.shutdown(self.settings.shutdown_timeout,
                                 interrupted=True)
        return self.shutdown(max(0.1, min(5.0, deadline - time.monotonic())))

    def read_queue(self, timeout: float) -> QueueStats:
        """The queue's counts, read after this call began, waiting at most ``timeout`` s
        (Ms1Error: unreachable, or no answer in time)."""
        return self.queue_watch.fresh(timeout)

    def _queue_empty(self, timeout: float = 1.0) -> bool:
        """True when the queue holds no batch; False too when it cannot be read (unknown)."""
        try:
            return self.read_queue(timeout).empty
        except Ms1Error:
            self.abort.wait(0.2)  # unreachable: ask again a little later, not 100 times a second
            return False

    def shutdown(self, timeout: float, *, interrupted: bool = False) -> Summary:
        """Stop intake, flush, let senders finish (drain a non-durable queue) within
        ``timeout``; then abort what is still in flight (each batch goes back to the queue)
        and return by ``timeout + ABORT_GRACE + FINAL_READ`` s, whatever MS4 or the queue
        backend do (a queue that does not answer in time leaves ``undelivered`` unknown).
        ``interrupted``: a ``--once`` run stopped by a signal (said in the summary)."""
        deadline = time.monotonic() + timeout
        self.intake_stop.set()
        self._batcher_done.wait(max(0.0, deadline - time.monotonic()))
        if not self.parts.queue.durable:
            while (left := deadline - time.monotonic()) > 0 \
                    and not self._queue_empty(min(1.0, left)):
                if self.abort.is_set():
                    break
                self.abort.wait(0.01)
        self.senders_stop.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("shutdown deadline passed: giving in-flight batches back to the queue")
            self.abort.set()
            # a sender inside a request only sees the abort when the request ends: closing
            # the transport ends it now (the contract: close() never blocks and wakes a
            # send() in progress), so each sender releases its batch within the grace
            try:
                self.parts.transport.close()
            except Exception:
                log.exception("closing transport %s failed", self.parts.transport.name)
            grace = time.monotonic() + ABORT_GRACE
            for thread in self._threads:
                thread.join(max(0.0, grace - time.monotonic()))
            still = [t.name for t in self._threads if t.is_alive()]
            if still:  # inside a call to the queue backend: what they hold stays pending
                log.warning("threads still busy at the end of the grace, left behind: %s "
                            "(what they hold stays in the queue)", ", ".join(still))
        bound = deadline + ABORT_GRACE + FINAL_READ  # shutdown returns by then
        final_read = max(0.1, bound - time.monotonic())
        elapsed = time.perf_counter() - self._started
        undelivered: QueueStats | None = None
        queue_error = ""
        unreachable = self.queue_watch.unreachable() if self.abort.is_set() else None
        try:
            if unreachable is not None:  # short of time, and known not to answer: no wait
                raise Ms1Error(unreachable)
            undelivered = self.read_queue(final_read)
        except Ms1Error as exc:
            queue_error = str(exc)
            log.error("cannot read what is left in the queue (state unknown): %s", exc)
        self.queue_watch.close()
        source = self.parts.source
        stats = self.stats.snapshot()
        # every e-mail taken from the source ends stored by the intake, in a batch
        # (invoices_enqueued) or as a dead letter (rejected), or not at all
        not_stored = max(0, stats.get("emails_taken", 0) - stats.get("invoices_enqueued", 0)
                         - stats.get("rejected", 0))
        fate = source.unacked_fate()
        if not_stored:
            cause = f" ({self._gave_up})" if self._gave_up else ""
            log.error("%d e-mails read from source %s were not stored (neither queued nor "
                      "dead-lettered)%s: %s", not_stored, source.name, cause, fate)
        summary = Summary(stats, elapsed, undelivered, self.parts.queue.name,
                          self.parts.queue.durable, queue_error=queue_error,
                          skipped=tuple(source.skipped()), not_stored=not_stored,
                          unacked_fate=fate, interrupted=interrupted,
                          source_drained=self._source_drained)
        self.observers.service_stopped()
        # the console's running requests and the fleet publisher's last beat get what is
        # left of the promised bound, at most their own close_timeout
        def remaining(most: float) -> float:
            return min(most, max(0.0, bound - time.monotonic()))

        if self.console is not None:
            self.console.close(remaining(self.console.close_timeout))
        if self.reconciler is not None:
            self.reconciler.close(remaining(1.0))
        self.publisher.close(remaining(self.publisher.close_timeout))
        if self.exporter is not None:
            self.exporter.close()
            self.pm.unregister(self.exporter)
        return summary
