"""Wrong admin tokens, throttled: a guesser gets a few tries, then waits longer and longer.

Each client address may give :data:`FREE_GUESSES` wrong tokens in a row; after that it must
wait before its next try — 1 s, doubling with each further wrong one, up to 15 minutes —
and a try made too early is answered 429 with ``Retry-After`` without the token being
looked at. Across all addresses, more than :data:`FLEET_GUESSES` wrong tokens in a minute
(a guesser with many addresses) make every address wait a minute. A right token clears
its address. One WARNING when an address begins to wait, not one per guess.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

log = logging.getLogger(__name__)

#: wrong tokens in a row an address may give before it must wait
FREE_GUESSES = 5
#: the first wait, and the longest
FIRST_WAIT, LONGEST_WAIT = 1.0, 900.0
#: wrong tokens a minute, from every address together, before every address waits
FLEET_GUESSES = 60
#: addresses remembered (the oldest forgotten first)
CLIENTS_KEPT = 10_000


class Throttle:
    """Thread-safe (the console's server threads share one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # wrong, until
        self._recent: deque[float] = deque()  # every wrong token's time, last minute
        self._all_until = 0.0

    def wait(self, client: str) -> float:
        """Seconds ``client`` must still wait before a token of its is looked at (0: now)."""
        now = self._clock()
        with self._lock:
            _, until = self._clients.get(client, (0, 0.0))
            return max(0.0, until - now, self._all_until - now)

    def failed(self, client: str) -> None:
        """``client`` gave a wrong token."""
        now = self._clock()
        with self._lock:
            wrong, _ = self._clients.pop(client, (0, 0.0))
            wrong += 1
            until = 0.0
            if wrong >= FREE_GUESSES:
                until = now + min(LONGEST_WAIT, FIRST_WAIT * 2 ** (wrong - FREE_GUESSES))
            self._clients[client] = (wrong, until)
            while len(self._clients) > CLIENTS_KEPT:
                self._clients.popitem(last=False)
            self._recent.append(now)
            while self._recent and self._recent[0] < now - 60:
                self._recent.popleft()
            everyone = len(self._recent) > FLEET_GUESSES and self._all_until <= now
            if everyone:
                self._all_until = now + 60
        if wrong == FREE_GUESSES:
            log.warning("console: %d wrong admin tokens in a row from %s: its next tries wait "
                        "(%g s, doubling up to %g s)", wrong, client, FIRST_WAIT, LONGEST_WAIT)
        if everyone:
            log.warning("console: more than %d wrong admin tokens in a minute: every token "
                        "try waits a minute", FLEET_GUESSES)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)
