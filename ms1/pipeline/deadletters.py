"""Dead letters: what will never reach MS4 as it is, kept with the reason.

Fed by the processor (invalid e-mails), the batcher (objects too large for any
batch) and the senders (objects MS4 rejected with 400). Built in:
:class:`MemoryDeadLetters` and :class:`JsonlDeadLetters` (an append-only file,
fsynced on every write).

More: docs/internals.md, ``ms1.pipeline.deadletters``.
"""

from __future__ import annotations

import base64
import bisect
import builtins
import dataclasses
import hashlib
import json
import math
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ms1.model import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    ENTRY_FORMAT,
    FORMAT_FIELD,
    DeadLetter,
    entry_format,
)
from ms1.pipeline.source import Source

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "DeadLetterStore", "JsonlDeadLetters",
           "MemoryDeadLetters", "clip", "letter_from_json", "letter_to_json"]


def clip(letters: Sequence[DeadLetter], max_bytes: int) -> builtins.list[DeadLetter]:
    """``letters`` with every payload cut to ``max_bytes`` (:meth:`DeadLetter.clipped`)."""
    return [letter.clipped(max_bytes) for letter in letters]


class DeadLetterStore(ABC):
    """Contract of a dead-letter plugin. ``add`` is called from many threads.

    ``add`` stores ``clip(letters, self.max_payload_bytes)``: no letter keeps more than
    that many bytes of its payload.
    """

    name: str = "?"
    durable: bool = False
    #: most payload bytes a stored letter keeps ([dead_letters] max_payload_bytes)
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    @abstractmethod
    def add(self, letters: Sequence[DeadLetter], source: Source | None = None) -> bool:
        """Keep these letters; when this returns they are safe (durably, if durable).

        Like :meth:`ms1.pipeline.outbound.QueueBackend.put`: returns True if it also
        acknowledged the letters' ``source_ref`` s at ``source`` in the same atomic step.
        """

    @abstractmethod
    def list(self, limit: int = 100, ids: Sequence[str] | None = None
             ) -> builtins.list[DeadLetter]:
        """The oldest ``limit`` letters, or those with these ``ids``; each has its ``id``."""

    def scan(self, after: str | None = None, limit: int = 100) -> builtins.list[DeadLetter]:
        """Up to ``limit`` letters in the store's order (oldest first) that come after the
        letter with id ``after`` (from the first when None): a page, for the console's
        dead-letter browser; the next page is ``scan(page[-1].id)``. Letters removed since
        (a replay) leave no gap where the store's ids are ordered (memory, redis); a store
        whose ids are not (jsonl) starts over from the oldest when ``after`` is gone.

        This default reads everything through :meth:`list`; stores override it to read one
        page only."""
        letters = self.list(limit=2**31)
        if after is not None:
            ids = [letter.id for letter in letters]
            letters = letters[ids.index(after) + 1:] if after in ids else letters
        return letters[:limit]

    def iterate(self, limit: int | None = None, page: int = 500) -> Iterator[DeadLetter]:
        """Every letter (at most ``limit``), oldest first, read :meth:`scan` page by page."""
        after: str | None = None
        seen = 0
        while limit is None or seen < limit:
            want = page if limit is None else min(page, limit - seen)
            letters = self.scan(after, want)
            yield from letters
            seen += len(letters)
            if len(letters) < want:
                return
            after = letters[-1].id

    @abstractmethod
    def remove(self, ids: Sequence[str]) -> int:
        """Forget these letters (after a replay); return how many were removed."""

    @abstractmethod
    def count(self) -> int:
        """How many letters are kept."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release files and connections."""


