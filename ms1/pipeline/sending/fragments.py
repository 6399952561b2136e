"""Fragments joined again after a refusal storm (issue 21).

More: docs/internals.md, ``ms1.pipeline.sending.fragments``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ms1.pipeline.outbound import Delivery

#: the longest a fragment parked alone waits for another to join (seconds)
PARK_WAIT = 2.0


@dataclass(frozen=True)
class Limits:
    """What one merged batch may hold: ``[batch] max_items`` and ``max_bytes``."""

    max_items: int
    max_bytes: int


class Fragments:
    """The fragments parked by senders while a refusal storm holds them, shared by
    every sender of the process. ``limits`` is read at each merge (a reload may change
    the batch limits)."""

    def __init__(self, limits: Callable[[], Limits], wait: float = PARK_WAIT) -> None:
        #: what one merged batch may hold, now
        self.limits = limits
        self._wait = wait
        self._cond = threading.Condition()
        self._parked: list[Delivery] = []
        self._taken: set[str] = set()

    def park(self, delivery: Delivery, holding: Callable[[], bool],
             abort: threading.Event) -> list[Delivery] | None:
        """Park ``delivery`` (a fragment, while a storm holds sending). Returns:

        * a list — ``delivery`` and the parked fragments that fit one batch with it: the
          caller merges them (and releases the others if it cannot);
        * ``[]`` — another sender took ``delivery`` into its merge: nothing left to do;
        * None — send ``delivery`` as it is (no partner came within the wait, the storm
          ended, or the shutdown began)."""
        with self._cond:
            group = self._fit(delivery)
            if len(group) > 1:
                for partner in group[1:]:
                    self._parked.remove(partner)
                    self._taken.add(partner.token)
                self._cond.notify_all()
                return group
            self._parked.append(delivery)
            deadline = time.monotonic() + self._wait
            try:
                while delivery.token not in self._taken:
                    left = deadline - time.monotonic()
                    if left <= 0 or abort.is_set() or not holding():
                        return None
                    self._cond.wait(min(left, 0.2))
                self._taken.discard(delivery.token)
                return []
            finally:
                if delivery in self._parked:
                    self._parked.remove(delivery)

    def _fit(self, delivery: Delivery) -> list[Delivery]:
        """``delivery`` and the parked fragments of its path that fit one batch with it,
        oldest first."""
        limits = self.limits()
        group, items, size = [delivery], len(delivery.batch), delivery.batch.body_size
        for parked in self._parked:
            if parked.batch.path != delivery.batch.path:
                continue
            grown_items = items + len(parked.batch)
            grown_size = size + parked.batch.body_size - 1  # one "[" "]" pair less, one ","
            if grown_items > limits.max_items or grown_size > limits.max_bytes:
                continue
            group.append(parked)
            items, size = grown_items, grown_size
        return group
