"""Dead letters: what will never reach MS4 as it is, kept with the reason.

Fed by the processor (invalid e-mails), the batcher (objects too large for any
batch) and the senders (objects MS4 rejected with 400). Built in:
:class:`MemoryDeadLetters` and :class:`JsonlDeadLetters` (an append-only file,
fsynced on every write).
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ms1.model import DeadLetter


class DeadLetterStore(ABC):
    """Contract of a dead-letter plugin. ``add`` is called from many threads."""

    name: str = "?"
    durable: bool = False

    @abstractmethod
    def add(self, letters: Sequence[DeadLetter]) -> None:
        """Keep these letters; when this returns they are safe (durably, if durable)."""

    @abstractmethod
    def list(self, limit: int = 100) -> builtins.list[DeadLetter]:
        """The oldest ``limit`` letters."""

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

    def add(self, letters: Sequence[DeadLetter]) -> None:
        with self._lock:
            self._letters.extend(letters)

    def list(self, limit: int = 100) -> builtins.list[DeadLetter]:
        with self._lock:
            return self._letters[:limit]

    def all(self) -> builtins.list[DeadLetter]:
        with self._lock:
            return list(self._letters)

    def count(self) -> int:
        with self._lock:
            return len(self._letters)


def letter_to_json(letter: DeadLetter) -> dict[str, Any]:
    """A JSON-able dict of a letter; the payload as text when it is UTF-8, else base64."""
    record: dict[str, Any] = {
        "reason": letter.reason, "stage": letter.stage, "message_id": letter.message_id,
        "invoice_id": letter.invoice_id, "source_ref": letter.source_ref,
        "ms4_answer": letter.ms4_answer, "at": letter.at, "id": letter.id,
    }
    try:
        record["payload"] = letter.payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(letter.payload).decode("ascii")
    return record


def letter_from_json(record: dict[str, Any]) -> DeadLetter:
    if "payload_b64" in record:
        payload = base64.b64decode(record["payload_b64"])
    else:
        payload = str(record.get("payload", "")).encode("utf-8")
    return DeadLetter(
        reason=record["reason"], stage=record["stage"], payload=payload,
        message_id=record.get("message_id"), invoice_id=record.get("invoice_id"),
        source_ref=record.get("source_ref"), ms4_answer=record.get("ms4_answer"),
        at=float(record.get("at", 0.0)), id=str(record.get("id", "")),
    )


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

    def add(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        with self._lock:
            lines = []
            for letter in letters:
                self._count += 1
                record = letter_to_json(letter)
                record["id"] = letter.id or str(self._count)
                lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            self._fh.write(b"".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def list(self, limit: int = 100) -> builtins.list[DeadLetter]:
        out: builtins.list[DeadLetter] = []
        with self._lock, self.path.open("rb") as fh:
            for line in fh:
                if len(out) >= limit:
                    break
                out.append(letter_from_json(json.loads(line)))
        return out

    def count(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._fh.close()
