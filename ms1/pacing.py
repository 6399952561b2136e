"""Pacing: whether and when the senders may send — shared by every sender thread.

:class:`Pacer` holds the four things that can hold a request back:

* the **rate limiter** (:class:`RateLimiter`): at most N requests in *any*
  sliding window (default 120 per 60 s). A slot is stamped with the time the
  request *finished*, so the server — which sees a request somewhere between
  its start and its end — never counts more than N in its own window;
* a **429 pause**: every sender waits until ``Retry-After`` has passed;
* a **401 spell**: no sender sends until the API key changes (reload) or a
  slow probe — one request every ``auth_probe_interval`` s — is accepted;
* the **circuit breaker** (pybreaker): opens after N consecutive failures
  (5xx, timeouts, connection errors), lets one probe through after
  ``reset_timeout``. pybreaker's ``call()`` holds a lock for the whole wrapped
  call, which would serialise every sender; here admission is decided from the
  breaker's state and the outcome is fed through ``call()`` with a trivial
  function afterwards, so its lock is never held across I/O.
"""

from __future__ import annotations

import contextlib
import email.utils
import itertools
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import pybreaker

from ms1.config import Secret
from ms1.errors import Ms1Error

log = logging.getLogger(__name__)


class Aborted(Exception):
    """The shutdown deadline passed while waiting for permission to send."""


# --- Retry-After ------------------------------------------------------------------


