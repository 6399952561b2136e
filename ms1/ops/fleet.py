"""The fleet: every running instance publishes what it is doing, anyone can read them all.

A :class:`Fleet` is a small shared board: each running ``ms1-service`` publishes a
*snapshot* of itself once a second while it changes, every ``ttl / 3`` s while it does
not (:class:`ms1.ops.publisher.Publisher`, in a thread of its own), with a time to live,
so an instance that died vanishes within ``ttl`` seconds; the web console and
``ms1-service top`` read every live snapshot (:meth:`Fleet.snapshots`) and add them up
(:mod:`ms1.ops.overview`). Built in: :class:`MemoryFleet` (this process only); the
``redis`` plugin's fleet covers every instance on the same Redis. A plugin provides one
through the ``ms1_make_fleet`` hook; ``[fleet] backend`` chooses (``auto``: see
:func:`ms1.runtime.pluginmanager.build_fleet`).

A snapshot is a plain JSON-able dict (:meth:`ms1.ops.publisher.Sampler.sample` builds
it; schema
:data:`SCHEMA`)::

    {"schema": 1, "id": "ms1-a@host:4711", "label": "ms1-a", "host": "host", "pid": 4711,
     "version": "0.1.0", "started": 1730450000.0, "updated": 1730450100.5,
     "counters": {"emails_read": 2000, "invoices_delivered": 1950, "dead_lettered": 50,
                  "responses_202": 39, "responses_400": 11, ...},   # RunStats, as is
     "rates": {"window_s": 10.0, "emails_in_per_s": 120.5, "invoices_delivered_per_s": 118.0},
     "in_flight": 3, "concurrency_target": 12, "adaptive": true, "latency_s": 0.05,
     "held": {"pause_429_s": 0.0, "stop": null, "stop_status": null, "auth_blocked": false,
              "breaker": "closed", "reason": null},
     "held_seconds": {"rate_budget": 12.5, "429_pause": 0.0, ...},   # totals, by cause
     "held_recent": {"rate_budget": 1.2, ...},   # sender-seconds held per second, last window
     "health": {"ok": true, "problem": null, "threads": {"reader": 1, "batcher": 1,
                                                         "committer": 1, "sender": 64}}}

Nothing in it is secret or invoice data: counters, states, and texts (a stop's reason, a
stalled thread's doing) that pass through :func:`ms1.redaction.redact`.

Publishing never holds the pipeline back: the publisher has its own thread, and a fleet
that cannot be reached (Redis down) only makes it skip beats (one WARNING when it starts
failing, one when it answers again).
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
