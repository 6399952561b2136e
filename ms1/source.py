"""Stage 1: where e-mails come from.

A :class:`Source` hands out :class:`~ms1.model.InboundMessage` records and is
told with ``ack`` once each one is safe elsewhere (in a durably enqueued batch
or in the dead letters). Built in: :class:`MemorySource` (tests, embedding) and
:class:`FileSource` (``*.json`` / ``*.jsonl`` files named on the command line).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ms1.errors import SourceError
from ms1.model import InboundMessage


class Source(ABC):
    """Contract of a source plugin. ``read`` is called from one thread only."""

    name: str = "?"

    @abstractmethod
    def read(self, max_items: int, timeout: float) -> list[InboundMessage]:
        """Up to ``max_items`` messages; wait at most ``timeout`` seconds; ``[]`` if none came."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source has handed out everything it will ever have."""
        return False

    def ack(self, refs: Sequence[str]) -> None:  # noqa: B027 - optional for sources
        """The messages with these refs are safe; the source may forget them."""

    def push(self, emails: Sequence[bytes]) -> int:
        """Add e-mails to the source (``ms1-service enqueue``); return how many were added."""
        raise SourceError(f"source {self.name!r} cannot take e-mails: use a source that can "
                          "(redis, memory)")

    def describe(self) -> dict[str, object]:
        """Details for ``ms1-service status``."""
        return {"source": self.name}

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections and files."""


class MemorySource(Source):
    """An in-process source: ``push`` e-mails, ``end`` to make it finite.

    ``acked`` collects every acknowledged ref, so tests can check that nothing
    was acknowledged before it was safe.
    """

    name = "memory"

    def __init__(self, messages: Iterable[bytes] = (), *, finite: bool = False) -> None:
        self._pending: deque[InboundMessage] = deque()
        self._cond = threading.Condition()
        self._count = 0
        self._ended = finite
        self.acked: list[str] = []
        for data in messages:
            self.push_one(data)

    def push_one(self, data: bytes) -> str:
        with self._cond:
            self._count += 1
            ref = f"mem-{self._count}"
            self._pending.append(InboundMessage(ref, data))
            self._cond.notify()
        return ref

    def push(self, emails: Sequence[bytes]) -> int:
        for data in emails:
            self.push_one(data)
        return len(emails)

    def end(self) -> None:
        """No more messages will be pushed: once drained, the source is exhausted."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def read(self, max_items: int, timeout: float) -> list[InboundMessage]:
        with self._cond:
            if not self._pending and not self._ended:
                self._cond.wait(timeout)
            count = min(max_items, len(self._pending))
            return [self._pending.popleft() for _ in range(count)]

    @property
    def exhausted(self) -> bool:
        with self._cond:
            return self._ended and not self._pending

    def ack(self, refs: Sequence[str]) -> None:
        with self._cond:
            self.acked.extend(refs)


class FileSource(Source):
    """E-mails from files: ``*.json`` holds one EmailMessage, ``*.jsonl`` one per line.

    Files are checked for existence when the source is built; each message's ref
    is ``path`` or ``path:line``. Files are not modified, so ``ack`` has nothing
    to do.
    """

    name = "files"

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self._paths = [Path(p) for p in paths]
        for path in self._paths:
            if not path.is_file():
                raise SourceError(f"input file not found: {path}")
            if path.suffix not in (".json", ".jsonl"):
                raise SourceError(f"input file must be *.json or *.jsonl: {path}")
        self._records = self._iterate()
        self._done = False

    def _iterate(self) -> Iterator[InboundMessage]:
        for path in self._paths:
            try:
                if path.suffix == ".json":
                    yield InboundMessage(str(path), path.read_bytes())
                    continue
                with path.open("rb") as fh:
                    for lineno, line in enumerate(fh, 1):
                        if line.strip():
                            yield InboundMessage(f"{path}:{lineno}", line.rstrip(b"\r\n"))
            except OSError as exc:
                raise SourceError(f"cannot read input file {path}: {exc.strerror}") from exc

    def read(self, max_items: int, timeout: float) -> list[InboundMessage]:
        out: list[InboundMessage] = []
        for record in self._records:
            out.append(record)
            if len(out) >= max_items:
                return out
        self._done = True
        return out

    @property
    def exhausted(self) -> bool:
        return self._done
