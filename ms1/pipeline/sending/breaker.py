"""The circuit breaker: pybreaker's state machine, admission outside its lock.

pybreaker's ``call()`` holds a lock for the whole wrapped call, which would serialise
every sender's POST. Here admission is decided from the breaker's state and the outcome
is fed through ``call()`` with a trivial function afterwards, so its lock is never held
across I/O.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime

import pybreaker

log = logging.getLogger(__name__)


class _Failed(Exception):
    pass


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Failed


class _BreakerLog(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        #: the last failure fed in (``"503 Service Unavailable"``), named when it opens
        self.last_failure = ""

    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: object) -> None:
        old_name = getattr(old, "name", old)
        new_name = getattr(new, "name", new)
        if new_name == pybreaker.STATE_OPEN:
            last = f" (last: {self.last_failure})" if self.last_failure else ""
            log.error("circuit breaker open (was %s): MS4 is failing%s; next probe in %.1f s",
                      old_name, last, cb.reset_timeout)
        else:
            log.warning("circuit breaker %s (was %s)", new_name, old_name)


class Breaker:
    """pybreaker's state machine with admission outside its lock (see the module doc)."""

    def __init__(self, fail_max: int, reset_timeout: float) -> None:
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._log = _BreakerLog()
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, state_storage=self._storage,
            listeners=[self._log], throw_new_error_on_trip=False, name="ms4")
        self._lock = threading.Lock()
        self._probe = False

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    @property
    def last_failure(self) -> str:
        """The last failure recorded (``"409 Conflict"``, ``"no answer"``; empty: none)."""
        with self._lock:
            return self._log.last_failure

    @property
    def fail_max(self) -> int:
        return int(self._cb.fail_max)

    @property
    def reset_timeout(self) -> float:
        return float(self._cb.reset_timeout)

    def configure(self, fail_max: int, reset_timeout: float) -> None:
        """New figures (a reload): the failure count and an open breaker's wait so far
        are kept; the new ones hold from the next outcome and admission on."""
        with self._lock:
            self._cb.fail_max = fail_max
            self._cb.reset_timeout = reset_timeout

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
                    if opened.tzinfo is None:  # pybreaker < 1.3 stamps naive UTC (utcnow)
                        opened = opened.replace(tzinfo=UTC)
                    elapsed = (datetime.now(UTC) - opened).total_seconds()
                    left = self._cb.reset_timeout - elapsed
                if left > 0:
                    return False, left
                self._cb.half_open()
            if self._probe:
                return False, 0.05
            self._probe = True
            return True, 0.0

    def record(self, ok: bool, failure: str = "") -> None:
        """Feed one outcome through pybreaker (its lock is held only for a no-op);
        ``failure`` names a failed one (``"503 Service Unavailable"``) for the logs."""
        with self._lock:
            self._probe = False
            if not ok:
                self._log.last_failure = failure
            if ok and self._storage.counter == 0 and self._storage.state == pybreaker.STATE_CLOSED:
                return  # nothing for pybreaker to change: skip its machinery on the hot path
            with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError):
                self._cb.call(_succeed if ok else _fail)

    def release_probe(self) -> None:
        """An admitted request was not sent after all."""
        with self._lock:
            self._probe = False
