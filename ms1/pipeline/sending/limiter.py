"""The rate limiter: at most N requests in *any* sliding window, for every sender.

A slot is taken before its request goes and held while it is in flight; when the request
ends the slot is stamped with the moment MS4 counted it — ``ago`` seconds before now — and
leaves the window ``window`` seconds after that. Where MS4 counts a request is the
pacer's to say (``[send] ms4_counts_at``): on arrival (the stamp is when the request was
out, plus a margin), or when it answered (the stamp is now). Built in:
:class:`SlidingWindowLimiter` (one process); the Redis plugin ships one shared by every
instance on the Redis.

More: docs/internals.md, ``ms1.pipeline.sending.limiter``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from ms1.pipeline.sending.shape import Shape


@dataclass(frozen=True, slots=True)
class Grant:
    """A slot taken: its ``token`` (for :meth:`RateLimiter.finish`/``cancel``) and, from a
    shaping limiter, what the pacer learns from its answer: ``level`` (requests ahead of
    the steady pace, this one included), ``fill`` (share of the window's budget in use,
    this one included) and the shape's ``epoch`` (None: the limiter does not say)."""

    token: str
    level: float | None = None
    fill: float | None = None
    epoch: int | None = None


Change = Callable[[Shape], "Shape | None"]


class RateLimiter(ABC):
    """At most ``limit`` requests in any window of ``window`` seconds, for all callers."""

    limit: int
    window: float
    #: at the last grant, the slots free then or leaving the window within the ``ahead``
    #: seconds it was asked about: how many more requests the window lets go in that time
    #: (a hint for the concurrency controller; None until a grant, or if it cannot say)
    free_hint: int | None = None
    #: the least spacing a shaping limiter's pace keeps (a fraction of the emission
    #: interval): the senders' own jitter between a grant and the request being out,
    #: measured by the pacer, so two requests never reach MS4 closer than the rate
    spacing_floor: float = 0.0
    #: the name of the count this limiter shares with other instances (the Redis key), or
    #: None when the count is this process's own: instances sharing one must agree on
    #: ``limit`` and ``window`` (the fleet cross-checks them, :func:`ms1.ops.fleet.disagreements`)
    shared_as: str | None = None

    def configure(self, limit: int, window: float) -> None:
        """New figures (a reload): they hold from the next request on."""
        self.limit = limit
        self.window = window

    def acquire(self, ahead: float = 0.0) -> tuple[Grant | None, float]:
        """:meth:`try_acquire` with what the limiter knows of the grant (a shaping limiter
        overrides it; by default a bare token)."""
        token, wait = self.try_acquire(ahead)
        return (Grant(token) if token is not None else None), wait

    @property
    def shape(self) -> Shape | None:
        """The learned shape of MS4's limiter (None: this limiter does not shape)."""
        return None

    def learn(self, change: Change) -> Shape | None:
        """Apply ``change`` to the shape atomically (None from it: no change); the shape
        in force after. A limiter that does not shape ignores it."""
        return None

    @abstractmethod
    def try_acquire(self, ahead: float = 0.0) -> tuple[str | None, float]:
        """Take a slot: ``(token, 0)``, or ``(None, seconds to wait before trying again)``.
        A grant sets :attr:`free_hint` looking ``ahead`` seconds ahead."""

    @abstractmethod
    def finish(self, token: str, ago: float = 0.0) -> None:
        """The request of this slot ended; MS4 counted it ``ago`` seconds ago (negative:
        a margin ahead): the slot leaves the window ``window`` s after that moment."""

    @abstractmethod
    def cancel(self, token: str) -> None:
        """The slot was not used: give it back at once."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


def effective_spacing(shape: Shape, floor: float) -> float:
    """The spacing the pace keeps: the shape's, at least ``floor`` (the senders' jitter)
    while the limiter allows no burst — an allowance of two or more absorbs the jitter
    (beside a busy suite, a 5 % floor at 20 a second left HAProxy at 90 %)."""
    return max(shape.spacing, floor) if shape.burst < 2 else shape.spacing


def interval(limit: int, window: float, shape: Shape, floor: float = 0.0) -> float:
    """Seconds between requests at the steady pace: the rate's, plus the spacing
    (:func:`effective_spacing`)."""
    return window / limit * (1 + effective_spacing(shape, floor))


def pace_free(shape: Shape, tat: float, now: float, step: float, ahead: float) -> int:
    """How many more requests the pace lets go within ``ahead`` s, its theoretical
    arrival time being ``tat``."""
    slack = (shape.burst - 1) * step + ahead - max(0.0, tat - now)
    return max(0, math.floor(slack / step + 1e-9) + 1)


class SlidingWindowLimiter(RateLimiter):
    """In-process sliding-window log: exact, shared by the threads of one process; with
    ``shaping`` also the GCRA pace of a learned :class:`~ms1.pipeline.sending.shape.Shape`.

    Finished slots sit in a list sorted by their stamp (they nearly always come in order:
    an insertion at the end), in-flight ones in a set.
    """

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic, *, shaping: bool = False) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._finished: list[float] = []  # stamps, sorted: the oldest first
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._shape = Shape.initial(limit) if shaping else None
        self._tat = 0.0  # GCRA's theoretical arrival time of the next request

    def configure(self, limit: int, window: float) -> None:
        with self._lock:
            super().configure(limit, window)
            if self._shape is not None:
                self._shape = self._shape.fitted(limit)

    @property
    def shape(self) -> Shape | None:
        with self._lock:
            return self._shape

    def learn(self, change: Change) -> Shape | None:
        with self._lock:
            if self._shape is not None:
                self._shape = change(self._shape) or self._shape
            return self._shape

    def try_acquire(self, ahead: float = 0.0) -> tuple[str | None, float]:
        grant, wait = self.acquire(ahead)
        return (grant.token if grant is not None else None), wait

    def acquire(self, ahead: float = 0.0) -> tuple[Grant | None, float]:
        with self._lock:
            now = self._clock()
            horizon = now - self.window
            finished = self._finished
            del finished[:bisect.bisect_right(finished, horizon)]
            used = len(finished) + len(self._in_flight)
            if used >= self.limit:
                wait = finished[0] + self.window - now if finished else 0.05
                return None, max(wait, 0.001)
            leaving = bisect.bisect_right(finished, horizon + ahead) if ahead > 0 else 0
            free = self.limit - used - 1 + leaving
            shape = self._shape
            if shape is None:
                token = str(next(self._ids))
                self._in_flight.add(token)
                self.free_hint = free
                return Grant(token, fill=(used + 1) / self.limit), 0.0
            step = interval(self.limit, self.window, shape, self.spacing_floor)
            early = self._tat - now - (shape.burst - 1) * step
            if early > 0:  # the pace: not yet
                return None, max(early, 0.001)
            token = str(next(self._ids))
            self._in_flight.add(token)
            self._tat = max(self._tat, now) + step
            self.free_hint = min(free, pace_free(shape, self._tat, now, step, ahead))
            return Grant(token, (self._tat - now) / step, (used + 1) / self.limit,
                         shape.epoch), 0.0

    def finish(self, token: str, ago: float = 0.0) -> None:
        with self._lock:
            if token in self._in_flight:
                self._in_flight.discard(token)
                bisect.insort(self._finished, self._clock() - ago)

    def cancel(self, token: str) -> None:
        with self._lock:  # the pace is not given back: a later grant may stand on its step
            self._in_flight.discard(token)
