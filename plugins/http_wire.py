"""The wire under the ``http`` transport's ``httpx.Client``: HTTP/1.1 on ``http.client``.

httpx lets a client swap what moves the bytes (``httpx.Client(transport=...)``, the
same extension point as ``httpx.MockTransport``). Its default, httpcore + h11, is
general — HTTP/2, proxies, connection pools shared by many threads — and costs about
1.1 M CPU instructions per MS4 request here; this one does what ms1 needs (one
kept-alive HTTP/1.1 connection per sender thread, explicit timeouts) on the standard
library's ``http.client`` in about a third of that (``ms1-bench``, callgrind).
Everything above it — ``httpx.Request``/``Response``, the client's timeouts, its
exceptions — is httpx's own.

Behaviour, as httpcore's:

* a kept-alive connection the server has closed meanwhile (it is readable while
  idle: EOF) is replaced before the request, not failed on;
* no answer becomes an ``httpx`` exception — ``ConnectError``/``ConnectTimeout``
  (nothing was sent), ``WriteTimeout``, ``ReadTimeout``, ``RemoteProtocolError``
  (closed or garbled answer) — and the connection is dropped;
* ``Connection: close`` from the server closes the connection after the answer
  (http.client does);
* ``https://`` uses httpx's default SSL context (certificate verification on).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import weakref

import httpx

_Key = tuple[bytes, bytes, int]


class LeanHTTPTransport(httpx.BaseTransport):
    """One HTTP/1.1 connection per (thread, origin), kept alive between requests."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        connect_timeout = timeout.get("connect")
        url = request.url
        conn = self._connection(url, connect_timeout)
        where = f"{conn.host}:{conn.port}"
        try:
            if conn.sock is None or _dropped(conn.sock):
                conn.close()
                conn.timeout = connect_timeout
                conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(f"connecting to {where}: {exc}",
                                       request=request) from None
        except (OSError, ValueError) as exc:
            conn.close()
            raise httpx.ConnectError(f"connecting to {where}: {exc}",
                                     request=request) from None
        sock = conn.sock
        phase = "write"
        try:
            sock.settimeout(timeout.get("write"))
            conn.putrequest(request.method, url.raw_path.decode("ascii"), skip_host=True,
                            skip_accept_encoding=True)
            for name, value in request.headers.raw:
                conn.putheader(name, value)
            # headers and body in one send(), as http.client does for a bytes body
            conn.endheaders(request.read() or None)
            phase = "read"
            sock.settimeout(timeout.get("read"))
            answer = conn.getresponse()
            content = answer.read()
        except TimeoutError:
            conn.close()
            error = httpx.WriteTimeout if phase == "write" else httpx.ReadTimeout
            raise error(f"no {phase} progress within the {phase} timeout",
                        request=request) from None
        except Exception as exc:  # closed, reset, garbled: the connection is done for
            conn.close()
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}",
                                            request=request) from None
        # after an answer with "Connection: close", http.client closes the connection
        return httpx.Response(
            answer.status, headers=answer.getheaders(), content=content, request=request,
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": answer.reason.encode("ascii", "replace")})

    def _connection(self, url: httpx.URL, connect_timeout: float | None
                    ) -> http.client.HTTPConnection:
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        connections: dict[_Key, http.client.HTTPConnection] | None = getattr(
            self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        key = (url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https"
                                                           else 80))
        conn = connections.get(key)
        if conn is None:
            host = url.host
            if url.scheme == "https":
                if self._ssl_context is None:
                    self._ssl_context = httpx.create_ssl_context()
                conn = http.client.HTTPSConnection(host, key[2], timeout=connect_timeout,
                                                   context=self._ssl_context)
            elif url.scheme == "http":
                conn = http.client.HTTPConnection(host, key[2], timeout=connect_timeout)
            else:
                raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
            connections[key] = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections = list(self._open)
        for conn in connections:
            conn.close()


def _dropped(sock: socket.socket) -> bool:
    """True if an idle kept-alive socket is readable: the server closed it (or sent
    something unasked), so it cannot carry the next request."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
