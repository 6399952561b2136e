"""ms4-sim's rate limiters: the shapes a real MS4, or the proxy in front of it, counts by.

All allow ``limit`` requests per ``window`` seconds in the long run and differ in the
bursts they allow and what they remember:

More: docs/internals.md, ``ms1_tools.sim_limits``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SHAPES = ("sliding-log", "sliding-counter", "fixed-window", "token-bucket", "leaky-bucket")


@dataclass(frozen=True)
class Verdict:
    """One request's fate: ``ok``; ``retry_after``: seconds until a request would pass
    (refused ones); ``remaining``: requests the limiter lets through now; ``reset``:
    seconds until the budget grows again."""

    ok: bool
    retry_after: float
    remaining: int
    reset: float


class Limiter:
    """One shape of :data:`SHAPES`; the caller holds the lock and passes the time."""

    def __init__(self, shape: str, limit: int, window: float, *, burst: int | None = None,
                 count_denied: bool = False) -> None:
        if shape not in SHAPES:
            raise ValueError(f"limiter must be one of {SHAPES}, got {shape!r}")
        self.shape, self.limit, self.window = shape, limit, window
        self.burst = burst
        self.count_denied = count_denied
        self.clear()

    @property
    def rate(self) -> float:
        return self.limit / self.window

    def clear(self, now: float | None = None) -> None:
        self._log: deque[float] = deque()
        self._start: float | None = now  # the counters' first period begins here
        self._current = 0
        self._previous = 0
        capacity = self.burst if self.burst is not None else self.limit
        self._tokens = float(capacity)
        self._excess = 0.0
        self._last: float | None = None

    def admit(self, now: float) -> Verdict:
        if self.limit <= 0:
            return Verdict(True, 0.0, 0, 0.0)
        shapes = {"sliding-log": self._sliding_log, "sliding-counter": self._sliding_counter,
                  "fixed-window": self._fixed_window, "token-bucket": self._token_bucket,
                  "leaky-bucket": self._leaky_bucket}
        return shapes[self.shape](now)

    # -- the shapes ----------------------------------------------------------------------

    def _sliding_log(self, now: float) -> Verdict:
        log = self._log
        while log and log[0] <= now - self.window:
            log.popleft()
        ok = len(log) < self.limit
        if ok or self.count_denied:
            log.append(now)
        wait = log[0] + self.window - now if len(log) >= self.limit else 0.0
        return Verdict(ok, wait, max(0, self.limit - len(log)),
                       log[0] + self.window - now if log else 0.0)

    def _periods(self, now: float) -> float:
        """Roll the counters' periods forward to ``now``; the share of the current one gone."""
        if self._start is None:
            self._start = now
        gone = (now - self._start) / self.window
        if gone >= 1:
            periods = math.floor(gone)
            self._previous = self._current if periods == 1 else 0
            self._current = 0
            self._start += periods * self.window
            gone -= periods
        return gone

    def _sliding_counter(self, now: float) -> Verdict:
        gone = self._periods(now)
        if self.count_denied:  # HAProxy: track-sc0 counts it, then the deny rule reads it
            self._current += 1
            rate = self._current + self._previous * (1 - gone)
            ok = rate <= self.limit
        else:
            rate = self._current + 1 + self._previous * (1 - gone)
            ok = rate <= self.limit
            if ok:
                self._current += 1
        left = self.limit - (self._current + self._previous * (1 - gone))
        wait = 0.0
        if not ok and self._previous > 0:  # until the previous period has faded enough
            excess = self._current + self._previous * (1 - gone) + 1 - self.limit
            wait = min((1 - gone) * self.window, excess / self._previous * self.window)
        elif not ok:
            wait = (1 - gone) * self.window
        return Verdict(ok, max(wait, 0.0), max(0, math.floor(left)), (1 - gone) * self.window)

    def _fixed_window(self, now: float) -> Verdict:
        gone = self._periods(now)
        ok = self._current < self.limit
        if ok or self.count_denied:
            self._current += 1
        reset = (1 - gone) * self.window
        return Verdict(ok, 0.0 if ok else reset, max(0, self.limit - self._current), reset)

    def _token_bucket(self, now: float) -> Verdict:
        capacity = float(self.burst if self.burst is not None else self.limit)
        if self._last is not None:
            self._tokens = min(capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        ok = self._tokens >= 1
        if ok:
            self._tokens -= 1
        wait = 0.0 if ok else (1 - self._tokens) / self.rate
        reset = (1 - self._tokens) / self.rate if self._tokens < 1 else \
            (capacity - self._tokens) / self.rate
        return Verdict(ok, wait, math.floor(self._tokens), max(reset, 0.0))

    def _leaky_bucket(self, now: float) -> Verdict:
        # nginx's ngx_http_limit_req_lookup, in requests instead of milli-requests
        # (the first request of a key finds no node: it passes and leaves no excess)
        burst = float(self.burst or 0)
        if self._last is None:
            excess, ok = 0.0, True
        else:
            excess = max(0.0, self._excess - self.rate * (now - self._last) + 1)
            ok = excess <= burst
        if ok:
            self._excess, self._last = excess, now
        since = now - (self._last if self._last is not None else now)
        held = max(0.0, self._excess - self.rate * since)
        wait = 0.0 if ok else (self._excess + 1 - burst) / self.rate - since
        return Verdict(ok, max(wait, 0.0), max(0, math.floor(burst - held)), held / self.rate)
