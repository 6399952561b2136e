"""The progress watchdog (issue 12), through the real service as a subprocess with a
systemd notify socket: WATCHDOG=1 and ``/healthz`` follow the pipeline's *progress*, not
only its threads' lives. A sender wedged inside one request stops them; MS4 down (the
senders in backoff and breaker waits) or Redis frozen (every call failing after
``socket_timeout``, retried) does not. ``/readyz`` and ``/metrics`` answer at once while
Redis is frozen."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RedisServer, free_port
from support import service_ini, wait_until
from test_http_transport import Peer, Server, serving

from ms1.errors import Ms1Error
from ms1.heartbeat import call_within
from ms1.ops.metrics import QueueWatch
from ms1.ops.notify import Notifier, Watchdog
from ms1.pipeline import samples
from ms1.pipeline.outbound import QueueStats

WATCHDOG_TIMEOUT = 3.0
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
INTERVAL = WATCHDOG_USEC / 2 / 1e6


# --- harness (shared with test_shutdown) ------------------------------------------------


class NotifySocket:
    """systemd's notify socket: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.lock = threading.Lock()
        self.got: list[tuple[float, str]] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.got.append((time.monotonic(), data.decode()))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def pings(self) -> list[float]:
        with self.lock:
            return [at for at, text in self.got if "WATCHDOG=1" in text.split("\n")]

    def texts(self) -> list[str]:
        with self.lock:
            return [text for _, text in self.got]

    def close(self) -> None:
        self.closed.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    yield from serving()


def config_file(tmp_path: Path, *, ms4_url: str, redis_url: str, metrics: str = "",
                shutdown_timeout: float = 5, request_timeout: float = 30,
                socket_timeout: float = 1, source: str = "redis", queue: str = "redis",
                threads: int = 2, extra: str = "") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text(service_ini(redis_url, ms4_url=ms4_url, settings={
        "ms1": {"shutdown_timeout": shutdown_timeout, "watchdog_timeout": WATCHDOG_TIMEOUT,
                "once_timeout": 60, "log_format": "kv"},
        "metrics": {"address": metrics},
        "source": {"name": source},
        "queue": {"backend": queue},
        "dead_letters": {"backend": "redis" if source == "redis" else "memory"},
        "batch": {"max_items": 10, "max_wait": 0.1},
        "send": {"threads": threads, "retry_max": 0.3, "breaker_failures": 3,
                 "breaker_reset": 0.5},
        "transport.http": {"connect_timeout": 1, "read_timeout": request_timeout,
                           "request_timeout": request_timeout},
        "redis": {"consumer": "watchdog-test", "socket_timeout": socket_timeout,
                  "visibility_timeout": 60},
    }) + textwrap.dedent(extra))
    return path


def enqueue(config: Path, tmp_path: Path, count: int) -> list[samples.Sample]:
    emails = list(samples.generate(count, invalid_every=0))
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in emails))
    subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "enqueue",
                    str(data)], check=True, capture_output=True, timeout=60)
    return emails


def start_service(config: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                  stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ms1.cli", "--config", str(config), "run", *args],
        stdout=stdout, stderr=log.open("wb"),
        env={**os.environ, "MS1_MS4_API_KEY": "k", **(env or {})})


def get(address: str, path: str, timeout: float = 5) -> tuple[int, str, float]:
    """(status, body, seconds) of GET http://address/path; status 0: no answer."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as answer:
            status, body = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        status, body = 0, ""
    return status, body, time.monotonic() - started


@contextlib.contextmanager
def running(config: Path, log: Path, *args: str, env: dict[str, str] | None = None,
            stdout: int | None = subprocess.DEVNULL) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start_service`, killed at the end if the block left it running."""
    service = start_service(config, log, *args, env=env, stdout=stdout)
    try:
        yield service
    finally:
        if service.poll() is None:
            service.kill()


def stop(service: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
         timeout: float = 30) -> tuple[int, float]:
    """Send ``sig``; (exit status, seconds until the process ended)."""
    signalled = time.monotonic()
    service.send_signal(sig)
    try:
        status = service.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()
        return -999, time.monotonic() - signalled
    return status, time.monotonic() - signalled


