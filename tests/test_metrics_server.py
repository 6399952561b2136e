"""The metrics/health HTTP server under hostile clients, with the real service as a
subprocess: slow clients under a low file-descriptor limit, connection resets with JSON
logs; plus the shipped production config serving it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import pytest
from conftest import free_port
from support import service_ini, wait_until

from ms1.ops import httpserver, metrics
from ms1.runtime import pluginmanager

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


# --- helpers ------------------------------------------------------------------------------

def get(address: str, path: str, timeout: float = 5) -> tuple[int, str]:
    """Status and body of GET ``path``; 0 when nothing answered."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def start_sim() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                             "--rate-limit", "0", "--api-key", "k"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ms4-sim listening on "), line
    return proc, line.split()[-1]


def sim_accepted(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
            return int(json.loads(answer.read())["unique_invoices_accepted"])
    except OSError:
        return -1


def write_config(tmp_path: Path, *, redis_url: str, metrics: str, sim_url: str = "",
                 log_level: str = "INFO") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text(service_ini(redis_url, ms4_url=sim_url or None, settings={
        "ms1": {"shutdown_timeout": 5, "log_format": "json", "log_level": log_level},
        "metrics": {"address": metrics},
        "batch": {"max_wait": 0.1},
        "send": {"threads": 4, "retry_max": 0.2},
        "redis": {"consumer": "metrics-test"},
    }))
    return path


def enqueue(config: Path, tmp_path: Path, count: int, first: int) -> None:
    """Put ``count`` valid e-mails on the inbound stream (with the admin command)."""
    data = tmp_path / f"in-{first}.jsonl"
    lines = []
    for n in range(first, first + count):
        lines.append(json.dumps({
            "message_id": f"<{n}@test>", "received_at": "2025-11-01T09:30:00Z",
            "sender": "billing@vendor.example", "subject": f"Invoice {n}",
            "raw_json": {"invoice_id": f"INV-{n}", "vendor_name": "Vendor",
                         "invoice_date": "2025-11-01", "total_amount": 10.0,
                         "currency": "USD", "line_items": []}}))
    data.write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "enqueue",
                    str(data)], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "MS1_MS4_API_KEY": "k"})


def limit_fds(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def start_service(config: Path, log: Path, procs: list[subprocess.Popen[bytes]],
                  fd_limit: int | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, "MS1_MS4_API_KEY": "k"},
                            preexec_fn=limit_fds(fd_limit) if fd_limit else None)
    procs.append(proc)
    return proc


def stop_service(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def open_slow_connections(address: str, count: int) -> list[socket.socket]:
    """Up to ``count`` connections that never send a request, opened one after the other
    (so a server that accepts at once gets them all); stops early once five connects in
    a row time out (a server that stopped accepting: its backlog is full)."""
    host, port = address.rsplit(":", 1)
    socks: list[socket.socket] = []
    failures = 0
    while len(socks) < count and failures < 5:
        try:
            sock = socket.create_connection((host, int(port)), timeout=1)
        except OSError:
            failures += 1
            continue
        failures = 0
        sock.setblocking(False)
        socks.append(sock)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


@pytest.fixture
def sim() -> Iterator[str]:
    proc, url = start_sim()
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def json_lines(log: Path) -> list[dict[str, object]]:
    """Every stderr line as JSON; fails naming the first line that is not."""
    records = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}")
    return records


# --- the server in process: connection cap, eviction, fd reserve ---------------------------

def ok_app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def make_server(app: Callable[..., list[bytes]] = ok_app, *, max_connections: int = 2,
                usage: Callable[[], tuple[int, int] | None] | None = None
                ) -> httpserver.Server:
    srv = httpserver.Server(app, "127.0.0.1", 0, name="metrics",
                            logger=logging.getLogger("ms1.ops.metrics"), threads=2,
                            max_connections=max_connections, idle_timeout=30,
                            request_timeout=30, usage=usage)
    srv.start()
    return srv


@pytest.fixture
def server() -> Iterator[httpserver.Server]:
    srv = make_server()
    yield srv
    srv.close()


