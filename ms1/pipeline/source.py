"""Stage 1: where e-mails come from.

A :class:`Source` hands out :class:`~ms1.model.InboundMessage` records and is
told with ``ack`` once each one is safe elsewhere (in a durably enqueued batch
or in the dead letters). Built in: :class:`MemorySource` (tests, embedding) and
:class:`FileSource` (``*.json`` / ``*.jsonl`` files named on the command line).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ms1.errors import SourceError
from ms1.model import InboundMessage

log = logging.getLogger(__name__)

#: default bound of one e-mail read from a file (``[source.files] max_email_bytes``): the
#: default ``[batch] max_bytes``, as an e-mail larger than a whole request body is no invoice
MAX_EMAIL_BYTES = 1024 * 1024
#: bytes read at a time while skipping the rest of an over-long line
_SKIP_CHUNK = 64 * 1024
INPUT_SUFFIXES = (".json", ".jsonl")


class Source(ABC):
    """Contract of a source plugin. ``read`` is called from one thread only."""

    name: str = "?"
    #: seconds one call may block by design (its own timeouts), None: not bounded here;
    #: the service warns when ``[ms1] watchdog_timeout`` is not above it
    longest_call: float | None = None

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

    def skipped(self) -> Sequence[tuple[str, str]]:
        """Inputs this source could not read (wholly or in part): ``(input, why)`` each.
        Their e-mails were not processed; a ``--once`` run then exits 1."""
        return ()

    def unacked_fate(self) -> str:
        """What becomes of e-mails read but never acknowledged (not stored by the deadline),
        for the log line and the ``--once`` summary."""
        return (f"they stay unacknowledged in source {self.name!r} (a Redis source keeps "
                "them pending: read again by the next run)")

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

    def unacked_fate(self) -> str:
        return "they were only in this process's memory: LOST when it exits"


# --- reading input files: the rules FileSource and ``ms1-service enqueue`` share ----------

#: ``skip(input, why)``: called once for each input that could not be read (wholly)
OnSkip = Callable[[str, str], None]


def why(exc: OSError) -> str:
    """An OSError in a few words: ``not found``, ``permission denied``, ..."""
    if exc.errno == errno.ENOENT:
        return "not found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return (exc.strerror or str(exc)).lower()


def _kind(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is no input, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a special file")
    return f"is not a regular file ({kind})"


def input_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an input, found with ``stat`` only (a FIFO is never opened:
    that would block), or None when it looks readable."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return why(exc)
    problem = _kind(mode)
    if problem is None and path.suffix not in INPUT_SUFFIXES:
        problem = "not a *.json or *.jsonl file"
    return problem


def _reader(fd: int) -> BinaryIO:
    """A buffered reader on an open file descriptor (a seam for tests)."""
    return io.BufferedReader(io.FileIO(fd, "rb"))


def _open(path: Path) -> BinaryIO:
    """Open ``path`` for reading without ever blocking (O_NONBLOCK: a FIFO swapped in after
    the ``stat`` does not wait for a writer) and refuse anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        problem = _kind(os.fstat(fd).st_mode)
        if problem is not None:
            raise _NotAnInput(problem)
        os.set_blocking(fd, True)
        return _reader(fd)
    except BaseException:
        os.close(fd)
        raise


class _NotAnInput(Exception):
    """``path`` turned out not to be a regular file once opened."""


class _Position:
    """The last line of an input handed out (for the message about a read error)."""

    def __init__(self) -> None:
        self.line = 0


def _too_large(what: str, bound: int, size: int) -> str:
    return (f"{what} of {size} bytes is larger than {bound} bytes ([source.files] "
            f"max_email_bytes); only its first {bound} bytes were read")


def _emails_in(path: Path, fh: BinaryIO, max_bytes: int, at: _Position
               ) -> Iterator[InboundMessage]:
    """The e-mails of one open input; never reads more than ``max_bytes`` + 1 bytes at once.
    An over-long e-mail or line comes out clipped, with its ``problem``."""
    if path.suffix == ".json":
        data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            yield InboundMessage(str(path), data[:max_bytes], problem=_too_large(
                "e-mail", max_bytes, os.fstat(fh.fileno()).st_size))
        else:
            yield InboundMessage(str(path), data)
        return
    while line := fh.readline(max_bytes + 1):
        at.line += 1
        ref = f"{path}:{at.line}"
        if len(line) > max_bytes and not line.endswith(b"\n"):  # over the bound
            length = len(line)
            while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                length += len(rest)  # the rest of the line, never held whole
            length += len(rest.rstrip(b"\r\n"))
            yield InboundMessage(ref, line[:max_bytes],
                                 problem=_too_large("line", max_bytes, length))
        elif line.strip():
            yield InboundMessage(ref, line.rstrip(b"\r\n"))


def read_inputs(paths: Iterable[str | Path], max_bytes: int, skip: OnSkip
                ) -> Iterator[InboundMessage]:
    """Every e-mail in the ``*.json`` (one e-mail) and ``*.jsonl`` (one per line) files
    ``paths``, in order, reading at most ``max_bytes`` + 1 bytes at a time.

    Never raises for an input: one that cannot be read (missing, permission denied, a
    directory, a FIFO, a wrong name, a read error half-way) is passed to ``skip`` with the
    reason, and the next one is read. What was read of a file before a read error is kept.
    An e-mail (a ``.json``, a ``.jsonl`` line) over ``max_bytes`` is yielded clipped to
    ``max_bytes`` with ``problem`` set (the intake dead-letters it, stage ``source``).
    """
    for name in paths:
        path = Path(name)
        problem = input_problem(path)
        if problem is not None:
            skip(str(path), problem)
            continue
        at = _Position()
        try:
            with _open(path) as fh:
                yield from _emails_in(path, fh, max_bytes, at)
        except _NotAnInput as exc:
            skip(str(path), str(exc))
        except OSError as exc:
            where = f" after line {at.line} (lines 1-{at.line} were read)" if at.line else ""
            skip(str(path), f"{why(exc)}{where}")


class FileSource(Source):
    """E-mails from files: ``*.json`` holds one EmailMessage, ``*.jsonl`` one per line.

    Read by :func:`read_inputs`: an input that cannot be read is logged on one line (naming
    it and why) and listed by :meth:`skipped`, the others are read; nothing is read whole
    without the ``max_email_bytes`` bound. Each message's ref is ``path`` or
    ``path:line``. Files are not modified, so ``ack`` has nothing to do.
    """

    name = "files"

    def __init__(self, paths: Sequence[str | Path], *,
                 max_email_bytes: int = MAX_EMAIL_BYTES) -> None:
        self._paths = [Path(p) for p in paths]
        self._skipped: list[tuple[str, str]] = []
        self._records = read_inputs(self._paths, max_email_bytes, self._skip)
        self._done = False

    def _skip(self, name: str, reason: str) -> None:
        log.error("input file %s skipped: %s", name, reason)
        self._skipped.append((name, reason))

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

    def skipped(self) -> Sequence[tuple[str, str]]:
        return list(self._skipped)

    def unacked_fate(self) -> str:
        return "they stay in their input files, not processed: run them again"
