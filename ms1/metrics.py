"""Operations: Prometheus metrics and health on a local port (``[metrics] address``).

:class:`Exporter` is an observer plugin — registered on the service's plugin manager,
fed by the same hooks a third-party metrics plugin would use — plus a small HTTP server:

* ``/metrics`` — Prometheus text format: e-mails read, payloads rejected by stage and
  field, batches and invoices enqueued / delivered / dead-lettered, MS4 responses by
  status, retries, queue ready / in flight, dead-letter count, breaker state, 429 pause
  and 401 spell, histograms of batch size and send latency;
* ``/healthz`` — 200 while every pipeline thread is alive, else 503;
* ``/readyz`` — 200 when ms1 can deliver; 503 naming why not: paused by a 401, breaker
  open, or the queue backend (Redis) unreachable.

Counters are read from the run's :class:`~ms1.stats.RunStats` at scrape time, so they
always agree with the ``--once`` summary and the logs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ms1.errors import Ms1Error
from ms1.hookspecs import hookimpl
from ms1.model import Batch, DeadLetter
from ms1.outbound import QueueStats
from ms1.sending.pacer import Pacer

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
    ("processor_errors", "ms1_processor_errors",
     "Unexpected errors inside the processor (each e-mail dead-lettered)"),
)
_BREAKER = {"closed": 0, "half-open": 1, "open": 2}


@dataclass(frozen=True)
class ServiceView:
    """What the exporter reads of a running service, at scrape time: read-only, so the
    exporter never imports or steers the service."""

    counters: Callable[[], dict[str, int]]
    alive: Callable[[], bool]
    pacer: Pacer
    queue_stats: Callable[[], QueueStats]
    dead_letter_count: Callable[[], int]


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
        yield _gauge("ms1_auth_blocked", "1 while MS4 rejects the API key (401 spell)",
                     1 if pacer.auth_blocked else 0)
        yield _gauge("ms1_up", "1 while every pipeline thread is alive",
                     1 if service.alive() else 0)
        try:
            queue = service.queue_stats()
            letters = service.dead_letter_count()
        except Ms1Error:
            yield _gauge("ms1_queue_reachable", "1 when the queue backend answers", 0)
            return
        yield _gauge("ms1_queue_reachable", "1 when the queue backend answers", 1)
        yield _gauge("ms1_queue_ready_batches", "Batches waiting for a sender", queue.ready)
        yield _gauge("ms1_queue_in_flight_batches", "Batches handed out, not yet acked",
                     queue.in_flight)
        yield _gauge("ms1_dead_letters", "Dead letters kept", letters)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


class Exporter:
    """Metrics and health of one service: an observer plugin plus an HTTP endpoint."""

    def __init__(self, service: ServiceView, address: str) -> None:
        self.service = service
        self._rejected: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_State(self))
        self.batch_size = Histogram(
            "ms1_batch_size", "Invoices per batch MS4 accepted", registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 30, 40, 45, 50, 75, 100, 200, 500, 1000))
        self.send_latency = Histogram(
            "ms1_send_latency_seconds", "Duration of accepted MS4 requests",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        host, _, port = address.rpartition(":")
        self._server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", self.address)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rejected_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._rejected)

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        pacer = self.service.pacer
        if not self.service.alive():
            return "a pipeline thread is not running"
        if pacer.auth_blocked:
            return "paused: MS4 rejects the API key (401); fix the key and reload"
        if pacer.breaker.state == "open":
            return "circuit breaker open: MS4 is failing"
        try:
            self.service.queue_stats()
        except Ms1Error as exc:
            return f"queue unreachable: {exc}"
        return None

    # --- observer hooks ---------------------------------------------------------------

    @hookimpl
    def ms1_batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        self.batch_size.observe(len(batch))
        self.send_latency.observe(latency)

    @hookimpl
    def ms1_payload_rejected(self, letter: DeadLetter) -> None:
        field = letter.reason.split(":", 1)[0] if letter.stage == "processor" else letter.stage
        with self._lock:
            key = (letter.stage, field[:64])
            self._rejected[key] = self._rejected.get(key, 0) + 1


def _handler(exporter: Exporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(exporter.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                alive = exporter.service.alive()
                self._answer(200 if alive else 503, b"ok\n" if alive else b"dead thread\n")
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

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
