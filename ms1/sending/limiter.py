"""The rate limiter: at most N requests in *any* sliding window, for every sender.

A slot is stamped with the time its request *finished*, so the server — which sees a
request somewhere between its start and its end — never counts more than N in its own
window. Built in: :class:`SlidingWindowLimiter` (one process); the Redis plugin ships
one shared by every instance on the Redis.
"""

from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable


class RateLimiter(ABC):
    """At most ``limit`` requests in any window of ``window`` seconds, for all callers."""

    limit: int
    window: float

    def configure(self, limit: int, window: float) -> None:
        """New figures (a reload): they hold from the next request on."""
        self.limit = limit
        self.window = window

    @abstractmethod
    def try_acquire(self) -> tuple[str | None, float]:
        """Take a slot: ``(token, 0)``, or ``(None, seconds to wait before trying again)``."""

    @abstractmethod
    def finish(self, token: str) -> None:
        """The request of this slot ended now: the slot expires ``window`` s from now."""

    @abstractmethod
    def cancel(self, token: str) -> None:
        """The slot was not used: give it back at once."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


class SlidingWindowLimiter(RateLimiter):
    """In-process sliding-window log: exact, shared by the threads of one process.

    Finished slots sit in a deque in the order they finished (so, by time), in-flight
    ones in a dict: taking a slot costs O(1) amortised however high the limit.
    """

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._finished: deque[float] = deque()  # end times, oldest first
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def try_acquire(self) -> tuple[str | None, float]:
        with self._lock:
            now = self._clock()
            horizon = now - self.window
            finished = self._finished
            while finished and finished[0] <= horizon:
                finished.popleft()
            if len(finished) + len(self._in_flight) < self.limit:
                token = str(next(self._ids))
                self._in_flight.add(token)
                return token, 0.0
            wait = finished[0] + self.window - now if finished else 0.05
            return None, max(wait, 0.001)

    def finish(self, token: str) -> None:
        with self._lock:
            if token in self._in_flight:
                self._in_flight.discard(token)
                self._finished.append(self._clock())

    def cancel(self, token: str) -> None:
        with self._lock:
            self._in_flight.discard(token)