def peer_closed(sock: socket.socket) -> bool:
    """True once the server closed or reset ``sock`` (it never sent a request)."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_connections_are_capped_and_a_new_one_evicts_the_oldest_slow_one(
        server: httpserver.Server) -> None:
    """waitress serves at most max_connections; a newer client waiting in the backlog
    makes the oldest connection not being answered give way, so a flood of slow clients
    cannot keep a health check out."""
    address = server.address
    slow = open_slow_connections(address, 10)
    try:
        assert wait_until(lambda: server.server.connections == 2, 5)
        assert get(address, "/healthz") == (200, "ok\n")  # in within the evictions
        assert server.server.connections <= 2
        assert wait_until(lambda: sum(peer_closed(s) for s in slow) >= 8, 10)
    finally:
        close_all(slow)
    assert wait_until(lambda: server.server.connections == 0, 5)


def test_a_request_being_answered_is_never_evicted() -> None:
    """Both slots answering: a third connection waits; neither answer is cut short."""
    release, entered = threading.Event(), threading.Semaphore(0)

    def held(environ: dict[str, object], start_response: Callable[..., object]
             ) -> list[bytes]:
        entered.release()
        release.wait(10)
        return ok_app(environ, start_response)

    srv = make_server(held)
    address = srv.address
    answers: list[tuple[int, str]] = []
    busy = [threading.Thread(target=lambda: answers.append(get(address, "/")))
            for _ in range(2)]
    try:
        for thread in busy:
            thread.start()
        assert all(entered.acquire(timeout=5) for _ in busy)
        third = threading.Thread(target=lambda: answers.append(get(address, "/", 10)))
        third.start()
        time.sleep(0.5)  # the third waits in the backlog, evicting nobody
        assert answers == []
        release.set()
        for thread in [*busy, third]:
            thread.join(15)
        assert answers == [(200, "ok\n")] * 3
    finally:
        release.set()
        srv.close()


def test_no_connection_is_accepted_inside_the_fd_reserve(
        caplog: pytest.LogCaptureFixture) -> None:
    limit = 64
    used = [limit - httpserver.fd_reserve(limit)]  # one more would eat into the reserve
    srv = make_server(usage=lambda: (used[0], limit))
    host, port = srv.address.rsplit(":", 1)
    try:
        with caplog.at_level(logging.DEBUG, logger="ms1.ops.metrics"), \
                socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # waits in the listen backlog
            assert wait_until(lambda: "not accepting connections" in caplog.text, 5)
            assert srv.server.connections == 0
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(100)  # not answered while the descriptors are short
            used[0] -= 1
            sock.settimeout(5)
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
        assert caplog.text.count("not accepting connections") == 1  # once per episode
        assert "accepting connections again" in caplog.text
    finally:
        srv.close()


def test_inside_the_fd_reserve_a_slow_client_gives_way() -> None:
    limit = 64
    others = limit - httpserver.fd_reserve(limit) - 1  # room for exactly one connection
    holder: list[httpserver.Server] = []
    srv = make_server(usage=lambda: (others + (holder[0].server.connections
                                               if holder else 0), limit))
    holder.append(srv)
    try:
        slow = open_slow_connections(srv.address, 1)
        assert wait_until(lambda: srv.server.connections == 1, 5)
        assert get(srv.address, "/healthz") == (200, "ok\n")
        assert peer_closed(slow[0]) or wait_until(lambda: peer_closed(slow[0]), 5)
        close_all(slow)
    finally:
        srv.close()


def test_fd_usage_counts_this_process() -> None:
    usage = metrics.fd_usage()
    assert usage is not None
    before, limit = usage
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with socket.socket():
        after = metrics.fd_usage()
        assert after is not None and after[0] == before + 1


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    (":9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:0", ("localhost", 0)),
    (("127.0.0.1", 9464), ("127.0.0.1", 9464)),
    (("", 9464), ("127.0.0.1", 9464)),
])
def test_parse_address(text: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "127.0.0.1:", "host:port", "127.0.0.1:70000"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        metrics.parse_address(text)


# --- defect 1: slow clients under a low fd limit ------------------------------------------

@pytest.mark.xdist_group("measure")
@pytest.mark.parametrize("fd_limit", [64, 32])
def test_slow_clients_under_a_low_fd_limit_cannot_starve_the_pipeline(
        redis_url: str, tmp_path: Path, sim: str, procs: list[subprocess.Popen[bytes]],
        fd_limit: int) -> None:
    """300 clients that never send a request (half of them trickle a byte a second),
    with the service at 64 file descriptors (32: the server works inside its reserve):
    it keeps delivering, no thread dies, and /healthz answers during the flood and
    after."""
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_url=redis_url, metrics=address, sim_url=sim)
    log = tmp_path / "service.log"
    service = start_service(config, log, procs, fd_limit=fd_limit)
    assert wait_until(lambda: get(address, "/healthz")[0] == 200, 30), log.read_text()
    # the flood comes first: the pools to Redis and MS4 still have to grow
    socks = open_slow_connections(address, 300)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):  # a byte a second: the pace of the attack, not a sync
            for sock in socks[::2]:
                with contextlib.suppress(OSError):
                    sock.send(b"G")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for round_ in range(6):  # e-mails keep coming during the flood
            enqueue(config, tmp_path, 200, round_ * 200)
            socks.extend(open_slow_connections(address, 60))
        assert wait_until(lambda: sim_accepted(sim) == 1200 or service.poll() is not None,
                          60), log.read_text()[-3000:]
        assert service.poll() is None, log.read_text()[-3000:]
        assert sim_accepted(sim) == 1200
        # one answer while the slow clients still hold their connections
        assert wait_until(lambda: get(address, "/healthz", timeout=2)[0] == 200, 20)
    finally:
        stop.set()
        trickler.join(10)
        close_all(socks)
    assert wait_until(lambda: get(address, "/healthz") == (200, "ok\n"), 20)
    assert get(address, "/readyz") == (200, "ready\n")
    assert stop_service(service) == 0, log.read_text()[-3000:]
    records = json_lines(log)
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records[-5:]


def test_a_client_that_sends_a_byte_a_second_is_cut_off(
        redis_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """The whole request head has a deadline (5 s), however slowly it trickles in."""
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_url=redis_url, metrics=address)
    log = tmp_path / "service.log"
    service = start_service(config, log, procs)
    assert wait_until(lambda: get(address, "/healthz")[0] == 200, 30), log.read_text()
    host, port = address.rsplit(":", 1)
    request = b"GET /healthz HTTP/1.0\r\n" + b"X-Slow: " + b"a" * 20
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        sock.settimeout(0.5)
        closed_after = None
        for byte in request:
            try:
                sock.send(bytes([byte]))
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue  # the server still listens: the next byte, half a second later
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the server waited for the whole slow request"
    assert 4 <= closed_after <= 8, closed_after
    assert stop_service(service) == 0


# --- defect 2: resets are logged, never printed as tracebacks ------------------------------

def test_client_resets_are_logged_in_the_log_format_not_as_tracebacks(
        redis_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Twenty clients that reset their connection mid-request: the server keeps
    answering, and nothing it logs is a traceback or leaves the JSON log format."""
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_url=redis_url, metrics=address, log_level="DEBUG")
    log = tmp_path / "service.log"
    service = start_service(config, log, procs)
    assert wait_until(lambda: get(address, "/healthz")[0] == 200, 30), log.read_text()
    host, port = address.rsplit(":", 1)
    for _ in range(20):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: partial
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    assert get(address, "/healthz") == (200, "ok\n")
    assert stop_service(service) == 0
    records = json_lines(log)
    assert not [r for r in records if "Traceback" in json.dumps(r)]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records[-5:]


# --- defect 3: production serves metrics and health ----------------------------------------

def test_prod_config_serves_metrics_on_loopback(pm: pluggy.PluginManager) -> None:
    config = pluginmanager.load(pm, str(ROOT / "conf" / "prod.ini"))  # strictly validated
    host, port = metrics.parse_address(config.get_str("metrics", "address"))
    assert host == "127.0.0.1" and port == 9464
    unit = (ROOT / "conf" / "ms1-service.service").read_text()
    families = next(line for line in unit.splitlines()
                    if line.startswith("RestrictAddressFamilies="))
    assert "AF_INET" in families.split("=", 1)[1].split()
    assert "PrivateNetwork=yes" not in unit  # loopback must be the host's