def give_up(address: str, request: bytes) -> None:
    """A client that sends its request and resets the connection without reading."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def trickle(peer: Peer, n: int, request: bytes) -> bool:
    """MS4 trickling: a 202 status line, then a body byte every second, never done."""
    peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: 1000\r\n\r\n")
    peer.trickle(b"x" * 1000, 1.0)
    return False


def hang(peer: Peer, n: int, request: bytes) -> bool:
    """MS4 hanging: takes the request, never answers."""
    peer.stopped.wait(120)
    return False


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sender_wedged_in_a_trickling_request_stops_the_watchdog_and_healthz(
        tmp_path: Path, redis_url: str, serve: Callable[..., Server],
        notify_socket: NotifySocket) -> None:
    server = serve(trickle)
    metrics = f"127.0.0.1:{free_port()}"
    config = config_file(tmp_path, ms4_url=server.url, redis_url=redis_url, metrics=metrics,
                         request_timeout=30)
    enqueue(config, tmp_path, 40)
    log = tmp_path / "service.log"
    with running(config, log, env=notify_socket.env()) as service:
        assert wait_until(lambda: server.request_count() == 2, 20), tail(log)
        wedged = time.monotonic()  # both senders are inside a request from now on
        assert wait_until(lambda: bool(notify_socket.pings()), 5), tail(log)
        limit = WATCHDOG_TIMEOUT + INTERVAL + 1.0
        # silence: no ping for three intervals, starting before the limit
        assert wait_until(lambda: time.monotonic() - notify_socket.pings()[-1] > 3 * INTERVAL,
                          limit + 3 * INTERVAL + 2), tail(log)
        last = notify_socket.pings()[-1]
        status, body, _ = get(metrics, "/healthz")
        print(f"last WATCHDOG=1 {last - wedged:.2f} s after both senders were wedged; "
              f"/healthz {status}: {body.strip()}")
        assert last - wedged <= limit
        assert status == 503 and "sender-" in body and "no progress" in body
        assert "WATCHDOG=1" not in "".join(notify_socket.texts()[-3:])
        assert any("STATUS=" in t and "sender-" in t for t in notify_socket.texts())
        code, took = stop(service)
    print(f"SIGTERM to exit: {took:.2f} s")
    assert code == 0 and took <= 5 + 2, tail(log)
    assert "no progress" in log.read_text()


@pytest.mark.slow
def test_ms4_down_is_no_stall(tmp_path: Path, redis_url: str,
                              notify_socket: NotifySocket) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    metrics = f"127.0.0.1:{free_port()}"
    config = config_file(tmp_path, ms4_url=down, redis_url=redis_url, metrics=metrics)
    enqueue(config, tmp_path, 40)
    log = tmp_path / "service.log"
    with running(config, log, env=notify_socket.env()) as service:
        assert wait_until(lambda: "circuit breaker open" in log.read_text(), 20), tail(log)
        since = time.monotonic()
        time_enough = since + WATCHDOG_TIMEOUT + 2 * INTERVAL + 1.0
        while time.monotonic() < time_enough:  # pings go on the whole time
            assert time.monotonic() - notify_socket.pings()[-1] < 3 * INTERVAL, tail(log)
            status, body, _ = get(metrics, "/healthz")
            assert status == 200, body
            time.sleep(0.2)
        assert get(metrics, "/readyz")[:2] == (503, "not ready: circuit breaker open: MS4 "
                                                    "is failing\n")
        code, took = stop(service)
    assert code == 0 and took <= 5 + 2, tail(log)


@pytest.mark.xdist_group("measure")
@pytest.mark.slow
def test_redis_frozen_is_no_stall_and_health_answers_at_once(
        tmp_path: Path, own_redis: RedisServer, notify_socket: NotifySocket) -> None:
    sim = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                            "--rate-limit", "0", "--api-key", "k"], stdout=subprocess.PIPE,
                           text=True)
    assert sim.stdout is not None
    sim_url = sim.stdout.readline().split()[-1]
    metrics = f"127.0.0.1:{free_port()}"
    config = config_file(tmp_path, ms4_url=sim_url, redis_url=own_redis.url, metrics=metrics)
    enqueue(config, tmp_path, 30)
    log = tmp_path / "service.log"
    try:
        with running(config, log, env=notify_socket.env()) as service:
            assert wait_until(lambda: get(metrics, "/readyz")[0] == 200, 20), tail(log)
            assert wait_until(lambda: "ms1_invoices_delivered_total 30.0"
                              in get(metrics, "/metrics")[1], 20), tail(log)
            with own_redis.frozen():
                since = time.monotonic()
                answers: list[tuple[int, str, float]] = []
                while time.monotonic() < since + WATCHDOG_TIMEOUT + 2 * INTERVAL + 1.5:
                    assert time.monotonic() - notify_socket.pings()[-1] < 3 * INTERVAL, \
                        tail(log)
                    assert get(metrics, "/healthz")[0] == 200
                    answers.append(get(metrics, "/readyz", timeout=5))
                    time.sleep(0.2)  # the pace of the probes, not a synchronisation
                scraped = get(metrics, "/metrics", timeout=5)
                for _ in range(3):  # probes that give up at once: no traceback in the log
                    give_up(metrics, b"GET /readyz HTTP/1.0\r\n\r\n")
                    give_up(metrics, b"GET /metrics HTTP/1.0\r\n\r\n")
            slowest = max(took for _, _, took in answers)
            print(f"/readyz while Redis is frozen: slowest answer {slowest * 1000:.0f} ms, "
                  f"last: {answers[-1][:2]}; /metrics in {scraped[2] * 1000:.0f} ms")
            assert slowest < 0.1
            # (named by the part that met it first: the queue's counts, or a read that timed out)
            assert answers[-1][0] == 503 and ("queue unreachable" in answers[-1][1]
                                              or "Timeout" in answers[-1][1]), answers[-1]
            assert scraped[0] == 200 and scraped[2] < 0.5
            assert "ms1_queue_reachable 0.0" in scraped[1]
            assert wait_until(lambda: get(metrics, "/readyz")[0] == 200, 10), tail(log)
            code, took = stop(service)
    finally:
        sim.terminate()
        sim.communicate(timeout=10)
    assert code == 0 and took <= 5 + 2, tail(log)
    assert "Traceback" not in log.read_text()


# --- the parts, in process --------------------------------------------------------------


class FakeQueue:
    """``stats()`` that answers, fails or blocks until released, as the test says."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = ""
        self.block = threading.Event()
        self.block.set()

    def stats(self) -> QueueStats:
        self.calls += 1
        self.block.wait(10)
        if self.fail:
            raise Ms1Error(self.fail)
        return QueueStats(self.calls, 0)


