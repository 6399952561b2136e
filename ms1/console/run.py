"""The console of one service: its Flask app on its waitress server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ms1.console import FDS_BASE, FDS_PER_SENDER, ConsoleSettings
from ms1.ops.fleet import Fleet
from ms1.ops.overview import Ceiling, LetterCounts, gather
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.source import Source

from .app import ConsoleContext, OverviewCache, create_app
from .server import Server

log = logging.getLogger("ms1.console")


class Console:
    """The console of one service: its app and its server (started by :meth:`start`).
    The socket is bound at construction, so a wrong address fails the start
    (``OSError``). ``ledger`` (None: ``[ledger] backend = off``) backs the search."""

    def __init__(self, settings: ConsoleSettings, *, fleet: Fleet | None,
                 source: Source | None, queue: QueueBackend, dead_letters: DeadLetterStore,
                 ceiling: Callable[[], Ceiling] = Ceiling, sender_threads: int = 4,
                 ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.token = settings.token
        letter_counts = LetterCounts(dead_letters)

        def build() -> dict[str, Any]:
            return gather(fleet, ceiling=ceiling(), source=source, queue=queue,
                          dead_letters=letter_counts)

        self.context = ConsoleContext(
            overview=OverviewCache(build).get, store=dead_letters, queue=queue,
            max_items=settings.max_items, max_bytes=settings.max_bytes, token=self.token,
            trusted_hosts=settings.trusted_hosts, origins=settings.origins, ledger=ledger)
        self.app = create_app(self.context)
        self.server = Server(self.app, settings.host, settings.port,
                             max_connections=settings.max_connections,
                             idle_timeout=settings.idle_timeout,
                             pipeline_fds=FDS_BASE + FDS_PER_SENDER * sender_threads)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> None:
        self.server.start()
        log.info("console on http://%s/ (replay %s)", self.address,
                 "needs the admin token" if self.token is not None else
                 "off: no admin token configured")

    #: seconds running requests get when the console closes (at most)
    close_timeout = 3.0

    def close(self, timeout: float | None = None) -> None:
        """Stop serving; running requests get at most ``timeout`` s (default
        :attr:`close_timeout`)."""
        self.server.close(self.close_timeout if timeout is None else timeout)


__all__ = ["Console"]
