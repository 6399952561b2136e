"""The wire under the http transport (``plugins/http_wire.py``) against real sockets:
keep-alive, a server that closes idle or after answering, no answer, refused, chunked
answers, one connection per thread, TLS with verification."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ms1.config import Secret
from ms1.errors import TransportError
from ms1.model import BATCH_PATH
from ms1.transport import Request
from ms1_plugins.http import HttpTransport
from ms1_plugins.http_wire import LeanHTTPTransport

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


Handler = Callable[[int, bytes], bytes | None]  # (request number, request) -> raw answer


class Server:
    """A scripted HTTP/1.1 server: ``handler`` gives the raw bytes to answer (None: close
    the connection without answering); counts connections and requests."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
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
                answer = self.handler(n, request)
                if answer is None:
                    break
                conn.sendall(answer)
                if b"connection: close" in answer.lower():
                    break
        except OSError:
            pass
        finally:
            conn.close()

    def drop_idle_connections(self) -> None:
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.drop_idle_connections()


def answer(status: int = 202, body: bytes = b"", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(handler, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def client(url: str, read_timeout: float = 5.0, **kwargs) -> HttpTransport:
    transport = HttpTransport(url, read_timeout=read_timeout, connect_timeout=2, **kwargs)
    transport.set_api_key(Secret("k-wire"))
    return transport


def post(transport: HttpTransport) -> int:
    return transport.send(Request(BATCH_PATH, BODY, "idem-1", 1)).status


def test_requests_reuse_one_kept_alive_connection_and_carry_the_body(serve) -> None:
    server = serve(lambda n, req: answer())
    transport = client(f"http://127.0.0.1:{server.port}")
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
    server = serve(lambda n, req: answer())
    transport = client(f"http://127.0.0.1:{server.port}")
    assert post(transport) == 202
    server.drop_idle_connections()
    time.sleep(0.1)
    assert post(transport) == 202  # no error: the dead connection was noticed first
    assert server.connections == 2
    transport.close()


def test_connection_close_from_the_server_is_honoured(serve) -> None:
    server = serve(lambda n, req: answer(extra="Connection: close\r\n"))
    transport = client(f"http://127.0.0.1:{server.port}")
    assert [post(transport) for _ in range(3)] == [202] * 3
    assert server.connections == 3
    transport.close()


def test_no_answer_in_time_is_a_read_timeout_and_the_next_request_works(serve) -> None:
    def handler(n: int, req: bytes) -> bytes | None:
        if n == 1:
            time.sleep(1.0)  # longer than the read timeout
        return answer()

    server = serve(handler)
    transport = client(f"http://127.0.0.1:{server.port}", read_timeout=0.3)
    with pytest.raises(TransportError, match="ReadTimeout"):
        post(transport)
    assert post(transport) == 202
    assert server.connections == 2  # the timed-out connection was dropped
    transport.close()


def test_closed_without_an_answer_is_a_protocol_error_then_recovers(serve) -> None:
    server = serve(lambda n, req: None if n == 1 else answer())
    transport = client(f"http://127.0.0.1:{server.port}")
    with pytest.raises(TransportError, match="RemoteProtocolError"):
        post(transport)
    assert post(transport) == 202
    transport.close()


def test_garbled_answer_is_a_protocol_error(serve) -> None:
    server = serve(lambda n, req: b"NOT HTTP AT ALL\r\n\r\n" if n == 1 else answer())
    transport = client(f"http://127.0.0.1:{server.port}")
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
    server = serve(lambda n, req: chunked)
    transport = client(f"http://127.0.0.1:{server.port}")
    response = transport.send(Request(BATCH_PATH, BODY, "i", 1))
    assert (response.status, response.text, response.headers["retry-after"]) == (
        429, "slow down!", "7")
    assert post(transport) == 429  # the connection stayed usable after a chunked body
    assert server.connections == 1
    transport.close()


def test_each_thread_keeps_its_own_connection(serve) -> None:
    server = serve(lambda n, req: (time.sleep(0.01), answer())[1])
    transport = client(f"http://127.0.0.1:{server.port}")
    results: list[int] = []

    def work() -> None:
        results.extend(post(transport) for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [202] * 40
    assert server.connections == 4
    transport.close()


def test_close_closes_every_connection_and_refuses_new_requests(serve) -> None:
    server = serve(lambda n, req: answer())
    wire = LeanHTTPTransport()
    with httpx.Client(transport=wire) as http:
        assert http.post(f"http://127.0.0.1:{server.port}/x", content=b"{}").status_code == 202
        assert server.connections == 1
    with pytest.raises(httpx.ConnectError):
        wire.handle_request(httpx.Request("POST", f"http://127.0.0.1:{server.port}/x"))


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
    server = serve(lambda n, req: answer(), tls=tls)
    url = f"https://localhost:{server.port}"
    untrusting = client(url)  # the default context does not know this certificate
    with pytest.raises(TransportError, match="ConnectError"):
        post(untrusting)
    untrusting.close()
    trusting = client(url, transport=LeanHTTPTransport(
        ssl_context=ssl.create_default_context(cafile=str(cert))))
    assert [post(trusting) for _ in range(3)] == [202] * 3
    assert server.connections == 1  # the refused handshake is not counted; one kept alive
    trusting.close()
