"""Stage 2b: batching, which groups accepted payloads into MS4 requests.

A :class:`BatchPolicy` is fed items one at a time by the single batching
thread and hands back the batches it closes. The built-in
:class:`SizeBatchPolicy` (plugin name ``batch``) closes a batch at
``max_items`` objects, before the JSON-array body would pass ``max_bytes``, or
``max_wait`` seconds after its first object — whichever comes first.
:class:`UnitPolicy` (plugin name ``unit``) is the old behaviour: one object per
request, sent to ``/metadata`` as a JSON object.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from ms1.model import BATCH_PATH, UNIT_PATH, Batch, Item


class BatchPolicy(ABC):
    """Contract of a batch policy plugin. Used by one thread only: no locking needed."""

    name: str = "?"

    @abstractmethod
    def oversize(self, item: Item) -> str | None:
        """Why this item can never be sent under this policy (too large), or None."""

    @abstractmethod
    def add(self, item: Item) -> list[Batch]:
        """Take the item; return the batches this closed (often none)."""

    @abstractmethod
    def deadline(self) -> float | None:
        """``time.monotonic()`` by which the open batch must be flushed; None if none is open."""

    @abstractmethod
    def flush(self) -> Batch | None:
        """Close the open (partial) batch now, if there is one."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release resources."""


class SizeBatchPolicy(BatchPolicy):
    """Close at ``max_items``, at ``max_bytes`` of request body, or after ``max_wait`` s."""

    name = "batch"
    path = BATCH_PATH
    #: bytes the framing adds: ``[`` ``]`` around, ``,`` between objects
    _open_close = 2
    _separator = 1

    def __init__(
        self, max_items: int = 50, max_bytes: int = 1_048_576, max_wait: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1 or max_bytes < 1 or max_wait < 0:
            raise ValueError("max_items and max_bytes must be >= 1, max_wait >= 0")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self._clock = clock
        self._items: list[Item] = []
        self._size = 0
        self._opened = 0.0

    def oversize(self, item: Item) -> str | None:
        size = len(item.payload) + self._open_close
        if size > self.max_bytes:
            return (f"object is {len(item.payload)} bytes: a request body may hold at most "
                    f"{self.max_bytes} bytes ([batch] max_bytes)")
        return None

    def add(self, item: Item) -> list[Batch]:
        closed: list[Batch] = []
        grown = self._size + self._separator + len(item.payload)
        if self._items and grown > self.max_bytes:
            closed.append(self._close())
        if self._items:
            self._size += self._separator + len(item.payload)
        else:
            self._opened = self._clock()
            self._size = self._open_close + len(item.payload)
        self._items.append(item)
        if len(self._items) >= self.max_items or self._size >= self.max_bytes:
            closed.append(self._close())
        return closed

    def deadline(self) -> float | None:
        return self._opened + self.max_wait if self._items else None

    def flush(self) -> Batch | None:
        return self._close() if self._items else None

    def _close(self) -> Batch:
        batch = Batch.of(self.path, self._items)
        self._items = []
        self._size = 0
        return batch


class UnitPolicy(SizeBatchPolicy):
    """The old behaviour: every object is its own request to ``/metadata``."""

    name = "unit"
    path = UNIT_PATH
    _open_close = 0

    def __init__(
        self, max_bytes: int = 1_048_576, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_items=1, max_bytes=max_bytes, max_wait=0.0, clock=clock)
