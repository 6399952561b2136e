"""The console's HTTP server: ms1's one bounded waitress server
(:mod:`ms1.ops.httpserver`) with the console's limits — ``[console] max_connections``,
``idle_timeout`` — and room kept for what the pipeline may still open (its Redis and MS4
connections)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ms1.ops import httpserver

log = logging.getLogger("ms1.console")

#: worker threads running console requests (pages are small; Redis reads are cached)
THREADS = 4
#: seconds a client has to send a whole request
REQUEST_TIMEOUT = 10.0


class Server(httpserver.Server):
    """The console's server, in the thread ``console``."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *,
                 max_connections: int, idle_timeout: float, pipeline_fds: int) -> None:
        super().__init__(app, host, port, name="console", logger=log, threads=THREADS,
                         max_connections=max_connections, idle_timeout=idle_timeout,
                         request_timeout=max(REQUEST_TIMEOUT, idle_timeout),
                         pipeline_fds=pipeline_fds)
