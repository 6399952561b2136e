"""The rate limiter: at most N requests in *any* sliding window, for every sender.

A slot is taken before its request goes and held while it is in flight; when the request
ends the slot is stamped with the moment MS4 counted it — ``ago`` seconds before now — and
leaves the window ``window`` seconds after that. Where MS4 counts a request is the
pacer's to say (``[send] ms4_counts_at``): on arrival (the stamp is when the request was
out, plus a margin), or when it answered (the stamp is now). Built in:
:class:`SlidingWindowLimiter` (one process); the Redis plugin ships one shared by every
instance on the Redis.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable


class RateLimiter(ABC):
    """At most ``limit`` requests in any window of ``window`` seconds, for all callers."""

    limit: int
    window: float
    #: at the last grant, the slots free then or leaving the window within the ``ahead``
    #: seconds it was asked about: how many more requests the window lets go in that time
    #: (a hint for the concurrency controller; None until a grant, or if it cannot say)
    free_hint: int | None = None

    def configure(self, limit: int, window: float) -> None:
        """New figures (a reload): they hold from the next request on."""
        self.limit = limit
        self.window = window

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


class SlidingWindowLimiter(RateLimiter):
    """In-process sliding-window log: exact, shared by the threads of one process.

    Finished slots sit in a list sorted by their stamp (they nearly always come in order:
    an insertion at the end), in-flight ones in a set.
    """

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._finished: list[float] = []  # stamps, sorted: the oldest first
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def try_acquire(self, ahead: float = 0.0) -> tuple[str | None, float]:
        with self._lock:
            now = self._clock()
            horizon = now - self.window
            finished = self._finished
            del finished[:bisect.bisect_right(finished, horizon)]
            used = len(finished) + len(self._in_flight)
            if used < self.limit:
                token = str(next(self._ids))
                self._in_flight.add(token)
                leaving = bisect.bisect_right(finished, horizon + ahead) if ahead > 0 else 0
                self.free_hint = self.limit - used - 1 + leaving
                return token, 0.0
            wait = finished[0] + self.window - now if finished else 0.05
            return None, max(wait, 0.001)

    def finish(self, token: str, ago: float = 0.0) -> None:
        with self._lock:
            if token in self._in_flight:
                self._in_flight.discard(token)
                bisect.insort(self._finished, self._clock() - ago)

    def cancel(self, token: str) -> None:
        with self._lock:
            self._in_flight.discard(token)