class MemoryDeadLetters(DeadLetterStore):
    """In-process dead letters (tests, demos): lost when the process ends."""

    name = "memory"

    def __init__(self) -> None:
        self._letters: list[DeadLetter] = []
        self._lock = threading.Lock()
        self._seq = 0

    def add(self, letters: Sequence[DeadLetter], source: Source | None = None) -> bool:
        with self._lock:
            for letter in clip(letters, self.max_payload_bytes):
                self._seq += 1
                self._letters.append(dataclasses.replace(letter, id=str(self._seq)))
        return False

    def list(self, limit: int = 100, ids: Sequence[str] | None = None
             ) -> builtins.list[DeadLetter]:
        with self._lock:
            if ids is not None:
                wanted = set(ids)
                return [letter for letter in self._letters if letter.id in wanted][:limit]
            return self._letters[:limit]

    def scan(self, after: str | None = None, limit: int = 100) -> builtins.list[DeadLetter]:
        """Ids are increasing numbers: a page starts after ``after`` even if it is gone."""
        with self._lock:
            if after is None:
                return self._letters[:limit]
            try:
                mark = int(after)
            except ValueError:
                return []
            start = bisect.bisect_right(self._letters, mark, key=lambda x: int(x.id))
            return self._letters[start:start + limit]

    def remove(self, ids: Sequence[str]) -> int:
        wanted = set(ids)
        with self._lock:
            before = len(self._letters)
            self._letters = [letter for letter in self._letters if letter.id not in wanted]
            return before - len(self._letters)

    def all(self) -> builtins.list[DeadLetter]:
        with self._lock:
            return list(self._letters)

    def count(self) -> int:
        with self._lock:
            return len(self._letters)


def letter_to_json(letter: DeadLetter) -> dict[str, Any]:
    """A JSON-able dict of a letter; the payload as text when it is UTF-8, else base64."""
    record: dict[str, Any] = {
        FORMAT_FIELD: ENTRY_FORMAT, "reason": letter.reason, "stage": letter.stage,
        "message_id": letter.message_id,
        "invoice_id": letter.invoice_id, "source_ref": letter.source_ref,
        "ms4_answer": letter.ms4_answer, "at": letter.at, "id": letter.id,
    }
    if letter.payload_size is not None:
        record["payload_size"] = letter.payload_size
        record["payload_sha256"] = letter.payload_sha256
    if letter.malformed:
        record["malformed"] = letter.malformed
    try:
        record["payload"] = letter.payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(letter.payload).decode("ascii")
    return record


#: the latest time a stored letter may claim (a later or unreadable one reads as 0)
LATEST_AT = 1e11


def decode_letter(field: Callable[[str], object], payload: bytes, letter_id: str,
                  problems: list[str] | None = None) -> DeadLetter:
    """A stored dead letter read defensively — the one decoder of every store: ``field``
    gives a stored field (None: missing; bytes or anything else is made text). A field
    that is missing or unreadable is read as empty (a time as 0, a size as none) and said
    in :attr:`DeadLetter.malformed`, never an error."""
    problems = list(problems or [])
    try:  # a newer ms1's letter: shown as such, kept by replay (a malformed letter is)
        entry_format(field(FORMAT_FIELD))
    except ValueError as exc:
        problems.append(str(exc))

    def text(name: str, required: bool = False) -> str | None:
        value = field(name)
        if value is None:
            if required:
                problems.append(f"no {name}")
            return None
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value if isinstance(value, str) else str(value)

    at = 0.0
    raw_at = text("at", required=True)
    if raw_at is not None:
        try:
            at = float(raw_at)
        except ValueError:
            at = math.nan
        if not 0 <= at <= LATEST_AT:  # NaN, inf, negative, far future
            problems.append(f"at {raw_at[:40]!r} is not a time")
            at = 0.0
    size: int | None = None
    raw_size = text("payload_size")
    if raw_size is not None:
        try:
            size = int(raw_size)
        except ValueError:
            size = -1
        if not 0 <= size <= 1 << 40:
            problems.append(f"payload_size {raw_size[:40]!r} is not a size")
            size = None
    return DeadLetter(
        reason=text("reason", required=True) or "", stage=text("stage", required=True) or "",
        payload=payload, message_id=text("message_id"), invoice_id=text("invoice_id"),
        source_ref=text("source_ref"), ms4_answer=text("ms4_answer"), at=at, id=letter_id,
        payload_size=size, payload_sha256=text("payload_sha256"),
        malformed="; ".join(problems) or None)


