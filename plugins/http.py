"""Built-in plugin ``http``: the MS4 transport over HTTP with one shared ``httpx.Client``.

``POST {base_url}/batch-metadata`` (a JSON array) or ``{base_url}/metadata`` (one
object, the unit policy), with ``X-API-Key``, ``Content-Type: application/json``
and ``Idempotency-Key`` (the batch id: the same on every retry and redelivery).
Under the client, :class:`~ms1_plugins.http_wire.LeanHTTPTransport` keeps one
HTTP/1.1 connection alive per sender thread; connect, read and write timeouts are
explicit. No answer at all (refused, timed out, dropped) becomes
:class:`~ms1.errors.TransportError`; every answer, whatever its status, is returned
for the sender to judge. Nothing below the sender retries, so a request is sent
exactly as often as the sender decides.
"""

from __future__ import annotations

import http.cookiejar
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from ms1.config import Config, Option, Secret
from ms1.errors import TransportError
from ms1.hookspecs import hookimpl
from ms1.transport import Request, Response, Transport

from .http_wire import LeanHTTPTransport

NAME = "http"
SECTION = "transport.http"


class _NoCookies(http.cookiejar.CookieJar):
    """MS4 authenticates by ``X-API-Key`` only: no cookie is ever stored or sent (and
    the cookie jar's look at every answer was ~7 % of a request's instructions)."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


class HttpTransport(Transport):
    """MS4 over HTTP. Thread-safe: httpx's Client is, and the key is swapped atomically."""

    name = NAME

    def __init__(
        self, base_url: str, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
        write_timeout: float = 30.0, pool_timeout: float = 10.0, max_connections: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._urls: dict[str, httpx.URL] = {}
        self._api_key: Secret | None = None
        self._lock = threading.Lock()
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                write=write_timeout, pool=pool_timeout)
        self._extensions = {"timeout": timeout.as_dict()}
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport or LeanHTTPTransport(),
            follow_redirects=False,
            cookies=_NoCookies(),
        )

    def set_api_key(self, api_key: Secret | None) -> None:
        with self._lock:
            self._api_key = api_key

    def send(self, request: Request) -> Response:
        with self._lock:
            key = self._api_key
        headers = {"Content-Type": "application/json",
                   "Idempotency-Key": request.idempotency_key}
        if key is not None:
            headers["X-API-Key"] = key.reveal()
        url = self._urls.get(request.path)
        if url is None:
            url = self._urls.setdefault(request.path, httpx.URL(self.base_url + request.path))
        try:
            # a Request built here and sent through the shared Client: the same pool and
            # timeouts as Client.post, without merging a base URL and headers per call
            answer = self._client.send(httpx.Request("POST", url, content=request.body,
                                                     headers=headers,
                                                     extensions=self._extensions))
        except httpx.TimeoutException as exc:
            raise TransportError(f"{type(exc).__name__}: no answer from MS4 at "
                                 f"{self.base_url} in time") from None
        except httpx.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc} ({self.base_url})") from None
        return Response(answer.status_code,
                        {k.lower(): v for k, v in answer.headers.items()}, answer.text)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"HttpTransport(base_url={self.base_url!r})"


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option(SECTION, "base_url", "str", "http://127.0.0.1:8404",
               "MS4's base URL; ms1 POSTs to {base_url}/batch-metadata (and /metadata)"),
        Option(SECTION, "connect_timeout", "float", 5.0, "seconds to open a connection",
               min=0.01, max=600),
        Option(SECTION, "read_timeout", "float", 30.0, "seconds to wait for MS4's answer",
               min=0.01, max=3600),
        Option(SECTION, "write_timeout", "float", 30.0, "seconds to send a request body",
               min=0.01, max=3600),
        Option(SECTION, "pool_timeout", "float", 10.0,
               "seconds to wait for a free pooled connection (only on an HTTP proxy taken "
               "from the environment; ms1's own wire keeps one per sender thread)",
               min=0.01, max=3600),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("transport", NAME)]


@hookimpl
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    if name != NAME:
        return None
    base_url = config.get_str(SECTION, "base_url")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise config.error(SECTION, "base_url", f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise config.error(SECTION, "base_url",
                           f"must be an http:// or https:// URL with a host, got {base_url!r}")
    if config.api_key is None:
        raise config.error("ms4", "api_key_env",
                           f"the http transport needs an API key: set "
                           f"${config.get_str('ms4', 'api_key_env')} or [ms4] api_key_file")
    return HttpTransport(
        base_url,
        connect_timeout=config.get_float(SECTION, "connect_timeout"),
        read_timeout=config.get_float(SECTION, "read_timeout"),
        write_timeout=config.get_float(SECTION, "write_timeout"),
        pool_timeout=config.get_float(SECTION, "pool_timeout"),
        max_connections=config.get_int("send", "threads"),
    )
