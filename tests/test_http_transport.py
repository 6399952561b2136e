"""The http transport: under respx (headers, paths, errors, every MS4 answer end to end
through the real sender pool), then against real sockets (keep-alive, a server that closes
idle or after answering, no answer, refused, chunked answers, the pool, TLS)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
import respx

from ms1.config import Secret
from ms1.errors import ConfigError, TransportError
from ms1.hookspecs import hookimpl
from ms1.model import BATCH_PATH, UNIT_PATH
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy, UnitPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.pipeline.transport import Request
from ms1.runtime.components import Components
from ms1.runtime.service import Service
from ms1_plugins.http_transport import HttpTransport

BASE = "http://ms4.test"
KEY = "k-123-very-secret"


@pytest.fixture
def transport():
    t = HttpTransport(BASE, max_connections=4)
    t.set_api_key(Secret(KEY, "test"))
    yield t
    t.close()


@respx.mock(using="httpx")
def test_post_batch_headers_and_body(transport: HttpTransport, respx_mock) -> None:
    route = respx_mock.post(f"{BASE}/batch-metadata").mock(return_value=httpx.Response(202))
    body = b'[{"invoice_id":"A"},{"invoice_id":"B"}]'
    response = transport.send(Request(BATCH_PATH, body, "batch-id-1", 2))
    assert response.status == 202
    sent = route.calls.last.request
    assert sent.content == body
    assert sent.headers["X-API-Key"] == KEY
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Idempotency-Key"] == "batch-id-1"


@respx.mock(using="httpx")
def test_unit_policy_posts_one_object_to_metadata(transport: HttpTransport,
                                                  respx_mock) -> None:
    route = respx_mock.post(f"{BASE}/metadata").mock(return_value=httpx.Response(202))
    transport.send(Request(UNIT_PATH, b'{"invoice_id":"A"}', "k", 1))
    assert json.loads(route.calls.last.request.content) == {"invoice_id": "A"}


@respx.mock(using="httpx")
def test_answers_are_returned_with_lowercase_headers(transport: HttpTransport,
                                                     respx_mock) -> None:
    respx_mock.post(f"{BASE}/batch-metadata").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "7"}, text="slow down"))
    response = transport.send(Request(BATCH_PATH, b"[]", "k", 0))
    assert (response.status, response.headers["retry-after"], response.text) == (
        429, "7", "slow down")


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"),
                                   httpx.ReadTimeout("slow"),
                                   httpx.RemoteProtocolError("dropped")])
@respx.mock(using="httpx")
def test_no_answer_becomes_transport_error_without_the_key(transport: HttpTransport, respx_mock,
                                                           error: Exception) -> None:
    respx_mock.post(f"{BASE}/batch-metadata").mock(side_effect=error)
    with pytest.raises(TransportError) as info:
        transport.send(Request(BATCH_PATH, b"[]", "k", 0))
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert info.value.__cause__ is None or KEY not in str(info.value.__cause__)


def test_key_never_in_repr(transport: HttpTransport) -> None:
    assert KEY not in repr(transport) and KEY not in str(vars(transport))


def test_factory_needs_a_key_and_a_real_url(make_config, monkeypatch) -> None:
    from ms1.runtime import pluginmanager

    monkeypatch.delenv("MS1_MS4_API_KEY", raising=False)
    pm = pluginmanager.make_plugin_manager()
    config = make_config("[ms4]\ntransport = http\n")
    with pytest.raises(Exception, match=r"\[ms4\] api_key_env: the http transport needs an API "
                                        r"key: set \$MS1_MS4_API_KEY"):
        pluginmanager.build(pm, config, "transport")
    monkeypatch.setenv("MS1_MS4_API_KEY", "x")
    with pytest.raises(ConfigError, match=r"\[transport.http\] base_url: expected an "
                                          r"http:// or https:// URL"):
        make_config("[ms4]\ntransport = http\n[transport.http]\nbase_url = ftp://h\n")


# --- every answer, through the real sender pool ------------------------------------


class Ms4Script:
    """A respx side effect: answers from a function, records (time, thread, ids) of each call."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[tuple[float, float, list[str], int]] = []
        self.attempts = 0
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        ids = [o["invoice_id"] for o in json.loads(request.content)]
        with self.lock:
            n = self.attempts
            self.attempts += 1
        response = self.answer(n, ids, request)
        with self.lock:
            self.calls.append((started, time.monotonic(), ids, response.status_code))
        return response

    def delivered(self) -> list[str]:
        return [i for _, _, ids, status in self.calls if status == 202 for i in ids]


