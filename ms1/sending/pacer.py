"""The pacer: whether and when the senders may send — shared by every sender thread.

:class:`Pacer` holds the four things that can hold a request back:

* the **rate limiter** (:mod:`ms1.sending.limiter`): at most N requests in any
  sliding window (default 120 per 60 s);
* a **429 pause**: every sender waits until ``Retry-After``
  (:mod:`ms1.sending.retry_after`) has passed;
* a **401 spell**: no sender sends until the API key changes (reload) or a
  slow probe — one request every ``auth_probe_interval`` s — is accepted;
* the **circuit breaker** (:mod:`ms1.sending.breaker`): opens after N consecutive
  failures (5xx, timeouts, connection errors), lets one probe through after
  ``reset_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from ms1.config import Secret
from ms1.errors import Ms1Error
from ms1.sending.breaker import Breaker
from ms1.sending.limiter import RateLimiter
from ms1.sending.retry_after import parse_retry_after

log = logging.getLogger(__name__)


class Aborted(Exception):
    """The shutdown deadline passed while waiting for permission to send."""


class Admission:
    """Permission for one request; hand it back to :meth:`Pacer.done`."""

    __slots__ = ("auth_probe", "key_generation", "token")

    def __init__(self, token: str, auth_probe: bool, key_generation: int = 0) -> None:
        self.token = token
        self.auth_probe = auth_probe
        #: which API key was current when the request was admitted (see key_changed)
        self.key_generation = key_generation


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
        self._key_generation = 0

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
            with self._lock:
                generation = self._key_generation
            return Admission(token, probe, generation)

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
            self._auth_failed(admission.key_generation)
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

    def _auth_failed(self, key_generation: int) -> None:
        with self._lock:
            if key_generation != self._key_generation:
                # sent with a key that has been replaced since: says nothing of the new one
                log.warning("MS4 answered 401 to a request sent with the previous API key; "
                            "the batch is sent again with the current key")
                return
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

    def configure(self, *, retry_after_default: float, retry_after_cap: float,
                  auth_probe_interval: float, breaker_failures: int,
                  breaker_reset: float) -> None:
        """New ``[send]`` figures (a reload); they hold from the next request or answer on.
        A running 429 pause or 401 probe interval keeps the end it was given."""
        with self._lock:
            self.retry_after_default = retry_after_default
            self.retry_after_cap = retry_after_cap
            self.auth_probe_interval = auth_probe_interval
        self.breaker.configure(breaker_failures, breaker_reset)

    def key_changed(self, api_key: Secret | None) -> None:
        """A new API key was loaded: end a 401 spell at once. A 401 answering a request
        admitted before this call is about the old key and starts no spell (key rotation:
        the key file is reloaded before MS4 switches, or while a probe is in flight)."""
        with self._lock:
            was = self._auth_blocked
            self._auth_blocked = False
            self._auth_probe_in_flight = False
            self._key_generation += 1
        if was:
            log.warning("API key reloaded: sending resumes")
