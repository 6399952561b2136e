"""Progress of the pipeline threads, for the watchdog and ``/healthz``.

A thread that is alive is not necessarily working: a sender can sit inside one request
that never ends, a committer inside a call that never returns. systemd's watchdog must
restart such a process — and must *not* restart one that is correctly waiting out a
Redis or MS4 outage. So every pipeline thread tells :class:`Progress`:

More: docs/internals.md, ``ms1.heartbeat``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stall:
    """A thread that has shown no progress for ``seconds`` while ``doing`` something."""

    thread: str
    seconds: float
    doing: str

    def __str__(self) -> str:
        return f"{self.thread}: no progress for {self.seconds:.0f} s ({self.doing})"


class Progress:
    """Last sign of life of each pipeline thread. Thread-safe; cheap to call often."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._doing: dict[str, str] = {}
        self._waiting: dict[str, int] = {}

    def beat(self, thread: str, doing: str = "working") -> None:
        """``thread`` made progress (or went round its loop) now; ``doing`` says what it
        is about to do, for the message should it stall there."""
        now = self._clock()
        with self._lock:
            self._last[thread] = now
            self._doing[thread] = doing

    @contextmanager
    def waiting(self, thread: str, why: str) -> Iterator[None]:
        """Within this block ``thread`` is in a wait bounded by design (it never counts
        as stalled); leaving the block is progress."""
        with self._lock:
            self._waiting[thread] = self._waiting.get(thread, 0) + 1
            self._doing[thread] = why
        try:
            yield
        finally:
            now = self._clock()
            with self._lock:
                left = self._waiting.get(thread, 1) - 1
                if left:
                    self._waiting[thread] = left
                else:
                    self._waiting.pop(thread, None)
                self._last[thread] = now

    def leave(self, thread: str) -> None:
        """``thread`` has ended on purpose: forget it."""
        with self._lock:
            self._last.pop(thread, None)
            self._doing.pop(thread, None)
            self._waiting.pop(thread, None)

    def stalled(self, limit: float) -> list[Stall]:
        """Threads that showed no progress for more than ``limit`` s outside a bounded
        wait, longest first."""
        now = self._clock()
        with self._lock:
            stalls = [Stall(name, now - last, self._doing.get(name, "?"))
                      for name, last in self._last.items()
                      if name not in self._waiting and now - last > limit]
        return sorted(stalls, key=lambda s: -s.seconds)

    def doing(self) -> dict[str, str]:
        """What each known thread is doing or waiting for (for status lines)."""
        with self._lock:
            return dict(self._doing)


#: seconds past its own allowance a call may take before its part counts as not answering
SLOW_CALL = 2.0


class Outage:
    """Whether one part of the pipeline (reading the source, storing batches, taking and
    settling them, the rate limiter) can do its work now, as all its threads see it.

    * :meth:`failed` / :meth:`answered` — the first thread to find it failing logs one
      ERROR, the first to find it working again one WARNING: one pair of lines per outage
      for all the threads, not one per thread;
    * :meth:`calling` — brackets a call in progress, so a call that hangs (a Redis under
      ``CLIENT PAUSE``, a write blocked) counts as an outage before its own timeout ends it;
    * :meth:`problem` — why the part cannot work now, for ``/readyz``: readiness follows
      whether the pipeline stores and sends, not only whether Redis answers a PING.
    """

    def __init__(self, part: str, *, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``part``: what the part does, as ``/readyz`` names it; ``logger``: the one its
        lines go to (the module of the threads that use it)."""
        self.part = part
        self._log = logger if logger is not None else log
        self._clock = clock
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._calls: dict[int, tuple[float, float]] = {}  # thread id: (start, allowance)

    @property
    def down(self) -> bool:
        return self._reason is not None

    def failed(self, text: str, *args: object) -> None:
        """A call failed; ``text % args`` is the reason (logged once per outage)."""
        reason = text % args if args else text
        with self._lock:
            first = self._reason is None
            self._reason = reason
        if first:
            self._log.error("%s", reason)

    def answered(self, text: str, *args: object) -> None:
        """A call succeeded; logs ``text % args`` if that ends an outage."""
        with self._lock:
            if self._reason is None:
                return
            self._reason = None
        self._log.warning(text, *args)

    @contextmanager
    def calling(self, allowance: float = 0.0) -> Iterator[None]:
        """Within this block the calling thread waits for an answer; one that takes longer
        than ``allowance`` (a blocking read's own wait) + :data:`SLOW_CALL` s is an
        outage while it lasts."""
        ident = threading.get_ident()
        with self._lock:
            self._calls[ident] = (self._clock(), allowance)
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(ident, None)

    def problem(self) -> str | None:
        """None while the part works; else why not (its last failure, or the call that
        has not answered for longest)."""
        now = self._clock()
        with self._lock:
            if self._reason is not None:
                return self._reason
            late = [now - start for start, allowance in self._calls.values()
                    if now - start > allowance + SLOW_CALL]
        if late:
            return f"{self.part}: no answer for {max(late):.0f} s"
        return None


def call_within(call: Callable[[], T], timeout: float, what: str) -> T:
    """``call()`` in a daemon thread of its own, waited for at most ``timeout`` seconds.

    Returns its result or raises its exception; raises :class:`TimeoutError` (naming
    ``what``) when it has not returned in time. The call then goes on in its thread, and
    its result is dropped: for calls that are safe to abandon (reading a count, closing
    connections at exit) when a deadline matters more than their answer.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"bounded: {what}"[:60], daemon=True).start()
    if not done.wait(max(0.0, timeout)):
        raise TimeoutError(f"{what}: no answer within {timeout:.1f} s")
    if failure:
        raise failure[0]
    return outcome[0]