def run_service(make_config, pm, script: Ms4Script, n: int = 200, threads: int = 4,
                extra: str = "", policy=None, timeout: float = 30):
    config = make_config(
        f"[send]\nthreads = {threads}\nretry_initial = 0.01\nretry_max = 0.05\n"
        f"requests_per_minute = 100000\nretry_after_default = 0.2\nretry_after_max = 0.4\n"
        f"breaker_reset = 0.2\nauth_probe_interval = 0.3\n{extra}")
    transport = HttpTransport(BASE, max_connections=threads)
    transport.set_api_key(Secret(KEY))
    emails = list(samples.generate(n))
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=policy or SizeBatchPolicy(10, 1_000_000, 3600),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport)
    with respx.mock(using="httpx", assert_all_called=False) as router:
        router.post(f"{BASE}/batch-metadata").mock(side_effect=script)
        router.post(f"{BASE}/metadata").mock(side_effect=script)
        service = Service(config, pm, parts, once=True)
        service.start()
        summary = service.run_once(timeout)
    transport.close()
    return summary, parts, [s.invoice_id for s in emails]


class PausedBy429:
    """An observer plugin: ``taken`` is set once a sender reported its 429 -- after the
    pacer took the pause (a sender tells the observers after ``Pacer.done``)."""

    def __init__(self) -> None:
        self.taken = threading.Event()

    @hookimpl
    def ms1_batch_failed(self, batch, status: int | None, error: str, attempt: int,
                         will_retry: bool) -> None:
        if status == 429:
            self.taken.set()


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("retry_after", "expected_pause"),
    [
        ("7", 0.4), ("1.5", 0.4), ("99999999", 0.4),
        (lambda: format_datetime(later(3), usegmt=True), 0.4),
        (lambda: later(3).strftime("%A, %d-%b-%y %H:%M:%S GMT"), 0.4),
        (lambda: later(3).strftime("%a %b %d %H:%M:%S %Y"), 0.4),
        (lambda: format_datetime(later(-3600), usegmt=True), 0.0),
        ("-5", 0.2), ("abc", 0.2), ("", 0.2), (None, 0.2),
    ],
    ids=["7", "1.5", "99999999", "imf-fixdate", "rfc850", "asctime", "past", "-5", "abc",
         "empty", "missing"],
)
def test_429_pauses_every_sender_for_retry_after(make_config, pm, retry_after,
                                                 expected_pause: float) -> None:
    value = retry_after() if callable(retry_after) else retry_after
    others = 4 - 1  # run_service's senders but the one that gets the 429
    paused = PausedBy429()
    pm.register(paused)
    arrived = threading.Condition()
    held: list[int] = []  # the others' requests, held in flight until the pause is taken
    held_before_429: list[bool] = []

    def answer(n: int, ids, request) -> httpx.Response:
        if n == 5:
            # every other sender has a request in flight first, so none of them can be
            # admitted between this answer and the pause the sender that gets it takes
            with arrived:
                held_before_429.append(arrived.wait_for(lambda: len(held) == others, 10))
            headers = {} if value is None else {"Retry-After": value}
            return httpx.Response(429, headers=headers)
        if n > 5 and not paused.taken.is_set():
            with arrived:
                held.append(n)
                arrived.notify_all()
            paused.taken.wait(10)
        return httpx.Response(202)

    script = Ms4Script(answer)
    summary, _, ids = run_service(make_config, pm, script)
    assert held_before_429 == [True] and len(held) == others, held
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    t429 = next(end for _, end, _, status in script.calls if status == 429)
    # no request from any thread started inside the pause
    gap = [start for start, _, _, _ in script.calls if start > t429]
    assert gap, "nothing was sent after the 429"
    assert min(gap) - t429 >= expected_pause - 0.03
    assert min(gap) - t429 <= expected_pause + 0.5


def test_400_splits_and_dead_letters_with_ms4_text(make_config, pm) -> None:
    bad = {"INV-0000013", "INV-0000077"}

    def answer(n, ids, request):
        wrong = sorted(set(ids) & bad)
        if wrong:
            return httpx.Response(400, json={"error": "invalid object(s)",
                                             "details": [{"invoice_id": wrong[0]}]})
        return httpx.Response(202)

    script = Ms4Script(answer)
    summary, parts, ids = run_service(make_config, pm, script, n=100)
    assert summary.ok
    assert sorted(script.delivered()) == sorted(set(ids) - bad)
    letters = parts.dead_letters.all()
    assert {letter.invoice_id for letter in letters} == bad
    assert all("invalid object(s)" in letter.reason and letter.ms4_answer.startswith("400")
               for letter in letters)