def parse_retry_after(value: str | None, *, default: float, cap: float,
                      now: datetime | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` value, always within ``[0, cap]``.

    Accepts delay-seconds (``"7"``; a non-negative decimal like ``"1.5"`` too) and
    an HTTP-date in any of its three formats (IMF-fixdate, RFC 850, asctime — the
    latter parsed naive and taken as UTC). A date in the past gives 0. Missing,
    empty, negative or unparseable values give ``default`` (clamped as well).
    """
    seconds = _retry_after_seconds(value, now or datetime.now(UTC))
    if seconds is None:
        seconds = default
    return min(max(seconds, 0.0), max(cap, 0.0))


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime carries no zone; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return (when - now).total_seconds()


# --- rate limiter -----------------------------------------------------------------


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


# --- breaker --------------------------------------------------------------------


class _Failed(Exception):
    pass


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Failed


class _BreakerLog(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: object) -> None:
        old_name = getattr(old, "name", old)
        new_name = getattr(new, "name", new)
        if new_name == pybreaker.STATE_OPEN:
            log.error("circuit breaker open (was %s): MS4 is failing; next probe in %.1f s",
                      old_name, cb.reset_timeout)
        else:
            log.warning("circuit breaker %s (was %s)", new_name, old_name)


class Breaker:
    """pybreaker's state machine with admission outside its lock (see the module doc)."""

    def __init__(self, fail_max: int, reset_timeout: float) -> None:
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, state_storage=self._storage,
            listeners=[_BreakerLog()], throw_new_error_on_trip=False, name="ms4")
        self._lock = threading.Lock()
        self._probe = False

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    def admit(self) -> tuple[bool, float]:
        """``(True, 0)`` if a request may go (the probe, when half-open), else ``(False, wait)``."""
        with self._lock:
            state = self._cb.current_state
            if state == pybreaker.STATE_CLOSED:
                return True, 0.0
            if state == pybreaker.STATE_OPEN:
                opened = self._storage.opened_at
                left = 0.0
                if opened is not None:
                    elapsed = (datetime.now(UTC) - opened).total_seconds()
                    left = self._cb.reset_timeout - elapsed
                if left > 0:
                    return False, left
                self._cb.half_open()
            if self._probe:
                return False, 0.05
            self._probe = True
            return True, 0.0

    def record(self, ok: bool) -> None:
        """Feed one outcome through pybreaker (its lock is held only for a no-op)."""
        with self._lock:
            self._probe = False
            if ok and self._storage.counter == 0 and self._storage.state == pybreaker.STATE_CLOSED:
                return  # nothing for pybreaker to change: skip its machinery on the hot path
            with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError):
                self._cb.call(_succeed if ok else _fail)

    def release_probe(self) -> None:
        """An admitted request was not sent after all."""
        with self._lock:
            self._probe = False


# --- the pacer ------------------------------------------------------------------


class Admission:
    """Permission for one request; hand it back to :meth:`Pacer.done`."""

    __slots__ = ("auth_probe", "token")

    def __init__(self, token: str, auth_probe: bool) -> None:
        self.token = token
        self.auth_probe = auth_probe


class Pacer:
    """Decides when the next request may go; told every outcome. Shared by all senders."""

    def __init__(
        self, limiter: RateLimiter, breaker: Breaker, *, retry_after_default: float = 5.0,
        retry_after_cap: float = 300.0, auth_probe_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.breaker = breaker
        self.retry_after_default = retry_after_default
        self.retry_after_cap = retry_after_cap
        self.auth_probe_interval = auth_probe_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._auth_blocked = False
        self._auth_probe_in_flight = False
        self._next_auth_probe = 0.0
        self._limiter_down = False

    # state, for status/metrics/readiness
    @property
    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self._clock())

    @property
    def auth_blocked(self) -> bool:
        with self._lock:
            return self._auth_blocked

    def admit(self, abort: threading.Event) -> Admission:
        """Block until a request may be sent; raise :class:`Aborted` if ``abort`` is set."""
        while True:
            if abort.is_set():
                raise Aborted
            wait = self._gate()
            if wait > 0:
                abort.wait(min(wait, 0.5))
                continue
            try:
                token, wait = self.limiter.try_acquire()
            except Ms1Error as exc:
                # fail closed: without the shared count we cannot know we are under the limit
                if not self._limiter_down:
                    log.error("rate limiter unavailable (%s): not sending until it is back", exc)
                self._limiter_down = True
                abort.wait(0.5)
                continue
            if self._limiter_down:
                log.warning("rate limiter available again")
                self._limiter_down = False
            if token is None:
                abort.wait(min(wait, 0.5))
                continue
            probe, wait = self._claim_auth()
            if wait > 0:
                with contextlib.suppress(Ms1Error):
                    self.limiter.cancel(token)
                abort.wait(min(wait, 0.5))
                continue
            allowed, wait = self.breaker.admit()
            if not allowed:
                self._release_auth(probe)
                with contextlib.suppress(Ms1Error):
                    self.limiter.cancel(token)
                abort.wait(min(wait, 0.5))
                continue
            return Admission(token, probe)

    def _gate(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self._clock())

    def _claim_auth(self) -> tuple[bool, float]:
        with self._lock:
            if self._paused_until > self._clock():
                return False, self._paused_until - self._clock()
            if not self._auth_blocked:
                return False, 0.0
            now = self._clock()
            if self._auth_probe_in_flight or now < self._next_auth_probe:
                return False, max(0.05, self._next_auth_probe - now)
            self._auth_probe_in_flight = True
            self._next_auth_probe = now + self.auth_probe_interval
            return True, 0.0

    def _release_auth(self, probe: bool) -> None:
        if probe:
            with self._lock:
                self._auth_probe_in_flight = False

    def done(self, admission: Admission, status: int | None,
             retry_after: str | None = None) -> None:
        """Record the outcome of an admitted request (``status`` None: no answer)."""
        try:
            self.limiter.finish(admission.token)
        except Ms1Error as exc:  # the slot then expires with its lease
            log.warning("could not stamp the rate-limit slot (%s)", exc)
        self._release_auth(admission.auth_probe)
        if status is None or status >= 500 or status in (404, 405) or status < 200:
            self.breaker.record(False)
        elif status == 429:
            self.breaker.release_probe()  # not a breaker failure
            self._pause(retry_after)
        elif status == 401:
            self.breaker.release_probe()
            self._auth_failed()
        else:
            self.breaker.record(True)
        if status is not None and status != 401:
            self._auth_ok(admission.auth_probe)

    def _pause(self, retry_after: str | None) -> None:
        delay = parse_retry_after(retry_after, default=self.retry_after_default,
                                  cap=self.retry_after_cap)
        with self._lock:
            until = self._clock() + delay
            if until > self._paused_until:
                self._paused_until = until
                log.warning("MS4 answered 429: all senders pause %.1f s (Retry-After: %r)",
                            delay, retry_after)

    def _auth_failed(self) -> None:
        with self._lock:
            if self._auth_blocked:
                return
            self._auth_blocked = True
            self._next_auth_probe = self._clock() + self.auth_probe_interval
        log.critical("MS4 answered 401 Unauthorized: the API key is rejected. All senders "
                     "stopped; every batch stays queued. Fix the key and reload (SIGHUP); "
                     "a probe is sent every %.0f s", self.auth_probe_interval)

    def _auth_ok(self, was_probe: bool) -> None:
        with self._lock:
            if not self._auth_blocked or not was_probe:
                return
            self._auth_blocked = False
        log.warning("MS4 accepts the API key again: sending resumes")

    def key_changed(self, api_key: Secret | None) -> None:
        """A new API key was loaded: end a 401 spell at once."""
        with self._lock:
            was = self._auth_blocked
            self._auth_blocked = False
            self._auth_probe_in_flight = False
        if was:
            log.warning("API key reloaded: sending resumes")
