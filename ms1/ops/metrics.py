"""Operations: Prometheus metrics and health on a local port (``[metrics] address``).

:class:`Exporter` is an observer plugin — registered on the service's plugin manager,
fed by the same hooks a third-party metrics plugin would use — plus a small HTTP server:

More: docs/internals.md, ``ms1.ops.metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import platform
import re
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
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
from ms1.pipeline.outbound import QueueStats
from ms1.pipeline.sending.concurrency import Controller
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
                         "adds: learned from 429s at the steady pace, at least the senders' "
                         "own jitter", max(shape.spacing, pacer.limiter.spacing_floor))
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
        self._server = MetricsServer(parse_address(address), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"[{host!s}]:{port}" if ":" in str(host) else f"{host!s}:{port}"

    def start(self) -> None:
        self.queue_watch.start()
        self._thread.start()
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", self.address)

    def close(self) -> None:
        if self._own_watch:
            self.queue_watch.close()
        self._server.shutdown()
        self._server.server_close()

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


def _handler(exporter: Exporter) -> type[BaseHTTPRequestHandler]:
    class Handler(LimitedRequestHandler):
        def do_GET(self) -> None:
            self.answering()
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(exporter.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                why = exporter.health()
                self._answer(200 if why is None else 503,
                             b"ok\n" if why is None else f"unhealthy: {why}\n".encode())
            elif path == "/readyz":
                why = exporter.readiness()
                self._answer(200 if why is None else 503,
                             b"ready\n" if why is None else f"not ready: {why}\n".encode())
            else:
                self._answer(404, b"not found\n")

        def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class LimitedRequestHandler(BaseHTTPRequestHandler):
    """The handler base :class:`MetricsServer` needs: reads the request head against its
    connection's deadline, logs through ``log`` at DEBUG. A ``do_GET`` calls
    :meth:`answering` once it starts its work."""

    _connection: _Connection

    def setup(self) -> None:
        super().setup()
        server = self.server
        assert isinstance(server, MetricsServer)
        self._connection = server.connection(self.request)
        self.rfile.close()  # the makefile() one: it would keep the socket open
        self.rfile = io.BufferedReader(_HeadReader(self._connection))

    def answering(self) -> None:
        """The request head is in: the connection may no longer be evicted, and the
        answer gets :data:`WRITE_TIMEOUT` seconds to be written."""
        self._connection.answering = True
        self.connection.settimeout(WRITE_TIMEOUT)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answering()  # error answers (400, 501, ...) too
        super().send_response(code, message)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: client %s: " + format, self._connection.peer, *args)


class _HeadReader(io.RawIOBase):
    """The socket's input, each read bounded by the connection's deadline (so the whole
    request head is, however slowly it trickles in)."""

    def __init__(self, connection: _Connection) -> None:
        super().__init__()
        self._connection = connection

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        connection = self._connection
        left = connection.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request head not complete within {connection.timeout:g} s")
        connection.sock.settimeout(left)
        count = connection.sock.recv_into(buffer)
        if count == 0 and connection.evicted:
            raise ConnectionAbortedError("dropped for a newer connection, request incomplete")
        return count


# --- the HTTP server ---------------------------------------------------------------------

#: most connections served at once (Prometheus and a health checker need one or two)
MAX_CONNECTIONS = 8
#: seconds a client has to send its whole request head
REQUEST_TIMEOUT = 5.0
#: seconds an answer may take to be written
WRITE_TIMEOUT = 5.0
#: seconds the accept loop waits before it looks again while no descriptor may be taken
#: (connections wait in the listen backlog meanwhile, costing ms1 no descriptor)
_FD_BACKOFF = 0.1
#: seconds a new connection waits for the slot of the connection it evicted
_EVICT_WAIT = 1.0
#: seconds between two warnings that descriptors are short
_WARNING_INTERVAL = 60.0
_FD_DIR = "/proc/self/fd"
_Selector: type[selectors.BaseSelector] = getattr(selectors, "PollSelector",
                                                  selectors.SelectSelector)


def fd_reserve(limit: int) -> int:
    """File descriptors kept for Redis, MS4 and the rest of ms1 under a soft
    ``RLIMIT_NOFILE`` of ``limit``: an eighth of it, at least 16."""
    return max(16, limit // 8)


def fd_usage() -> tuple[int, int] | None:
    """``(open, limit)``: descriptors this process has open and its soft
    ``RLIMIT_NOFILE``; None when there is no limit or no ``/proc`` to count them. When
    even listing ``/proc/self/fd`` fails (EMFILE), open is the limit."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir(_FD_DIR))  # counts the listing's own descriptor: one spare
    except FileNotFoundError:
        return None
    except OSError:
        return limit, limit
    return used, limit


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` of ``host:port``, ``[v6]:port`` or ``:port`` (127.0.0.1), or of
    a pair already parsed (``Config.get_address``); ValueError when it is neither."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, colon, port_text = address.strip().rpartition(":")
        if not colon or not port_text.isdigit():
            raise ValueError(f"expected host:port, got {address!r}")
        port = int(port_text)
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return host or "127.0.0.1", port


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


@dataclass(eq=False)
class _Connection:
    """One accepted connection, while it is served."""

    sock: socket.socket
    address: Any
    timeout: float
    started: float
    #: the request head is in (it is being answered): not evicted any more
    answering: bool = False
    #: shut down to make room for a newer connection
    evicted: bool = False
    #: set once its socket is closed
    closed: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    @property
    def peer(self) -> str:
        return _peer(self.address)


class MetricsServer(HTTPServer):
    """An HTTP server that bounds its connections, their time and its file descriptors
    (see the module documentation). ``serve_forever`` runs the accept loop; each
    connection is served in a thread of its own, :data:`MAX_CONNECTIONS` at most."""

    #: listen backlog: connections wait there (in the kernel) while none may be accepted
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._live: dict[socket.socket, _Connection] = {}
        self._closing = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._starved = False  # no descriptor may be taken now
        self._warned = False  # ... and it was logged
        self._next_warning = 0.0
        self._served = 0
        super().__init__(address, handler)

    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)  # a connection reset while queued: no blocking accept

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._idle.clear()
        try:
            with _Selector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                while not self._closing.is_set():
                    if selector.select(poll_interval) and not self._closing.is_set():
                        self._accept()
        finally:
            self._idle.set()

    def shutdown(self) -> None:
        """Stop the accept loop and wait until it has stopped."""
        self._closing.set()
        self._idle.wait()

    def server_close(self) -> None:
        """Close the listening socket and cut the connections still served."""
        self._closing.set()
        super().server_close()
        with self._lock:
            for connection in self._live.values():
                _shut(connection.sock)

    @property
    def active(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._live)

    def connection(self, sock: socket.socket) -> _Connection:
        with self._lock:
            return self._live[sock]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client's failure (reset, timeout, broken pipe) at DEBUG; anything else at
        ERROR; both through ``log`` (one record in the log format, no raw traceback)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("metrics: client %s: %s: %s", _peer(client_address),
                      type(exc).__name__, exc)
        else:
            log.error("metrics: error answering %s", _peer(client_address), exc_info=True)

    # --- accept loop --------------------------------------------------------------------

    def _accept(self) -> None:
        if not self._descriptor_free():
            return
        try:
            sock, address = self.socket.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("metrics: accept failed: %s", exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._closing.wait(_FD_BACKOFF)
            return
        self._dispatch(sock, address)

    def _descriptor_free(self) -> bool:
        """Whether one more descriptor may be taken outside the reserve. When not, it
        makes room by dropping the oldest connection still sending its request (the
        newest client wins, as when all slots are taken), or else waits
        :data:`_FD_BACKOFF` seconds; the new connection waits in the listen backlog."""
        usage = fd_usage()
        if usage is None or usage[0] + 1 <= usage[1] - fd_reserve(usage[1]):
            if self._warned:
                log.info("metrics: accepting connections again")
            self._starved = self._warned = False
            return True
        evicted = self._evict_oldest()
        if evicted is not None:
            evicted.closed.wait(_EVICT_WAIT)
            log.debug("metrics: dropped %s (request incomplete after %.1f s): file "
                      "descriptors short", evicted.peer, time.monotonic() - evicted.started)
            return False  # looks again: the new connection is still waiting
        if not self._starved:
            self._starved = True
            now = time.monotonic()
            if now >= self._next_warning:  # at most one a minute, however often it flaps
                self._next_warning = now + _WARNING_INTERVAL
                self._warned = True
                log.warning("metrics: not accepting connections: %d of %d file descriptors "
                            "are open, the last %d are kept for Redis and MS4", usage[0],
                            usage[1], fd_reserve(usage[1]))
        self._closing.wait(_FD_BACKOFF)
        return False

    def _dispatch(self, sock: socket.socket, address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            evicted = self._evict_oldest()
            if evicted is None or not self._slots.acquire(timeout=_EVICT_WAIT):
                log.debug("metrics: %d connections busy; closing the connection from %s",
                          self.max_connections, _peer(address))
                self.shutdown_request(sock)
                return
            log.debug("metrics: dropped %s (request incomplete after %.1f s) for %s",
                      evicted.peer, time.monotonic() - evicted.started, _peer(address))
        connection = _Connection(sock, address, self.request_timeout, time.monotonic())
        with self._lock:
            self._live[sock] = connection
        self._served += 1
        thread = threading.Thread(target=self._serve, args=(connection,), daemon=True,
                                  name=f"metrics-{self._served}")
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start new thread
            log.warning("metrics: cannot serve %s: %s", connection.peer, exc)
            self._finish(connection)

    def _evict_oldest(self) -> _Connection | None:
        """Shut down the oldest connection still sending its request head, if any."""
        with self._lock:
            waiting = [c for c in self._live.values() if not c.answering and not c.evicted]
            if not waiting:
                return None
            oldest = min(waiting, key=lambda c: c.started)
            oldest.evicted = True
            _shut(oldest.sock)  # its thread's read returns at once
            return oldest

    def _serve(self, connection: _Connection) -> None:
        try:
            self.finish_request(connection.sock, connection.address)
        except Exception:
            self.handle_error(connection.sock, connection.address)
        finally:
            self._finish(connection)

    def _finish(self, connection: _Connection) -> None:
        with self._lock:  # closed under the lock: an eviction never meets a closed socket
            self._live.pop(connection.sock, None)
            self.shutdown_request(connection.sock)
        connection.closed.set()
        self._slots.release()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        sock.shutdown(socket.SHUT_RDWR)
