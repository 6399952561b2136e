"""The console's HTTP server: waitress, bounded so it never costs the pipeline its file
descriptors or threads.

More: docs/internals.md, ``ms1.console.server``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore  # type: ignore[import-untyped]  # waitress: no type hints
from waitress.adjustments import Adjustments  # type: ignore[import-untyped]
from waitress.server import TcpWSGIServer  # type: ignore[import-untyped]
from waitress.task import ThreadedTaskDispatcher  # type: ignore[import-untyped]

from ms1.ops.metrics import fd_reserve, fd_usage

log = logging.getLogger("ms1.console")

#: worker threads running console requests (pages are small; Redis reads are cached)
THREADS = 4
#: seconds between two "not accepting" warnings
_WARNING_INTERVAL = 60.0
#: seconds an fd count is reused (the accept check runs on every loop turn)
_FD_CACHE = 0.2


def may_accept(open_fds: int, limit: int, console_connections: int, pipeline_fds: int
               ) -> bool:
    """Whether the console may take one more descriptor: with ``open_fds`` of ``limit``
    open, ``console_connections`` of them the console's, the rest of the process may still
    need up to ``pipeline_fds`` in all, and :func:`fd_reserve` stays free."""
    others = open_fds - console_connections
    still_needed = max(0, pipeline_fds - others)
    return open_fds + 1 + still_needed <= limit - fd_reserve(limit)


class ConsoleServer(TcpWSGIServer):  # type: ignore[misc]  # untyped base
    """waitress' TCP server, accepting only while the descriptor budget allows."""

    def __init__(self, app: Callable[..., Any], adj: Adjustments, *, pipeline_fds: int,
                 usage: Callable[[], tuple[int, int] | None] = fd_usage) -> None:
        self.pipeline_fds = pipeline_fds
        self._usage = usage
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
        if not super().readable():  # waitress' connection_limit (and its maintenance)
            return False
        return self._fds_allow()

    def _fds_allow(self) -> bool:
        """The budget, on the descriptors open now: counted in ``/proc/self/fd`` at most
        every :data:`_FD_CACHE` s, and in between the count plus the console's own
        connections opened since (a burst of connections is accepted one loop turn at a
        time, each turn asks again)."""
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
        allowed = may_accept(opened, usage[1], connections, self.pipeline_fds)
        if not allowed and not self._starved:
            self._starved = True
            if now >= self._next_warning:
                self._next_warning = now + _WARNING_INTERVAL
                log.warning("console: not accepting connections: %d of %d file descriptors "
                            "are open (%d of them console connections); the rest is kept "
                            "for Redis and MS4", opened, usage[1], connections)
        elif allowed and self._starved:
            self._starved = False
            log.info("console: accepting connections again")
        return allowed


class Server:
    """Runs a :class:`ConsoleServer` in the thread ``console`` until :meth:`close`."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *,
                 max_connections: int, idle_timeout: float, pipeline_fds: int) -> None:
        timeout = max(1, round(idle_timeout))
        adj = Adjustments(
            host=host, port=port, threads=THREADS, connection_limit=max_connections + 2,
            channel_timeout=timeout, cleanup_interval=max(1, timeout // 2),
            asyncore_use_poll=True, backlog=1024, ident="ms1-console",
            expose_tracebacks=False, clear_untrusted_proxy_headers=True,
            ipv6=":" in host, ipv4=":" not in host, url_scheme="http")
        self.server = ConsoleServer(app, adj, pipeline_fds=pipeline_fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

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
