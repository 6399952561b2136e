"""Operations: Prometheus metrics and health on a local port (``[metrics] address``).

:class:`Exporter` is an observer plugin — registered on the service's plugin manager,
fed by the same hooks a third-party metrics plugin would use — plus a small HTTP server:

More: docs/internals.md, ``ms1.ops.metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ms1 import __version__
from ms1.errors import Ms1Error
from ms1.markers import hookimpl
from ms1.model import Batch, DeadLetter
from ms1.ops import httpserver
from ms1.ops.httpserver import fd_reserve as fd_reserve  # re-exported
from ms1.ops.httpserver import fd_usage as fd_usage
from ms1.ops.httpserver import parse_address as parse_address
from ms1.ops.logs import escape_controls
from ms1.pipeline.outbound import QueueStats
from ms1.pipeline.sending.concurrency import Controller
from ms1.pipeline.sending.limiter import effective_spacing
from ms1.pipeline.sending.pacer import Pacer

log = logging.getLogger(__name__)

_COUNTERS = (
    ("emails_read", "ms1_emails_read", "E-mails taken from the source"),
    ("batches_enqueued", "ms1_batches_enqueued", "Batches put on the outbound queue"),
    ("invoices_enqueued", "ms1_invoices_enqueued", "Invoices put on the outbound queue"),
    ("batches_delivered", "ms1_batches_delivered", "Batches MS4 accepted (202)"),
    ("invoices_delivered", "ms1_invoices_delivered", "Invoices MS4 accepted (202)"),
    ("dead_lettered", "ms1_invoices_dead_lettered", "Objects or e-mails put in the dead letters"),
    ("send_failures", "ms1_send_retries", "Failed sends that will be retried"),
    ("batches_split", "ms1_batches_split", "Batches split after a 400/413"),
    ("batches_merged", "ms1_batches_merged",
     "Batches merged of halves split before a refusal storm was recognised"),
    ("processor_errors", "ms1_processor_errors",
     "Unexpected errors inside the processor (each e-mail dead-lettered)"),
)
_BREAKER = {"closed": 0, "half-open": 1, "open": 2}
#: the stages of the pipeline threads :mod:`ms1.runtime.service` starts, by thread name (``reader``,
#: ``batcher``, ``committer``, ``sender-N``): ``ms1_pipeline_threads{stage}``
PIPELINE_STAGES = ("reader", "batcher", "committer", "sender")
#: seconds a scrape waits for fresh queue counts before it serves the last reading
SCRAPE_WAIT = 0.1


@dataclass(frozen=True)
class ServiceView:
    """What the exporter reads of a running service, at scrape time: read-only, so the
    exporter never imports or steers the service.

    ``health`` says why the service is unhealthy (a thread died or is stalled), None when
    it is healthy; without it, health is ``alive()``. ``queue_watch`` is the service's own
    :class:`QueueWatch`; without one the exporter runs its own on ``queue_stats`` and
    ``dead_letter_count``. Nothing an HTTP request runs waits for Redis or MS4."""

    counters: Callable[[], dict[str, int]]
    alive: Callable[[], bool]
    pacer: Pacer
    queue_stats: Callable[[], QueueStats]
    dead_letter_count: Callable[[], int]
    health: Callable[[], str | None] | None = None
    queue_watch: QueueWatch | None = None
    #: requests to MS4 in flight now, over every sender (``ms1_requests_in_flight``)
    in_flight: Callable[[], int] | None = None
    #: the concurrency controller (``ms1_concurrency_target``, ``ms1_ms4_latency_seconds``)
    concurrency: Controller | None = None
    #: why the pipeline cannot read, store, take or send now (``/readyz``), or None
    blocked: Callable[[], str | None] | None = None
    #: e-mails the last reconciliation could not account for (None: none ran)
    unreconciled: Callable[[], int | None] | None = None


@dataclass(frozen=True)
class QueueReading:
    """What :class:`QueueWatch` last learnt: the last successful reading (``at``, its
    ``time.monotonic()``; 0: none yet) and the last error (``error_at``; 0: none)."""

    stats: QueueStats | None = None
    dead_letters: int | None = None
    at: float = 0.0
    error: str = ""
    error_at: float = 0.0


class QueueWatch:
    """Reads the queue's counts (and the dead-letter count) every ``interval`` seconds in
    a thread of its own, so that health checks, scrapes, ``--once`` and shutdown never
    wait for the queue backend: they read :meth:`latest`, or ask for a fresh reading and
    wait for it at most as long as they choose (:meth:`fresh`). One call at a time: a
    frozen Redis holds this thread (for up to ``[redis] socket_timeout``), nobody else.

    :meth:`unreachable` says why the queue counts as unreachable: no successful reading
    for ``stale_after`` seconds (the last error, or how long the backend has not answered).
    """

    def __init__(self, stats: Callable[[], QueueStats],
                 dead_letter_count: Callable[[], int] | None = None, *,
                 interval: float = 1.0, stale_after: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stats = stats
        self._letters = dead_letter_count
        self.interval = interval
        self.stale_after = stale_after
        self._clock = clock
        self._cond = threading.Condition()
        self._reading = QueueReading()
        self._asked = 0  # readings asked for (fresh)
        self._done = 0  # readings finished (successful or not)
        self._busy_since = 0.0  # a reading in progress since (0: none)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread ``queue-watch`` (no-op if it runs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="queue-watch", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Its thread reads the queue (started, not closed)."""
        return self._thread is not None and not self._stop.is_set()

    def close(self) -> None:
        """Stop the thread; never waits for a reading in progress."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def want_dead_letters(self, count: Callable[[], int]) -> None:
        """Read the dead-letter count too (for /metrics)."""
        self._letters = count

    def latest(self) -> QueueReading:
        with self._cond:
            return self._reading

    def fresh(self, timeout: float) -> QueueStats:
        """Counts read after this call began, waiting at most ``timeout`` s; Ms1Error with
        the backend's error, or saying it did not answer in time."""
        with self._cond:
            self._asked += 1
            ticket = self._asked
            running = self.running
            if running:
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._done >= ticket, timeout)
        if not running:  # not started (or closed): read in this thread
            self._read_once()
        with self._cond:
            reading, done, busy_since = self._reading, self._done, self._busy_since
        if done >= ticket:
            if reading.stats is not None and reading.at >= reading.error_at:
                return reading.stats
            raise Ms1Error(reading.error)
        busy = self._clock() - busy_since if busy_since else 0.0
        raise Ms1Error(f"the queue backend did not answer within {timeout:.1f} s (a read has "
                       f"been waiting for {busy:.1f} s)"
                       + (f"; last error: {reading.error}" if reading.error else ""))

    def unreachable(self) -> str | None:
        """None while a reading succeeded within ``stale_after`` seconds; else why the
        queue counts as unreachable (the last error, or how long it has not answered)."""
        now = self._clock()
        with self._cond:
            reading, busy_since = self._reading, self._busy_since
        if reading.at and now - reading.at <= self.stale_after:
            return None
        if reading.error and reading.error_at >= reading.at:
            return reading.error
        if busy_since:
            return f"no answer from the queue backend for {now - busy_since:.0f} s"
        return "the queue has not been read yet"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read_once()
            with self._cond:
                if self._asked <= self._done:
                    self._cond.wait_for(lambda: self._asked > self._done or self._stop.is_set(),
                                        self.interval)

    def _read_once(self) -> None:
        with self._cond:
            ticket = self._asked
            self._busy_since = self._clock()
        try:
            stats = self._stats()
            letters = self._letters() if self._letters is not None else None
        except Exception as exc:  # Ms1Error, or a plugin's bug: either way, no reading
            if not isinstance(exc, Ms1Error):
                log.debug("reading the queue failed", exc_info=True)
            with self._cond:
                self._reading = dataclasses.replace(self._reading, error=str(exc),
                                                    error_at=self._clock())
        else:
            with self._cond:
                self._reading = dataclasses.replace(self._reading, stats=stats,
                                                    dead_letters=letters, at=self._clock())
        finally:
            with self._cond:
                self._busy_since = 0.0
                self._done = max(self._done, ticket)
                self._cond.notify_all()


