"""How many requests to MS4 may be in flight at once: the gate and its controller.

The service runs a fixed pool of sender threads; each takes a batch, then a slot of the
:class:`Gate` before its attempt (the pacer's admission, the request, the answer) and
gives it back after: a sender without a batch holds no slot, so at light load no more
is in flight than there is work.

The :class:`Controller` sizes the gate:

More: docs/internals.md, ``ms1.pipeline.sending.concurrency``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ms1.pipeline.sending.answers import Answer, Kind
from ms1.pipeline.sending.pacer import Aborted, Left

#: Little's law headroom: target = rate * latency * HEADROOM + EXTRA
HEADROOM = 1.5
EXTRA = 1
#: Little's-law part of the target before any latency was observed
INITIAL = 4
#: EWMA weights of the latency: the one Little's law reads, and the slow baseline the
#: rising-latency check compares it with
FAST = 0.2
SLOW = 0.02
#: latency above this many times its slow average counts as rising (congestion)
RISING = 2.0
#: the cap's cut on rising latency; on a failure it halves
LATENCY_CUT = 0.75
#: samples before the rising-latency check trusts its baseline
WARMUP = 10


class Gate:
    """A semaphore whose size can change: at most ``size`` slots held at once. Lowering
    the size takes nothing back; new slots are given only below the new size."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._size = size
        self._held = 0
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        with self._cond:
            return self._size

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    def resize(self, size: int) -> None:
        with self._cond:
            size = max(1, size)
            grew = size > self._size
            self._size = size
            if grew:  # only a larger size lets a waiter through
                self._cond.notify_all()

    def acquire(self, abort: threading.Event, poll: float = 0.2,
                leave: Callable[[], bool] | None = None) -> None:
        """Take a slot, waiting for one; raise :class:`Aborted` once ``abort`` is set (seen
        within ``poll`` s: an Event cannot wake a Condition) — the pacer's, which the
        sender already handles — and :class:`~ms1.pipeline.sending.pacer.Left` once ``leave()``
        is true while it waits (as :meth:`Pacer.admit <ms1.pipeline.sending.pacer.Pacer.admit>`)."""
        with self._cond:
            while self._held >= self._size:
                if abort.is_set():
                    raise Aborted
                if leave is not None and leave():
                    raise Left
                self._cond.wait(poll)
            if abort.is_set():
                raise Aborted
            self._held += 1

    def release(self) -> None:
        with self._cond:
            self._held = max(0, self._held - 1)
            self._cond.notify()


class Controller:
    """Sets the :class:`Gate`'s size from the rate the limiter allows, the observed latency
    and failures (see the module text). Thread-safe; senders call :meth:`observe` after
    every answered (or unanswered) request."""

    def __init__(
        self, *, rate: Callable[[], float], held_back: Callable[[], bool],
        min_concurrency: int = 1, max_concurrency: int = 64, fixed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate``: requests per second the limiter allows now; ``held_back``: True while
        the pacer holds every sender back (no growth then)."""
        self._rate = rate
        self._held_back = held_back
        self._clock = clock
        self._lock = threading.Lock()
        self._min = 1
        self._max = 1
        self._fixed: int | None = None
        self._latency: float | None = None  # fast EWMA: what Little's law reads
        self._baseline: float | None = None  # slow EWMA: what "rising" compares with
        self._samples = 0
        self._next_cut = 0.0
        #: the AIMD cap: starts at max_concurrency (MS4's window allows its whole budget at
        #: once), halved on failures, grown by one per accepted request
        self._cap = float(max_concurrency)
        self._free = 0  # the limiter's free_hint at its last grant
        self._target = 1
        self.gate = Gate(1)
        self.configure(min_concurrency=min_concurrency, max_concurrency=max_concurrency,
                       fixed=fixed)

    def configure(self, *, min_concurrency: int, max_concurrency: int,
                  fixed: int | None) -> None:
        """New bounds, or a fixed concurrency (None: adaptive); they hold at once."""
        if min_concurrency < 1 or max_concurrency < min_concurrency:
            raise ValueError("need 1 <= min_concurrency <= max_concurrency")
        with self._lock:
            self._min, self._max, self._fixed = min_concurrency, max_concurrency, fixed
            self._cap = max(float(min_concurrency), min(self._cap, float(max_concurrency)))
            self._set(self._want())

    @property
    def adaptive(self) -> bool:
        with self._lock:
            return self._fixed is None

    @property
    def target(self) -> int:
        """The gate's size now: most requests in flight (``ms1_concurrency_target``)."""
        with self._lock:
            return self._target

    @property
    def latency(self) -> float | None:
        """The EWMA of accepted requests' latency, seconds (None: none seen yet)."""
        with self._lock:
            return self._latency

    @property
    def pool(self) -> int:
        """Sender threads the service should run: the most the gate can ever let through."""
        with self._lock:
            return self._fixed if self._fixed is not None else self._max

    @property
    def lookahead(self) -> float:
        """How far ahead the limiter's free-slot hint should look: 1.5 latencies (0 before
        one is known)."""
        with self._lock:
            return (self._latency or 0.0) * HEADROOM

    def admitted(self, free: int | None) -> None:
        """The limiter granted a slot and lets ``free`` more go within :attr:`lookahead`
        (None: it cannot say): the target follows at once."""
        if self._fixed is not None:
            return
        held = self._held_back()
        with self._lock:
            self._free = max(0, free or 0)
            self._follow(self._want(), held)

    def observe(self, answer: Answer, latency: float) -> None:
        """A request ended with ``answer`` (no answer: ``classify(None)``) after
        ``latency`` s; adjust the target."""
        if self._fixed is not None:  # fixed concurrency: nothing to adjust
            return
        held = self._held_back()
        with self._lock:
            previous = self._target
            kind = answer.kind
            if kind is Kind.ACCEPTED:
                rising = self._sample(latency)
                if rising:
                    now = self._clock()
                    if now >= self._next_cut:
                        self._cap = max(float(self._min),
                                        min(self._cap, float(previous)) * LATENCY_CUT)
                        self._next_cut = now + latency
                elif not held:
                    self._cap = min(float(self._max), self._cap + 1)
            elif kind.breaker_failure:
                self._cap = max(float(self._min), min(self._cap, float(previous)) / 2)
            self._follow(self._want(), held)

    def _sample(self, latency: float) -> bool:
        """Fold ``latency`` into the averages; True if it rose past RISING * baseline."""
        self._samples += 1
        if self._latency is None or self._baseline is None:
            self._latency = self._baseline = latency
            return False
        self._latency += FAST * (latency - self._latency)
        self._baseline += SLOW * (latency - self._baseline)
        return self._samples > WARMUP and self._latency > RISING * self._baseline

    def _want(self) -> int:
        """The larger of the window's hint and the steady rate's share (before any latency
        is known: INITIAL)."""
        if self._latency is None:
            steady = INITIAL
        else:
            steady = math.ceil(self._rate() * self._latency * HEADROOM + EXTRA)
        return max(steady, self._free + EXTRA)

    def _follow(self, target: int, held: bool) -> None:
        """Set ``target``, but never higher than now while the pacer holds every sender
        back (a stop's probe, an answer during a 429 pause)."""
        self._set(min(target, self._target) if held else target)

    def _set(self, target: int) -> None:
        if self._fixed is not None:
            target = self._fixed
        else:
            target = max(self._min, min(self._max, int(self._cap), target))
        self._target = target
        self.gate.resize(target)