def test_413_is_handled_like_400(make_config, pm) -> None:
    def answer(n, ids, request):
        return httpx.Response(413, text="too large") if len(ids) > 2 else httpx.Response(202)

    script = Ms4Script(answer)
    summary, parts, ids = run_service(make_config, pm, script, n=40)
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    assert parts.dead_letters.count() == 0


def test_401_stops_every_sender_logs_once_and_resumes_after_probe(make_config, pm,
                                                                  caplog) -> None:
    state = {"until": None}

    def answer(n, ids, request):
        if n == 3:
            state["until"] = time.monotonic() + 0.5
        if state["until"] and time.monotonic() < state["until"]:
            return httpx.Response(401, text="unauthorized")
        return httpx.Response(202)

    script = Ms4Script(answer)
    with caplog.at_level(logging.CRITICAL, logger="ms1.pipeline.sending.pacer"):
        summary, _, ids = run_service(make_config, pm, script, n=300)
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    spell = [c for c in script.calls if c[3] == 401]
    # no retry storm: the in-flight requests when the spell began, then slow probes only
    assert len(spell) <= 4 + 3
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "401" in critical[0].getMessage()
    assert KEY not in caplog.text


def test_5xx_and_connection_errors_are_retried_until_delivered(make_config, pm) -> None:
    def answer(n, ids, request):
        if n % 3 == 0:
            raise httpx.ConnectError("refused")
        if n % 3 == 1:
            return httpx.Response(503)
        return httpx.Response(202)

    script = Ms4Script(answer)
    summary, _, ids = run_service(make_config, pm, script, n=100,
                                  extra="breaker_failures = 1000\n")
    assert summary.ok and sorted(script.delivered()) == sorted(ids)


def test_breaker_opens_and_stops_hammering(make_config, pm) -> None:
    state = {"down_until": time.monotonic() + 1.0}

    def answer(n, ids, request):
        if time.monotonic() < state["down_until"]:
            return httpx.Response(500)
        return httpx.Response(202)

    script = Ms4Script(answer)
    summary, _, ids = run_service(make_config, pm, script, n=100,
                                  extra="breaker_failures = 3\n")
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    failures = [c for c in script.calls if c[3] == 500]
    # 1 s of outage, breaker reset 0.2 s: the 3 failures + in-flight, then ~1 probe per 0.2 s
    assert len(failures) <= 3 + 4 + 6


def test_unexpected_status_keeps_the_batch(make_config, pm, caplog) -> None:
    def answer(n, ids, request):
        return httpx.Response(404) if n < 2 else httpx.Response(202)

    script = Ms4Script(answer)
    with caplog.at_level(logging.ERROR):
        summary, _, ids = run_service(make_config, pm, script, n=30, threads=1)
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    assert "unexpected answer from MS4" in caplog.text


def test_a_1xx_answer_is_no_success_and_the_batch_is_resent(make_config, pm, caplog) -> None:
    # httpcore hands back no 1xx but 101 (which h11 refuses unasked): should one come back
    # anyway, the sender retries it and the pacer counts it as a breaker failure
    def answer(n, ids, request):
        return httpx.Response(101) if n == 0 else httpx.Response(202)

    script = Ms4Script(answer)
    with caplog.at_level(logging.WARNING):
        summary, _, ids = run_service(make_config, pm, script, n=10, threads=1,
                                      extra="breaker_failures = 1\n")
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    assert [c[3] for c in script.calls] == [101, 202]
    assert summary.stats.get("responses_101") == 1
    assert "circuit breaker open" in caplog.text


def test_unit_policy_over_http(make_config, pm) -> None:
    def answer(n, ids, request):
        assert request.url.path == "/metadata"
        return httpx.Response(202)

    class Single(Ms4Script):
        def __call__(self, request):
            body = json.loads(request.content)
            request_ids = [body["invoice_id"]]
            with self.lock:
                self.calls.append((time.monotonic(), time.monotonic(), request_ids, 202))
            return httpx.Response(202)

    script = Single(answer)
    summary, _, ids = run_service(make_config, pm, script, n=20, policy=UnitPolicy())
    assert summary.ok and sorted(script.delivered()) == sorted(ids)
    assert len(script.calls) == 20


# --- against real sockets: a scripted HTTP/1.1 server ------------------------------


BODY = b'[{"invoice_id":"A"}]'


def read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 request (head + Content-Length body) from ``conn``; None on EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    buffer[:] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


class Peer:
    """The server's side of one connection, handed to a handler with the request."""

    def __init__(self, sock: socket.socket, stopped: threading.Event) -> None:
        self.sock = sock
        self.stopped = stopped

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, interval: float) -> None:
        """Send ``data`` one byte every ``interval`` s (until the server is closed)."""
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])
            if self.stopped.wait(interval):
                return


