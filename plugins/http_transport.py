"""Built-in plugin ``http``: the MS4 transport over HTTP with one shared ``httpx.Client``.

``POST {base_url}/batch-metadata`` (a JSON array) or ``{base_url}/metadata`` (one
object, the unit policy), with ``X-API-Key``, ``Content-Type: application/json``
and ``Idempotency-Key`` (the batch id: the same on every retry and redelivery).

More: docs/internals.md, ``ms1_plugins.http_transport``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from ms1.config import Config, Option, Secret
from ms1.errors import TransportError
from ms1.hookspecs import hookimpl
from ms1.pipeline.transport import Request, Response, Transport
from ms1.redaction import redact

NAME = "http"
SECTION = "transport.http"

log = logging.getLogger(__name__)

#: httpx's default: an idle pooled connection is closed after this many seconds
KEEPALIVE_EXPIRY = 5.0
#: the option whose timeout an httpx timeout exception stands for
_TIMEOUT_OPTIONS = {"ConnectTimeout": "connect_timeout", "ReadTimeout": "read_timeout",
                    "WriteTimeout": "write_timeout", "PoolTimeout": "pool_timeout"}


class _Deadline(threading.local):
    """The running request's deadline (``time.monotonic()``), per sender thread."""

    at: float | None = None
    clamped: bool = False  # the last socket operation was cut short by the deadline
    sent: float | None = None  # when the request's last byte was handed to the socket


