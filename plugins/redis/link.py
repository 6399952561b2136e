"""The connection to Redis: one redis-py client per config and URL, and what goes with it.

:class:`RedisLink` holds the client, its connection pool, the Lua scripts (``scripts/*.lua``,
registered with redis-py, which loads one again when Redis lost its script cache) and
the heartbeat thread. :func:`link_for` builds or shares the link of a config,
:func:`translated` turns redis-py's errors into ms1's, :func:`redact_url` hides the
password (ms1's one redaction), :func:`check_url` is the ``[redis] url`` option's check.

Connections: a :class:`redis.BlockingConnectionPool`; every command checks a connection
out for that command only (no connection is kept by a thread), so a pool smaller than the
thread count is no error: a caller finding it busy waits for a free connection (at most
``connect_timeout + socket_timeout``), as in a burst every command is short. The longest
holds are the blocking reads (one XREADGROUP BLOCK at a time for the source, one for the
queue, each at most ``block_timeout``). The pool is sized ``max(16, [send] threads + 8)``
when the link is built; raising ``[send] threads`` on reload needs no new connections,
only shares the same ones. Explicit connect and socket timeouts; TCP keepalive on TCP
URLs (redis-py refuses the option on a ``unix://`` socket); redis-py's own retries are off
(a retried XADD whose reply was lost would be a duplicate): ms1's loops retry, and when
Redis is unreachable they log once, wait, and carry on when it is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ms1.config import Config, Secret
from ms1.errors import Ms1Error
from ms1.redaction import redact
from ms1.sending.concurrency import sender_threads

log = logging.getLogger(__name__)
SECTION = "redis"
#: the Lua scripts, ``scripts/<name>.lua``
SCRIPTS = ("enqueue", "finish", "limiter_acquire", "limiter_finish")
#: a stream entry's fields as ms1 writes them
Fields = dict[str, bytes | str]


def redact_url(url: str) -> str:
    """The URL as it may be shown: ``user:***@``, ``?password=***``
    (:func:`ms1.redaction.redact`)."""
    return redact(url)


def check_url(url: str) -> None:
    """What redis-py refuses in ``[redis] url`` (its own parser: scheme, port, ``db``,
    query arguments): raise ValueError. Run at load, so ``check`` refuses it too."""
    redis.connection.parse_url(url)  # type: ignore[no-untyped-call]  # redis-py: untyped


def pool_size(threads: int) -> int:
    """Most connections of a process started with ``threads`` senders: enough for every
    thread to run a command at the same moment (the senders, the reader, the committer,
    the queue's fetcher, the heartbeat, status and metrics), at least 16. Senders added
    by a reload share them: a connection is held for one command, a caller finding them
    all busy waits for one."""
    return max(16, threads + 8)


def _script_text(name: str) -> str:
    package = resources.files(__name__.rpartition(".")[0])
    return package.joinpath("scripts", f"{name}.lua").read_text()


class RedisLink:
    """One redis-py client with ms1's settings, shared by the components of one config."""

    def __init__(self, url: str, *, password: Secret | None = None,
                 socket_timeout: float = 10.0, connect_timeout: float = 3.0,
                 max_connections: int = 16) -> None:
        self.url = redact_url(url)
        kwargs: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": connect_timeout + socket_timeout,  # wait for a free pooled connection
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "health_check_interval": 30,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "ms1",
        }
        if password is not None:
            kwargs["password"] = password.reveal()
        try:
            if urlsplit(url).scheme in ("redis", "rediss"):
                kwargs["socket_keepalive"] = True
            pool = redis.BlockingConnectionPool.from_url(url, **kwargs)
        except ValueError as exc:
            raise Ms1Error(f"invalid Redis URL {self.url!r}: {exc}") from None
        # typed Any: redis-py annotates replies as RESP2/RESP3 unions that never narrow
        self.client: Any = redis.Redis(connection_pool=pool)
        self._scripts: dict[str, Script] = {
            name: self.client.register_script(_script_text(name)) for name in SCRIPTS}
        self._users = 0
        self.closed = False
        self._lock = threading.Lock()
        self._refreshers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._interval = 20.0
        #: time.monotonic() of the last failed Redis call (0: none yet)
        self.failed_at = 0.0

    def script(self, name: str, keys: Sequence[str],
               args: Sequence[bytes | str | int | float]) -> Any:
        """Run ``scripts/<name>.lua`` (EVALSHA; redis-py loads it again after NOSCRIPT)."""
        return self._scripts[name](keys=keys, args=args)

    def use(self) -> RedisLink:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0
            self.closed = last
        if last:
            self._stop.set()
            self.client.close()
            self.client.connection_pool.disconnect()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    # --- heartbeat ---------------------------------------------------------------------

    def on_heartbeat(self, refresher: Callable[[], None], interval: float) -> None:
        """Call ``refresher`` every ``interval`` s (keeps held entries from looking idle)."""
        with self._lock:
            self._refreshers.append(refresher)
            self._interval = min(self._interval, interval)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="redis-heartbeat",
                                                   daemon=True)
                self._heartbeat.start()

    def _beat(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait):
            wait = self._interval
            for refresher in list(self._refreshers):
                try:
                    refresher()
                except Ms1Error as exc:
                    log.debug("heartbeat: %s", exc)
                    wait = 1.0  # Redis is failing: refresh again as soon as it is back

    def recently_failed(self) -> bool:
        """True within one heartbeat period (+2 s) of a failed call: while Redis was away
        no instance could refresh what it holds, so nobody's idle entries mean anything
        until every live instance has had a heartbeat to refresh them."""
        return self.failed_at > 0 and time.monotonic() - self.failed_at < self._interval + 2


@contextlib.contextmanager
def translated(error: type[Ms1Error], what: str, link: RedisLink) -> Iterator[None]:
    """Turn redis-py's exceptions into ms1's, naming the operation and the (redacted) URL."""
    try:
        yield
    except redis.RedisError as exc:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            link.failed_at = time.monotonic()
        raise error(f"{what}: {type(exc).__name__}: {exc} (Redis at {link.url})") from exc


# --- one link per config and URL -------------------------------------------------------

_links: weakref.WeakKeyDictionary[Config, dict[str, RedisLink]] = weakref.WeakKeyDictionary()


def link_for(config: Config) -> RedisLink:
    """The shared client of this config (created on first use, never at import); each
    component takes its own use of it (:meth:`RedisLink.use`) and releases it on close."""
    url = config.get_str(SECTION, "url")
    by_url = _links.setdefault(config, {})
    link = by_url.get(url)
    if link is None or link.closed:
        password = None
        env = config.get_str(SECTION, "password_env")
        if env:
            value = os.environ.get(env, "")
            if not value:
                raise config.error(SECTION, "password_env", f"${env} is not set or empty")
            password = Secret(value, f"${env}")
        if config.get_float(SECTION, "block_timeout") >= config.get_float(SECTION,
                                                                           "socket_timeout"):
            raise config.error(SECTION, "block_timeout", "must be shorter than socket_timeout "
                               "(a blocked read would otherwise time out as an error)")
        try:
            link = RedisLink(url, password=password,
                             socket_timeout=config.get_float(SECTION, "socket_timeout"),
                             connect_timeout=config.get_float(SECTION, "connect_timeout"),
                             max_connections=pool_size(sender_threads(config)))
        except Ms1Error as exc:
            raise config.error(SECTION, "url", str(exc)) from None
        by_url[url] = link
    return link.use()