def test_queue_watch_answers_from_its_last_reading_and_never_waits() -> None:
    queue = FakeQueue()
    watch = QueueWatch(queue.stats, lambda: 7, interval=0.05, stale_after=0.3)
    watch.start()
    try:
        first = watch.fresh(1.0)
        assert first.ready >= 1 and watch.unreachable() is None
        assert watch.fresh(1.0).ready > first.ready  # a reading begun after the ask
        assert watch.latest().dead_letters == 7
        queue.block.clear()  # Redis frozen: the watch's own thread is held, nobody else
        started = time.monotonic()
        with pytest.raises(Ms1Error, match=r"did not answer within 0\.2 s"):
            watch.fresh(0.2)
        assert time.monotonic() - started < 0.5
        assert wait_until(lambda: watch.unreachable() is not None, 2)
        started = time.monotonic()
        assert "no answer from the queue backend" in str(watch.unreachable())
        assert watch.latest().stats is not None  # the last reading is still there
        assert time.monotonic() - started < 0.05
        queue.fail = "read queue length: ConnectionError: refused"
        queue.block.set()
        assert wait_until(lambda: "refused" in str(watch.unreachable()), 2)
        with pytest.raises(Ms1Error, match="refused"):
            watch.fresh(1.0)
        queue.fail = ""
        assert wait_until(lambda: watch.unreachable() is None, 2)
    finally:
        queue.block.set()
        watch.close()


def test_queue_watch_not_started_reads_in_the_caller() -> None:
    queue = FakeQueue()
    watch = QueueWatch(queue.stats)
    assert watch.unreachable() == "the queue has not been read yet"
    assert watch.fresh(1.0) == QueueStats(1, 0)
    assert watch.unreachable() is None


def test_call_within_returns_raises_or_gives_up_in_time() -> None:
    assert call_within(lambda: 42, 1.0, "answer") == 42
    with pytest.raises(ValueError, match="bad"):
        call_within(lambda: (_ for _ in ()).throw(ValueError("bad")), 1.0, "fail")
    hold = threading.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"close: no answer within 0\.1 s"):
        call_within(lambda: hold.wait(10), 0.1, "close")
    assert time.monotonic() - started < 0.5
    hold.set()


def test_an_unhealthy_watchdog_says_why_in_status_and_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "n.sock"))
    receiver.settimeout(1)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
    why: list[str | None] = [None]
    dog = Watchdog(notifier, 1, lambda: why[0] is None, status=lambda: "3 delivered",
                   problem=lambda: why[0])
    try:
        assert dog.tick() is True
        assert receiver.recv(4096) == b"WATCHDOG=1\nSTATUS=3 delivered"
        why[0] = "sender-1: no progress for 130 s (sending batch b1 to MS4 (attempt 1))"
        with caplog.at_level("WARNING"):
            assert dog.tick() is False
            assert dog.tick() is False
        assert receiver.recv(4096) == f"STATUS=UNHEALTHY: {why[0]}".encode()
        assert caplog.text.count("watchdog pings suspended: sender-1: no progress") == 1
        why[0] = None
        assert dog.tick() is True
    finally:
        notifier.close()
        receiver.close()