class _DeadlineNetwork(httpcore.NetworkBackend):
    """httpcore's synchronous network backend with a per-thread deadline on every socket
    operation, and a registry of live streams so that :meth:`shutdown` can wake any
    thread blocked on one.

    Each connect, TLS handshake, read and write gets the smaller of its own timeout
    (httpx's per-phase timeouts) and the time left before the thread's deadline; past the
    deadline it raises ``httpcore.ConnectTimeout``/``ReadTimeout``/``WriteTimeout`` at
    once, which httpx turns into its own timeout exceptions.
    """

    def __init__(self, deadline: _Deadline) -> None:
        self._backend = httpcore.SyncBackend()
        self._deadline = deadline
        self._streams: weakref.WeakSet[_DeadlineStream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def clamp(self, timeout: float | None, error: type[Exception]) -> float | None:
        """``timeout`` cut to the time left before this thread's deadline."""
        at = self._deadline.at
        if at is None:
            self._deadline.clamped = False
            return timeout
        left = at - time.monotonic()
        if left <= 0:
            self._deadline.clamped = True
            raise error("request_timeout passed")
        self._deadline.clamped = timeout is None or left < timeout
        return left if self._deadline.clamped else timeout

    def track(self, stream: httpcore.NetworkStream) -> _DeadlineStream:
        wrapped = _DeadlineStream(stream, self)
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams.add(wrapped)
        if closed:
            stream.close()
            raise httpcore.ConnectError("the transport is closed")
        return wrapped

    def forget(self, stream: _DeadlineStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def live_streams(self) -> list[_DeadlineStream]:
        with self._lock:
            return list(self._streams)

    def shutdown(self) -> None:
        """Refuse new connections; shut down every live socket (a blocked read returns)."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):  # socket's own, also for an SSLSocket
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self.clamp(timeout, httpcore.ConnectTimeout)
        return self.track(self._backend.connect_tcp(host, port, timeout, local_address,
                                                    socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self.clamp(timeout, httpcore.ConnectTimeout)
        return self.track(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    """One connection's stream under :class:`_DeadlineNetwork`'s deadline."""

    def __init__(self, stream: httpcore.NetworkStream, network: _DeadlineNetwork) -> None:
        self._stream = stream
        self._network = network

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # one recv per call (httpcore's SyncStream): the clamped timeout bounds it
        return self._stream.read(max_bytes, self._network.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        timeout = self._network.clamp(timeout, httpcore.WriteTimeout)
        sock = self._stream.get_extra_info("socket")
        if not buffer or not isinstance(sock, socket.socket):
            self._stream.write(buffer, timeout)
            return
        # httpcore's SyncStream.write gives every send() the whole timeout again; sendall
        # under one settimeout is bounded as a whole (a plain socket's since Python 3.5;
        # an SSLSocket writes the buffer in one SSL_write, bounded by the timeout)
        try:
            sock.settimeout(timeout)
            sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def close(self) -> None:
        self._network.forget(self)
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        timeout = self._network.clamp(timeout, httpcore.ConnectTimeout)
        self._network.forget(self)  # the plain socket is detached into the TLS one
        return self._network.track(self._stream.start_tls(ssl_context, server_hostname,
                                                          timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineHTTPTransport(httpx.HTTPTransport):
    """httpx's ``HTTPTransport`` whose connection pool runs on :class:`_DeadlineNetwork`.

    httpx has no total timeout for a request (encode/httpx#1450: "the implementation for
    this would be in httpcore"), and ``HTTPTransport`` takes no network backend. So the
    pool it builds is replaced by the same ``httpcore.ConnectionPool`` with one more
    argument, ``network_backend``. ``_pool`` is the one private name used: setup.cfg pins
    httpx below 1, the check below fails loudly if an upgrade drops it, and
    tests/test_http_deadline.py pins the behaviour.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx.Limits,
                 network: _DeadlineNetwork) -> None:
        super().__init__(verify=ssl_context, trust_env=False, limits=limits, retries=0)
        if not isinstance(vars(self).get("_pool"), httpcore.ConnectionPool):
            raise RuntimeError(f"httpx {httpx.__version__}: HTTPTransport keeps no "
                               f"ConnectionPool in _pool; ms1's request_timeout needs it")
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True, http2=False, retries=0,
            network_backend=network,
        )


def _loopback(host: str) -> bool:
    """``localhost``, or an address in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _strip_userinfo(url: str) -> str:
    """``url`` without its userinfo (``user:password@``): the URL requests go to (the
    credentials become the client's Basic auth). Shown only through ``redact()``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class HttpTransport(Transport):
    """MS4 over HTTP. Thread-safe: httpx's Client is, and the key is swapped atomically."""

    name = NAME

    def __init__(
        self, base_url: str, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
        write_timeout: float = 30.0, pool_timeout: float = 10.0,
        request_timeout: float = 60.0, max_answer_bytes: int = 65536,
        max_connections: int | None = None, ssl_context: ssl.SSLContext | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """``tls``: the certificate files ``ssl_context`` was made from (or, without a
        context, is made from), to name them when a handshake fails for their sake."""
        # credentials in the URL (user:password@) go into the client's Basic auth, as
        # httpx would take them from each request's URL; the URL itself is kept without
        self.base_url = _strip_userinfo(base_url.rstrip("/"))
        self.tls = tls if tls is not None else TlsFiles()
        if ssl_context is None and self.base_url.startswith("https:"):
            ssl_context = self.tls.context()
        given = httpx.URL(base_url)
        auth = httpx.BasicAuth(given.username, given.password) \
            if given.username or given.password else None
        self.request_timeout = request_timeout
        self.longest_call = request_timeout
        self.max_answer_bytes = max_answer_bytes
        # the pool wait is no socket operation: request_timeout bounds it here
        pool_timeout = min(pool_timeout, request_timeout)
        self._timeouts = {"connect_timeout": connect_timeout, "read_timeout": read_timeout,
                          "write_timeout": write_timeout, "pool_timeout": pool_timeout,
                          "request_timeout": request_timeout}
        self._urls: dict[str, httpx.URL] = {}
        self._api_key: Secret | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._deadline = _Deadline()
        self._network = _DeadlineNetwork(self._deadline)
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                write=write_timeout, pool=pool_timeout)
        # httpcore's trace (a public httpx request extension) tells when the request is out
        self._extensions = {"timeout": timeout.as_dict(), "trace": self._trace}
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections,
                              keepalive_expiry=KEEPALIVE_EXPIRY)
        self._client = httpx.Client(
            timeout=timeout,
            limits=limits,
            transport=_DeadlineHTTPTransport(
                ssl_context=ssl_context or httpx.create_ssl_context(), limits=limits,
                network=self._network),
            auth=auth,
            follow_redirects=False,
            trust_env=False,
        )

    def set_api_key(self, api_key: Secret | None) -> None:
        with self._lock:
            self._api_key = api_key

    def send(self, request: Request) -> Response:
        with self._lock:
            key = self._api_key
        if self._closed:
            raise TransportError(f"the transport to MS4 at {self.base_url} is closed")
        headers = {"Content-Type": "application/json",
                   "Idempotency-Key": request.idempotency_key,
                   "traceparent": request.traceparent}
        if key is not None:
            headers["X-API-Key"] = key.reveal()
        url = self._urls.get(request.path)
        if url is None:
            url = self._urls.setdefault(request.path, httpx.URL(self.base_url + request.path))
        self._deadline.at = time.monotonic() + self.request_timeout
        self._deadline.clamped = False
        self._deadline.sent = None
        try:
            # a Request built here and sent through the shared Client: its pool, timeouts
            # and auth, without merging a base URL and headers per call
            answer = self._client.send(
                httpx.Request("POST", url, content=request.body, headers=headers,
                              extensions=self._extensions), stream=True)
            try:
                return self._read(answer, request)
            finally:
                answer.close()
        except httpx.TimeoutException as exc:
            self._timed_out(exc)
        except httpx.HTTPError as exc:
            refused = self.tls.refusal(exc)
            if refused is not None:
                raise TransportError(refused, sent=self._deadline.sent,
                                     misconfigured=True) from None
            raise TransportError(f"{type(exc).__name__}: {exc} ({self.base_url})",
                                 sent=self._deadline.sent) from None
        except RuntimeError as exc:  # httpx: "the client has been closed"
            if not self._closed:
                raise
            raise TransportError(f"the transport to MS4 at {self.base_url} is closed: "
                                 f"{exc}", sent=self._deadline.sent) from None
        finally:
            self._deadline.at = None

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace callback: note when the request's body has been written."""
        if event == "http11.send_request_body.complete":
            self._deadline.sent = time.monotonic()

    def _read(self, answer: httpx.Response, request: Request) -> Response:
        """The status, headers and at most ``max_answer_bytes`` of the body."""
        body = bytearray()
        if answer.status_code >= 200:  # no body to a 1xx (after a 101: another protocol)
            for chunk in answer.iter_bytes():
                room = self.max_answer_bytes - len(body)
                if len(chunk) > room:
                    body += chunk[:room]
                    log.warning("MS4's %d answer for batch %s is longer than [%s] "
                                "max_answer_bytes: its first %d bytes are kept",
                                answer.status_code, request.idempotency_key, SECTION,
                                len(body))
                    break  # the rest is not read: closing the answer drops the connection
                body += chunk
        text = body.decode(answer.encoding or "utf-8", errors="replace")
        return Response(answer.status_code,
                        {k.lower(): v for k, v in answer.headers.items()}, text,
                        sent=self._deadline.sent)

    def _timed_out(self, exc: httpx.TimeoutException) -> NoReturn:
        kind = type(exc).__name__
        option = "request_timeout" if self._deadline.clamped else _TIMEOUT_OPTIONS.get(kind)
        limit = (f"{option} {self._timeouts[option]:g} s" if option is not None
                 else "the timeouts")
        raise TransportError(f"{kind}: no answer from MS4 at {self.base_url} within "
                             f"{limit}", sent=self._deadline.sent) from None

    def close(self) -> None:
        """Never blocks: shuts every socket down (a sender in a read gets TransportError),
        then closes the client."""
        self._closed = True
        self._network.shutdown()
        self._client.close()

    def __repr__(self) -> str:
        return redact(f"HttpTransport(base_url={self.base_url!r})")


class TlsFiles:
    """``[transport.http]``'s TLS settings: the CA file MS4's certificate must chain to
    (empty: the system's and certifi's), this client's certificate and key (when MS4, or
    its TLS terminator, asks for one), and whether to verify at all."""

    def __init__(self, ca_file: str = "", client_cert_file: str = "",
                 client_key_file: str = "", verify: bool = True) -> None:
        self.ca_file = ca_file
        self.client_cert_file = client_cert_file
        self.client_key_file = client_key_file
        self.verify = verify

    def context(self) -> ssl.SSLContext:
        """The SSL context; ValueError naming the option and file that cannot be loaded."""
        if not self.verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise _unloadable("ca_file", self.ca_file, exc) from None
        else:
            context = httpx.create_ssl_context()
        if self.client_cert_file:
            try:
                context.load_cert_chain(self.client_cert_file, self.client_key_file or None)
            except (OSError, ssl.SSLError) as exc:
                option = "client_key_file" if self.client_key_file and isinstance(
                    exc, ssl.SSLError) and "KEY" in str(exc).upper() else "client_cert_file"
                path = self.client_key_file if option == "client_key_file" \
                    else self.client_cert_file
                raise _unloadable(option, path, exc) from None
        return context

    def refusal(self, exc: BaseException) -> str | None:
        """If ``exc`` is a TLS handshake that failed for a certificate's sake, why, naming
        the option and file to fix; None for anything else (an outage: retried)."""
        seen: BaseException | None = exc
        visited: set[int] = set()  # a chain may loop (an exception re-raised in its handler)
        while seen is not None and not isinstance(seen, ssl.SSLError) \
                and id(seen) not in visited:
            visited.add(id(seen))
            seen = seen.__cause__ or seen.__context__
        if not isinstance(seen, ssl.SSLError):
            return None
        if isinstance(seen, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            trusted = (f"[{SECTION}] ca_file {self.ca_file}" if self.ca_file
                       else f"the system's CAs ([{SECTION}] ca_file is unset)")
            return (f"TLS: MS4's certificate is not trusted by {trusted}: "
                    f"{seen.verify_message or seen.reason} (configuration error)")
        reason = str(seen.reason or seen)
        if "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper():
            mine = (f"[{SECTION}] client_cert_file {self.client_cert_file}"
                    if self.client_cert_file else
                    f"no client certificate ([{SECTION}] client_cert_file is unset)")
            return (f"TLS: MS4 refused this client's certificate ({reason}): {mine} "
                    "(configuration error)")
        return f"TLS handshake with MS4 failed: {reason} (configuration error)"


def _unloadable(option: str, path: str, exc: BaseException) -> ValueError:
    return ValueError(f"{option}: cannot load {path!r}: {exc}")


def check_base_url(url: str) -> None:
    """What httpx refuses in ``[transport.http] base_url`` beyond the ``url`` kind's checks
    (which give a scheme, http or https, and a valid port): raise ValueError."""
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid URL ({exc}): {url!r}") from None
    if not host:
        raise ValueError(f"the URL has no host: {url!r}")


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option(SECTION, "base_url", "url", "http://127.0.0.1:8404",
               "MS4's base URL (http:// or https://, with a host); ms1 POSTs to "
               "{base_url}/batch-metadata (and /metadata); user:password@ in it becomes Basic "
               "auth and is redacted in every output", schemes=("http", "https"),
               check=check_base_url),
        Option(SECTION, "connect_timeout", "float", 5.0,
               "seconds to open a connection (TLS handshake included)", min=0.01, max=600),
        Option(SECTION, "read_timeout", "float", 30.0,
               "seconds each read of MS4's answer may wait for data (the whole answer is "
               "bounded by request_timeout)", min=0.01, max=3600),
        Option(SECTION, "write_timeout", "float", 30.0,
               "seconds a write of the request may wait for the socket (the whole request "
               "is bounded by request_timeout)", min=0.01, max=3600),
        Option(SECTION, "pool_timeout", "float", 10.0,
               "seconds to wait for a free pooled connection; the pool grows with the "
               "requests in flight, so a sender waits only while one is being opened",
               min=0.01, max=3600),
        Option(SECTION, "request_timeout", "float", 60.0,
               "overall deadline in seconds for one request: pool wait, connect, sending "
               "and MS4's whole answer; past it the attempt fails and is retried",
               min=0.1, max=3600),
        Option(SECTION, "ca_file", "str", "",
               "PEM file of the CA(s) MS4's certificate must chain to (a private CA); empty: "
               "the system's and certifi's"),
        Option(SECTION, "client_cert_file", "str", "",
               "PEM file of this client's certificate (and key, unless client_key_file), "
               "for an MS4 or TLS terminator that asks for one"),
        Option(SECTION, "client_key_file", "str", "",
               "PEM file of the client certificate's private key (unencrypted), when it is "
               "not in client_cert_file"),
        Option(SECTION, "verify", "bool", True,
               "verify MS4's certificate and host name; no: anyone on the path can read "
               "the API key (a WARNING at start)"),
        Option(SECTION, "max_answer_bytes", "int", 65536,
               "most bytes of an answer's body kept in memory; the status always counts, "
               "a longer body is cut (and its connection dropped)",
               min=1024, max=64 * 1024 * 1024),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("transport", NAME)]


@hookimpl
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    if name != NAME:
        return None
    base_url = config.get_str(SECTION, "base_url")
    try:  # validated at load; again here for a config changed since (with_values)
        config.options[(SECTION, "base_url")].parse(base_url)
    except ValueError as exc:
        raise config.error(SECTION, "base_url", str(exc)) from None
    if config.api_key is None:
        raise config.error("ms4", "api_key_env",
                           f"the http transport needs an API key: set "
                           f"${config.get_str('ms4', 'api_key_env')} or [ms4] api_key_file")
    tls = TlsFiles(ca_file=config.get_str(SECTION, "ca_file"),
                   client_cert_file=config.get_str(SECTION, "client_cert_file"),
                   client_key_file=config.get_str(SECTION, "client_key_file"),
                   verify=config.get_bool(SECTION, "verify"))
    context = None
    if base_url.startswith("https:"):
        try:
            context = tls.context()
        except ValueError as exc:
            option, _, text = str(exc).partition(": ")
            raise config.error(SECTION, option, text) from None
        if not tls.verify:
            log.warning("[%s] verify = no: MS4's certificate is not checked, so anyone on the "
                        "path can pose as MS4 and read the API key", SECTION)
    else:
        host = httpx.URL(base_url).host
        if not _loopback(host):
            log.warning("[%s] base_url is plain http to %s: the API key and the invoices "
                        "cross the network unencrypted; use https://", SECTION, host)
        unused = [key for key in ("ca_file", "client_cert_file", "client_key_file")
                  if config.get_str(SECTION, key)]
        if unused:
            raise config.error(SECTION, unused[0], "is set, but base_url is plain http: "
                               "use an https:// URL (or leave it empty)")
    return HttpTransport(
        base_url, ssl_context=context, tls=tls,
        connect_timeout=config.get_float(SECTION, "connect_timeout"),
        read_timeout=config.get_float(SECTION, "read_timeout"),
        write_timeout=config.get_float(SECTION, "write_timeout"),
        pool_timeout=config.get_float(SECTION, "pool_timeout"),
        request_timeout=config.get_float(SECTION, "request_timeout"),
        max_answer_bytes=config.get_int(SECTION, "max_answer_bytes"),
    )
