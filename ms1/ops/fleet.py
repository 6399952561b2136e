"""The fleet: every running instance publishes what it is doing, anyone can read them all.

More: docs/internals.md, ``ms1.ops.fleet``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: the snapshot's layout version (``snapshot["schema"]``)
SCHEMA = 1
#: seconds between two snapshots of one instance
PUBLISH_INTERVAL = 1.0
#: seconds a snapshot lives: an instance silent this long has vanished from the fleet
SNAPSHOT_TTL = 10.0
#: seconds over which an instance's own rates are measured
RATE_WINDOW = 10.0


class Fleet(ABC):
    """Contract of a fleet plugin: where instances publish their snapshots.

    Thread-safe: the publisher thread writes while console requests read. Calls may do
    I/O and raise :class:`~ms1.errors.Ms1Error` when the backend cannot be reached.
    """

    name: str = "?"
    #: what names this process among the others, if the backend knows better than the
    #: host name (the ``redis`` fleet: ``[redis] consumer``); empty: the host name
    label: str = ""

    @abstractmethod
    def publish(self, instance_id: str, snapshot: Mapping[str, Any], ttl: float) -> None:
        """Put ``snapshot`` (JSON-able) up as ``instance_id``'s, replacing its last one;
        it disappears ``ttl`` seconds later unless published again."""

    @abstractmethod
    def snapshots(self) -> list[dict[str, Any]]:
        """Every live snapshot (none older than its ``ttl``), in no particular order."""

    def withdraw(self, instance_id: str) -> None:  # noqa: B027 - optional: ttl does it
        """Take ``instance_id``'s snapshot down now (a clean shutdown); by default it
        just expires."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class MemoryFleet(Fleet):
    """Snapshots held in this process (one instance: the console of a service not on
    Redis, tests)."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._board: dict[str, tuple[float, dict[str, Any]]] = {}

    def publish(self, instance_id: str, snapshot: Mapping[str, Any], ttl: float) -> None:
        with self._lock:
            self._board[instance_id] = (self._clock() + ttl, dict(snapshot))

    def snapshots(self) -> list[dict[str, Any]]:
        now = self._clock()
        with self._lock:
            for key in [k for k, (until, _) in self._board.items() if until <= now]:
                del self._board[key]
            return [dict(snapshot) for _, snapshot in self._board.values()]

    def withdraw(self, instance_id: str) -> None:
        with self._lock:
            self._board.pop(instance_id, None)


def instance_id(label: str = "", host: str | None = None, pid: int | None = None) -> str:
    """How an instance is named in the fleet: ``label@host:pid`` (``host:pid`` when the
    label is empty or the host name): unique per process even when two instances were
    (wrongly) given one consumer name; a restart is a new instance."""
    host = host or socket.gethostname()
    pid = os.getpid() if pid is None else pid
    return f"{label}@{host}:{pid}" if label and label != host else f"{host}:{pid}"


__all__ = ["PUBLISH_INTERVAL", "RATE_WINDOW", "SCHEMA", "SNAPSHOT_TTL", "Fleet", "MemoryFleet",
           "instance_id"]
