"""The one HTTP server of ms1 (``/metrics``, ``/healthz``, ``/readyz``; the console):
waitress, bounded so that no client costs the pipeline its file descriptors or threads.

waitress serves every connection from one ``poll`` loop on a few worker threads. On top
of its limits (``connection_limit``; ``channel_timeout`` for idle connections) a request
must arrive whole within ``request_timeout`` (a client trickling a byte a second is cut),
and the listening socket is polled only while one more descriptor leaves the reserve
free (:func:`may_accept`). More: docs/internals.md, ``ms1.ops.httpserver``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore  # type: ignore[import-untyped]  # waitress: no type hints
from waitress.adjustments import Adjustments  # type: ignore[import-untyped]
from waitress.channel import HTTPChannel  # type: ignore[import-untyped]
from waitress.server import TcpWSGIServer  # type: ignore[import-untyped]
from waitress.task import ThreadedTaskDispatcher  # type: ignore[import-untyped]

#: descriptors never taken, even for the one connection a health check needs
HARD_FLOOR = 4
#: seconds between two "not accepting" warnings
_WARNING_INTERVAL = 60.0
#: seconds an fd count is reused (the accept check runs on every loop turn)
_FD_CACHE = 0.2
_FD_DIR = "/proc/self/fd"


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


def may_accept(open_fds: int, limit: int, connections: int, pipeline_fds: int) -> bool:
    """Whether the server may take one more descriptor: with ``open_fds`` of ``limit``
    open, ``connections`` of them the server's, the rest of the process may still need up
    to ``pipeline_fds`` in all, and :func:`fd_reserve` stays free."""
    others = open_fds - connections
    still_needed = max(0, pipeline_fds - others)
    return open_fds + 1 + still_needed <= limit - fd_reserve(limit)


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


class _Channel(HTTPChannel):  # type: ignore[misc]  # untyped base
    """waitress' channel, noting when it opened and when the request now arriving began."""

    #: ``time.monotonic()`` of the first byte of the request being received (0: none)
    request_started = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = time.monotonic()

    @property
    def answering(self) -> bool:
        """A request of it is in (being answered, or its answer being written)."""
        return bool(self.requests) or bool(self.total_outbufs_len)

    def received(self, data: bytes) -> bool:
        if data and self.request is None:
            self.request_started = time.monotonic()
        done: bool = super().received(data)
        if self.request is None:
            self.request_started = 0.0
        return done


class BoundedServer(TcpWSGIServer):  # type: ignore[misc]  # untyped base
    """waitress' TCP server, accepting only while the descriptor budget allows, and
    closing a connection whose request is not in whole within ``request_timeout``."""

    channel_class = _Channel

    def __init__(self, app: Callable[..., Any], adj: Adjustments, *, label: str,
                 logger: logging.Logger, request_timeout: float, pipeline_fds: int = 0,
                 usage: Callable[[], tuple[int, int] | None] | None = None,
                 always_one: bool = False) -> None:
        self.label = label
        #: one connection is taken even inside the reserve (while HARD_FLOOR descriptors
        #: stay free): a health check gets in when slow clients fill the budget
        self.always_one = always_one
        self.log = logger
        self.request_timeout = request_timeout
        self.pipeline_fds = pipeline_fds
        self._usage = usage or (lambda: fd_usage())
        self._checked_at = -_FD_CACHE
        self._usage_at_check: tuple[int, int] | None = None
        self._connections_at_check = 0
        self._starved = False
        self._next_warning = 0.0
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        super().__init__(app, map={}, dispatcher=dispatcher, adj=adj,
                         sockinfo=adj.listen[0])

    @property
    def connections(self) -> int:
        """Client connections open now (the map also holds the listener and a trigger)."""
        return max(0, len(self._map) - 2)

    def readable(self) -> bool:
        full = not super().readable()  # waitress' connection_limit (and its maintenance)
        allowed = not full and self._fds_allow()
        if not allowed and self.accepting and self._pending():
            self._evict_oldest()  # a newer client waits: an idle one gives way
        return allowed

    def _pending(self) -> bool:
        """A connection waits in the listen backlog."""
        try:
            return bool(select.select([self.socket], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _evict_oldest(self) -> None:
        """Close the oldest connection that is not being answered (still sending its
        request, or idle between requests), so a newer client gets its place: a flood of
        slow clients cannot keep a health check out. One at a time."""
        idle = [channel for channel in self.active_channels.values()
                if not channel.will_close and not channel.answering]
        if idle:
            oldest = min(idle, key=lambda channel: channel.opened)
            self.log.debug("%s: a newer connection waits: the oldest idle one is closed",
                           self.label)
            oldest.will_close = True

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections (channel_timeout)
        cutoff = time.monotonic() - self.request_timeout
        for channel in list(self.active_channels.values()):
            started = channel.request_started
            if started and started < cutoff:  # a request trickling in: cut it
                self.log.debug("%s: request not complete within %g s: connection closed",
                               self.label, self.request_timeout)
                channel.will_close = True

    def _fds_allow(self) -> bool:
        now = time.monotonic()
        connections = self.connections
        if now - self._checked_at >= _FD_CACHE:
            self._checked_at = now
            self._usage_at_check = self._usage()
            self._connections_at_check = connections
        usage = self._usage_at_check
        if usage is None:
            return True
        opened = usage[0] + connections - self._connections_at_check
        allowed = may_accept(opened, usage[1], connections, self.pipeline_fds) or (
            self.always_one and connections == 0 and opened + 1 <= usage[1] - HARD_FLOOR)
        if not allowed and not self._starved:
            self._starved = True
            if now >= self._next_warning:
                self._next_warning = now + _WARNING_INTERVAL
                self.log.warning("%s: not accepting connections: %d of %d file descriptors "
                                 "are open (%d of them its connections); the rest is kept "
                                 "for Redis and MS4", self.label, opened, usage[1],
                                 connections)
        elif allowed and self._starved:
            self._starved = False
            self.log.info("%s: accepting connections again", self.label)
        return allowed


class Server:
    """Runs a :class:`BoundedServer` in the thread ``name`` until :meth:`close`."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *, name: str,
                 logger: logging.Logger, threads: int, max_connections: int,
                 idle_timeout: float, request_timeout: float, pipeline_fds: int = 0,
                 usage: Callable[[], tuple[int, int] | None] | None = None,
                 always_one: bool = False) -> None:
        timeout = max(1, round(idle_timeout))
        adj = Adjustments(
            host=host, port=port, threads=threads, connection_limit=max_connections + 2,
            channel_timeout=timeout, cleanup_interval=1,
            asyncore_use_poll=True, backlog=1024, ident=f"ms1-{name}",
            expose_tracebacks=False, clear_untrusted_proxy_headers=True,
            ipv6=":" in host, ipv4=":" not in host, url_scheme="http")
        self.server = BoundedServer(app, adj, label=name, logger=logger,
                                    request_timeout=request_timeout,
                                    pipeline_fds=pipeline_fds, usage=usage,
                                    always_one=always_one)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.effective_host, self.server.effective_port
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=0.5, map=self.server._map, use_poll=True, count=1)
        finally:
            wasyncore.close_all(self.server._map)
            self.server.task_dispatcher.shutdown(timeout=2)

    def close(self, timeout: float = 3.0) -> None:
        """Stop serving: connections are closed, running requests get ``timeout`` s."""
        self._stop.set()
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self.server.pull_trigger()
            self._thread.join(timeout)
        else:
            wasyncore.close_all(self.server._map)