def letter_from_json(record: object) -> DeadLetter:
    """A letter from one JSON record of a store (defensively: :func:`decode_letter`)."""
    fields = record if isinstance(record, dict) else {}
    problems = [] if isinstance(record, dict) else ["not a JSON object"]
    payload = b""
    try:
        if "payload_b64" in fields:
            payload = base64.b64decode(str(fields["payload_b64"]), validate=True)
        else:
            payload = str(fields.get("payload", "")).encode("utf-8", "replace")
    except ValueError:
        problems.append("payload_b64 is not base64")
    return decode_letter(fields.get, payload, str(fields.get("id", "")), problems)


def _line_record(line: bytes) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _line_id(line: bytes) -> str:
    """The ``id`` of one line of a :class:`JsonlDeadLetters` file (a line that is no JSON
    object gets one from its content, so it can be listed and removed like any other)."""
    record = _line_record(line)
    if isinstance(record, dict) and "id" in record:
        return str(record["id"])
    return "bad-" + hashlib.sha256(line.strip()).hexdigest()[:16]


def _letter_of_line(line: bytes) -> DeadLetter:
    """The letter of one line, defensively: a line that is no JSON keeps its raw bytes as
    the payload and says so."""
    record = _line_record(line)
    if record is None:
        return DeadLetter(reason="", stage="", payload=line.strip(), at=0.0,
                          id=_line_id(line), malformed="not a JSON line")
    letter = letter_from_json(record)
    return letter if letter.id else dataclasses.replace(letter, id=_line_id(line))


class JsonlDeadLetters(DeadLetterStore):
    """Dead letters appended to a JSON-lines file, fsynced before ``add`` returns."""

    name = "jsonl"
    durable = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = self.path.open("ab")
        with self.path.open("rb") as existing:
            self._count = sum(1 for _ in existing)

    def add(self, letters: Sequence[DeadLetter], source: Source | None = None) -> bool:
        if not letters:
            return False
        with self._lock:
            lines = []
            for letter in clip(letters, self.max_payload_bytes):
                record = letter_to_json(letter)
                record["id"] = uuid.uuid4().hex[:16]
                lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            self._fh.write(b"".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._count += len(lines)
        return False

    def _read(self) -> builtins.list[DeadLetter]:
        with self.path.open("rb") as fh:
            return [_letter_of_line(line) for line in fh if line.strip()]

    def list(self, limit: int = 100, ids: Sequence[str] | None = None
             ) -> builtins.list[DeadLetter]:
        with self._lock:
            letters = self._read()
        if ids is not None:
            wanted = set(ids)
            letters = [letter for letter in letters if letter.id in wanted]
        return letters[:limit]

    def scan(self, after: str | None = None, limit: int = 100) -> builtins.list[DeadLetter]:
        """Reads the file up to the end of the page (ids are random: a page after a letter
        that is gone starts over from the oldest)."""
        page: builtins.list[DeadLetter] = []
        with self._lock, self.path.open("rb") as fh:
            if after is not None:
                for line in fh:
                    if line.strip() and _line_id(line) == after:
                        break
                else:
                    fh.seek(0)
            for line in fh:
                if len(page) >= limit:
                    break
                if line.strip():
                    page.append(_letter_of_line(line))
        return page

    def remove(self, ids: Sequence[str]) -> int:
        """Rewrite the file without these letters (atomically, via a temp file + rename)."""
        wanted = set(ids)
        with self._lock:
            letters = self._read()
            keep = [letter for letter in letters if letter.id not in wanted]
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            with tmp.open("wb") as fh:
                for letter in keep:
                    fh.write(json.dumps(letter_to_json(letter), ensure_ascii=False)
                             .encode("utf-8") + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._fh.close()
            os.replace(tmp, self.path)
            self._fh = self.path.open("ab")
            self._count = len(keep)
            return len(letters) - len(keep)

    def count(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._fh.close()