class _State(Collector):
    """Reads the service's counters and state when Prometheus scrapes."""

    def __init__(self, exporter: Exporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Any]:
        service = self._exporter.service
        stats = service.counters()
        for key, name, text in _COUNTERS:
            family = CounterMetricFamily(name, text)
            family.add_metric([], stats.get(key, 0))
            yield family
        responses = CounterMetricFamily("ms1_ms4_responses", "MS4 answers by status",
                                        labels=["status"])
        for key, value in sorted(stats.items()):
            if key.startswith("responses_"):
                responses.add_metric([key.removeprefix("responses_")], value)
        yield responses
        rejected = CounterMetricFamily("ms1_payloads_rejected",
                                       "Payloads rejected, by stage and field",
                                       labels=["stage", "field"])
        for (stage, field), value in sorted(self._exporter.rejected_counts().items()):
            rejected.add_metric([stage, field], value)
        yield rejected
        pacer = service.pacer
        yield _gauge("ms1_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                     _BREAKER.get(pacer.breaker.state, -1))
        yield _gauge("ms1_paused_seconds", "Seconds every sender still pauses after a 429",
                     pacer.paused_for)
        yield _gauge("ms1_count_margin_seconds",
                     "Seconds after a request was out its rate-limit slot is stamped "
                     "(ms4_counts_at = arrival): [send] count_margin, more after 429s the "
                     "limiter did not foresee", pacer.margin)
        shape = pacer.limiter.shape
        if shape is not None:
            yield _gauge("ms1_pace_burst", "Requests the pace lets go at once beyond the "
                         "steady rate, as learned from MS4's 429s ([send] rate_shape)",
                         shape.burst)
            yield _gauge("ms1_pace_spacing_ratio", "Share of the emission interval the pace "
                         "adds: learned from 429s at the steady pace; while MS4 allows no "
                         "burst, at least the senders' own jitter",
                         effective_spacing(shape, pacer.limiter.spacing_floor))
        announced = pacer.announced
        if announced is not None:
            figures: tuple[tuple[str, float | None, str], ...] = (
                    ("limit", announced.limit, "Requests per window MS4 announces"),
                    ("window_seconds", announced.window, "The window MS4 announces"),
                    ("remaining", announced.remaining,
                     "Requests MS4 announced left in its last answer"),
                    ("reset_seconds", announced.reset,
                     "Seconds until the budget resets, as MS4 announced in its last answer"))
            for name, figure, text in figures:
                if figure is not None:
                    yield _gauge(f"ms1_ms4_announced_{name}", f"{text} (RateLimit fields)",
                                 float(figure))
        yield _gauge("ms1_auth_blocked", "1 while MS4 rejects the API key (401/403 stop)",
                     1 if pacer.auth_blocked else 0)
        yield _gauge("ms1_requests_in_flight", "Requests to MS4 in flight now, all senders",
                     service.in_flight() if service.in_flight is not None else 0)
        if service.concurrency is not None:
            yield _gauge("ms1_concurrency_target",
                         "Most requests to MS4 in flight allowed now (adaptive, or [send] "
                         "threads when set)", service.concurrency.target)
            latency = service.concurrency.latency
            if latency is not None:
                yield _gauge("ms1_ms4_latency_seconds",
                             "Moving average of the latency of accepted requests",
                             latency)
        held = CounterMetricFamily("ms1_held_back_seconds",
                                   "Seconds senders spent held back (summed over senders), "
                                   "by cause", labels=["cause"])
        for cause, seconds in pacer.held.snapshot().items():
            held.add_metric([cause], seconds)
        yield held
        build = GaugeMetricFamily("ms1_build_info", "ms1's version and Python's (always 1)",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        yield _gauge("ms1_up", "1 while every pipeline thread is alive and making progress",
                     1 if self._exporter.health() is None else 0)
        threads = GaugeMetricFamily(
            "ms1_pipeline_threads", "Pipeline threads alive in this process, by stage "
            "(reader, batcher, committer: 1 each while the service runs; sender: one per "
            "sender, retiring ones included)", labels=["stage"])
        for stage, count in pipeline_threads().items():
            threads.add_metric([stage], count)
        yield threads
        limiter = pacer.limiter
        ceiling = limiter.limit / limiter.window
        yield _gauge("ms1_ms4_ceiling_requests_per_second",
                     "Requests per second MS4's limit allows, every instance together "
                     "([send] requests_per_minute / rate_window)", ceiling)
        unreconciled = service.unreconciled() if service.unreconciled is not None else None
        if unreconciled is not None:
            yield _gauge("ms1_ledger_unreconciled_emails",
                         "E-mails read in the last [ledger] reconcile_window that the ledger "
                         "calls pending but no queue holds (last reconciliation): lost",
                         unreconciled)
        watch = self._exporter.queue_watch
        if watch.running:
            with contextlib.suppress(Ms1Error):  # fresh counts if the backend answers at once
                watch.fresh(SCRAPE_WAIT)
        reading = watch.latest()
        yield _gauge("ms1_queue_reachable", "1 when the queue backend answers",
                     0 if watch.unreachable() else 1)
        if reading.stats is None:
            return
        yield _gauge("ms1_queue_ready_batches", "Batches waiting for a sender (last reading)",
                     reading.stats.ready)
        yield _gauge("ms1_queue_in_flight_batches",
                     "Batches handed out, not yet acked (last reading)", reading.stats.in_flight)
        yield _gauge("ms1_backlog_drain_seconds",
                     "Seconds the queued backlog (ready + in flight, last reading) takes to "
                     "drain at MS4's ceiling, one request per batch (as status estimates it)",
                     (reading.stats.ready + reading.stats.in_flight) / ceiling)
        yield _counter("ms1_queue_losses", "Stored streams the queue backend found gone "
                       "while in use (evicted, deleted, flushed): lost work",
                       len(reading.stats.losses))
        yield _counter("ms1_lost_batches", "Batches those streams held at their last count "
                       "(at least): lost", reading.stats.lost_batches)
        if reading.dead_letters is not None:
            yield _gauge("ms1_dead_letters", "Dead letters kept (last reading)",
                         reading.dead_letters)
        yield _gauge("ms1_queue_reading_age_seconds",
                     "Seconds since the queue counts were last read", time.monotonic() - reading.at)


def pipeline_threads() -> dict[str, int]:
    """Pipeline threads alive in this process, by stage (:data:`PIPELINE_STAGES`), from
    the names :mod:`ms1.runtime.service` gives them."""
    counts = dict.fromkeys(PIPELINE_STAGES, 0)
    for thread in threading.enumerate():
        name = thread.name
        stage = "sender" if name.startswith("sender-") and name[7:].isdigit() else name
        if stage in counts:
            counts[stage] += 1
    return counts


#: most (stage, field) label pairs of ms1_payloads_rejected_total: its fields come from
#: the e-mails, so their number is bounded here (the rest count as field "other")
REJECTED_LABELS = 64
_INDEX = re.compile(r"\[[^\]]*\]")


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text)
    family.add_metric([], value)
    return family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


#: most connections served at once (Prometheus and a health checker need one or two)
MAX_CONNECTIONS = 8
#: seconds a client has to send its whole request (and may stay idle)
REQUEST_TIMEOUT = 5.0


class Exporter:
    """Metrics and health of one service: an observer plugin plus an HTTP endpoint."""

    def __init__(self, service: ServiceView, address: str | tuple[str, int]) -> None:
        self.service = service
        self._rejected: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.queue_watch = service.queue_watch or QueueWatch(service.queue_stats)
        self._own_watch = service.queue_watch is None
        self.queue_watch.want_dead_letters(service.dead_letter_count)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_State(self))
        ProcessCollector(registry=self.registry)  # process_* (restarts, CPU, memory, fds)
        self.batch_size = Histogram(
            "ms1_batch_size", "Invoices per batch MS4 accepted", registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 30, 40, 45, 50, 75, 100, 200, 500, 1000))
        self.send_latency = Histogram(
            "ms1_send_latency_seconds", "Duration of accepted MS4 requests",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        host, port = parse_address(address)
        self._server = httpserver.Server(
            _app(self), host, port, name="metrics", logger=log, threads=2,
            max_connections=MAX_CONNECTIONS, idle_timeout=REQUEST_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT, always_one=True)

    @property
    def address(self) -> str:
        return self._server.address

    def start(self) -> None:
        self.queue_watch.start()
        self._server.start()
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", self.address)

    def close(self) -> None:
        if self._own_watch:
            self.queue_watch.close()
        self._server.close()

    def health(self) -> str | None:
        """None when healthy, else why not (a thread died or shows no progress)."""
        if self.service.health is not None:
            return self.service.health()
        return None if self.service.alive() else "a pipeline thread is not running"

    def rejected_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._rejected)

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        pacer = self.service.pacer
        unhealthy = self.health()
        if unhealthy is not None:
            return unhealthy
        stats = self.queue_watch.latest().stats
        if stats is not None and stats.losses:  # until a restart: a person must look
            return f"work lost: {stats.losses[-1]}" + (
                f" (and {len(stats.losses) - 1} more losses)" if len(stats.losses) > 1 else "")
        if stats is not None and stats.newer:  # a rolling upgrade: the newer instances take them
            return (f"the queue holds {len(stats.newer)} entries of a newer format than ms1 "
                    f"{__version__} reads (first: {stats.newer[0]}): upgrade this instance")
        stop = pacer.stop
        if stop is not None:  # 401, 403, a configuration error (3xx, 404 ...): its reason
            return stop.reason
        if pacer.breaker.state == "open":
            return pacer.held_back() or "circuit breaker open: MS4 is failing"
        blocked = self.service.blocked
        problem = blocked() if blocked is not None else None
        if problem is not None:
            return problem
        unreachable = self.queue_watch.unreachable()
        if unreachable is not None:
            return f"queue unreachable: {unreachable}"
        return None

    # --- observer hooks ---------------------------------------------------------------

    @hookimpl
    def ms1_batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        self.batch_size.observe(len(batch))
        self.send_latency.observe(latency)

    @hookimpl
    def ms1_payload_rejected(self, letter: DeadLetter) -> None:
        field = letter.reason.split(":", 1)[0] if letter.stage == "processor" else letter.stage
        # the field comes from the e-mail (a duplicate key's path names any key the sender
        # wrote): indexes folded, at most REJECTED_LABELS label pairs, the rest "other"
        field = _INDEX.sub("[]", field)[:64]
        with self._lock:
            key = (letter.stage, field)
            if key not in self._rejected and len(self._rejected) >= REJECTED_LABELS:
                key = (letter.stage, "other")
            self._rejected[key] = self._rejected.get(key, 0) + 1


def _app(exporter: Exporter) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
    """The WSGI application: ``/metrics``, ``/healthz``, ``/readyz`` (GET or HEAD)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        kind = "text/plain; charset=utf-8"
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, body = 405, b"method not allowed\n"
        elif path == "/metrics":
            status, body, kind = 200, generate_latest(exporter.registry), CONTENT_TYPE_LATEST
        elif path == "/healthz":
            why = exporter.health()
            status = 200 if why is None else 503
            body = b"ok\n" if why is None else _said("unhealthy", why)
        elif path == "/readyz":
            why = exporter.readiness()
            status = 200 if why is None else 503
            body = b"ready\n" if why is None else _said("not ready", why)
        else:
            status, body = 404, b"not found\n"
        start_response(f"{status} {_REASONS[status]}", [
            ("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _said(what: str, why: str) -> bytes:
    """An unhealthy or unready answer's body: the reason (Redis's or MS4's words among
    it) with its control characters escaped."""
    return f"{what}: {escape_controls(why)}\n".encode()