#: (connection, request number from 1, raw request) -> keep the connection for more requests?
Handler = Callable[[Peer, int, bytes], bool]


def replying(make: Callable[[int, bytes], bytes | None]) -> Handler:
    """A handler answering the raw bytes ``make`` gives (None: close without answering)."""

    def handle(peer: Peer, n: int, request: bytes) -> bool:
        raw = make(n, request)
        if raw is None:
            return False
        peer.send(raw)
        return b"connection: close" not in raw.lower()

    return handle


class Server:
    """A scripted HTTP/1.1 server on loopback; counts connections and requests."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    continue
            with self.lock:
                self.connections += 1
                self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = bytearray()
        try:
            while (request := read_request(conn, buffer)) is not None:
                with self.lock:
                    self.requests.append(request)
                    n = len(self.requests)
                if not self.handler(Peer(conn, self.stopped), n, request):
                    break
        except OSError:
            pass
        finally:
            conn.close()

    def request_count(self) -> int:
        with self.lock:
            return len(self.requests)

    def drop_connections(self) -> None:
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.drop_connections()


def answer(status: int = 202, body: bytes = b"", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def serving() -> Iterator[Callable[..., Server]]:
    """The body of a ``serve`` fixture: start servers, close them all afterwards."""
    servers: list[Server] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(handler, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    yield from serving()


def client(url: str, **kwargs) -> HttpTransport:
    kwargs.setdefault("read_timeout", 5.0)
    kwargs.setdefault("connect_timeout", 2.0)
    transport = HttpTransport(url, **kwargs)
    transport.set_api_key(Secret("k-wire"))
    return transport


def post(transport: HttpTransport) -> int:
    return transport.send(Request(BATCH_PATH, BODY, "idem-1", 1)).status


def test_requests_reuse_one_kept_alive_connection_and_carry_the_body(serve) -> None:
    server = serve(replying(lambda n, req: answer()))
    transport = client(server.url)
    assert [post(transport) for _ in range(5)] == [202] * 5
    assert server.connections == 1
    request = server.requests[0]
    assert request.startswith(b"POST /batch-metadata HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\n" + BODY)
    head = request.lower()
    for header in (b"x-api-key: k-wire", b"idempotency-key: idem-1",
                   b"content-type: application/json", b"content-length: 20",
                   b"host: 127.0.0.1:"):
        assert header in head
    transport.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(serve) -> None:
    server = serve(replying(lambda n, req: answer()))
    transport = client(server.url)
    assert post(transport) == 202
    server.drop_connections()
    # wait until the client's idle socket is readable (the server's FIN has arrived)
    streams = transport._network.live_streams()
    assert len(streams) == 1
    assert wait_for(lambda: bool(streams[0].get_extra_info("is_readable")))
    assert post(transport) == 202  # no error: the dead connection was noticed first
    assert server.connections == 2
    transport.close()


def test_connection_close_from_the_server_is_honoured(serve) -> None:
    server = serve(replying(lambda n, req: answer(extra="Connection: close\r\n")))
    transport = client(server.url)
    assert [post(transport) for _ in range(3)] == [202] * 3
    assert server.connections == 3
    transport.close()


def test_no_answer_in_time_is_a_read_timeout_and_the_next_request_works(serve) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        if n == 1:
            peer.stopped.wait(1.0)  # longer than the read timeout
        peer.send(answer())
        return True

    server = serve(handle)
    transport = client(server.url, read_timeout=0.3)
    with pytest.raises(TransportError, match="ReadTimeout"):
        post(transport)
    assert post(transport) == 202
    assert server.connections == 2  # the timed-out connection was dropped
    transport.close()


def test_closed_without_an_answer_is_a_protocol_error_then_recovers(serve) -> None:
    server = serve(replying(lambda n, req: None if n == 1 else answer()))
    transport = client(server.url)
    with pytest.raises(TransportError, match="RemoteProtocolError"):
        post(transport)
    assert post(transport) == 202
    transport.close()


def test_garbled_answer_is_a_protocol_error(serve) -> None:
    server = serve(replying(lambda n, req: b"NOT HTTP AT ALL\r\n\r\n" if n == 1 else answer()))
    transport = client(server.url)
    with pytest.raises(TransportError, match="RemoteProtocolError"):
        post(transport)
    assert post(transport) == 202
    transport.close()


def test_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        transport = client(f"http://127.0.0.1:{port}")
        with pytest.raises(TransportError, match="ConnectError"):
            post(transport)
        transport.close()


def test_chunked_answer_with_headers_is_read_whole(serve) -> None:
    chunked = (b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n"
               b"\r\n5\r\nslow \r\n5\r\ndown!\r\n0\r\n\r\n")
    server = serve(replying(lambda n, req: chunked))
    transport = client(server.url)
    response = transport.send(Request(BATCH_PATH, BODY, "i", 1))
    assert (response.status, response.text, response.headers["retry-after"]) == (
        429, "slow down!", "7")
    assert post(transport) == 429  # the connection stayed usable after a chunked body
    assert server.connections == 1
    transport.close()


def test_concurrent_senders_share_a_pool_of_at_most_max_connections(serve) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        peer.stopped.wait(0.01)
        peer.send(answer())
        return True

    server = serve(handle)
    transport = client(server.url, max_connections=4)
    results: list[int] = []

    def work() -> None:
        results.extend(post(transport) for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [202] * 80
    assert 1 <= server.connections <= 4
    transport.close()


def test_credentials_in_the_base_url_are_sent_as_basic_auth_and_never_shown(serve) -> None:
    server = serve(replying(lambda n, req: answer()))
    transport = client(f"http://user:pa55word@127.0.0.1:{server.port}")
    assert post(transport) == 202
    assert b"authorization: basic dxnlcjpwytu1d29yza==" in server.requests[0].lower()
    assert "pa55word" not in repr(transport) and "pa55word" not in str(vars(transport))
    transport.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # refused
        transport = client(f"http://user:pa55word@127.0.0.1:{port}")
        with pytest.raises(TransportError) as info:
            post(transport)
        transport.close()
    assert "pa55word" not in str(info.value) and "user" not in str(info.value)
    assert f"http://127.0.0.1:{port}" in str(info.value)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_verifies_the_certificate(serve, tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = serve(replying(lambda n, req: answer()), tls=tls)
    url = f"https://localhost:{server.port}"
    untrusting = client(url)  # the default context does not know this certificate
    with pytest.raises(TransportError, match="certificate is not trusted"):
        post(untrusting)
    untrusting.close()
    trusting = client(url, ssl_context=ssl.create_default_context(cafile=str(cert)))
    assert [post(trusting) for _ in range(3)] == [202] * 3
    assert server.connections == 1  # the refused handshake is not counted; one kept alive
    trusting.close()


# --- when the request was out (issue 13: where a rate-limit slot is stamped) -------------

def test_the_answer_says_when_the_request_was_out_not_when_it_came(serve) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        peer.stopped.wait(0.4)  # MS4's work
        peer.send(answer())
        return True

    server = serve(handle)
    transport = client(server.url)
    before = time.monotonic()
    response = transport.send(Request(BATCH_PATH, BODY, "idem-1", 1))
    after = time.monotonic()
    assert response.status == 202
    assert response.sent is not None
    assert before <= response.sent < before + 0.2  # out at once, answered 0.4 s later
    assert after - response.sent >= 0.35
    transport.close()


def test_a_timeout_after_the_request_was_out_says_when_and_a_refusal_says_none(serve) -> None:
    server = serve(lambda peer, n, request: peer.stopped.wait(5.0) and False)
    transport = client(server.url, read_timeout=0.3)
    before = time.monotonic()
    with pytest.raises(TransportError) as timed_out:
        post(transport)
    assert timed_out.value.sent is not None and before <= timed_out.value.sent < before + 0.2
    transport.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = client(f"http://127.0.0.1:{sock.getsockname()[1]}")
        with pytest.raises(TransportError) as never_out:
            post(refused)
        assert never_out.value.sent is None  # never reached MS4: nothing it could count
        refused.close()


def test_traceparent_is_the_batch_as_trace_and_the_attempt_as_span() -> None:
    """Issue 24's fourth point: W3C Trace Context derived from the batch id."""
    from ms1.pipeline.transport import Request, traceparent

    batch_id = "0123456789abcdef0123456789abcdef"
    first = Request("/batch-metadata", b"[]", batch_id, 0).traceparent
    again = Request("/batch-metadata", b"[]", batch_id, 0, attempt=1).traceparent
    second = Request("/batch-metadata", b"[]", batch_id, 0, attempt=2).traceparent
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first)
    assert first == again and first.split("-")[1] == batch_id
    assert second.split("-")[1] == batch_id and second.split("-")[2] != first.split("-")[2]
    other = traceparent("not-hex, a third-party key")  # hashed into a valid trace id
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", other)
    assert traceparent("0" * 32).split("-")[1] != "0" * 32  # all zeros is invalid
