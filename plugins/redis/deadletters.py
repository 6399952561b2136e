"""Dead letters in a Redis stream (``[redis] dead_letter_stream``), one letter per entry.

Fields: reason, stage, payload, at, and message_id, invoice_id, source_ref, ms4_answer,
payload_size and payload_sha256 (a clipped payload) when known; a letter's id is its entry
id. Every payload is cut to ``max_payload_bytes`` (:func:`ms1.pipeline.deadletters.clip`). Letters
from a Redis source on the same server are stored and their inbound entries acked in one
atomic step (:mod:`.commit`), in groups of at most :data:`LETTERS_PER_GROUP` letters, each
group with its own refs.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence

from ms1.errors import QueueError
from ms1.model import ENTRY_FORMAT, FORMAT_FIELD, DeadLetter
from ms1.pipeline.deadletters import DeadLetterStore, clip, decode_letter
from ms1.pipeline.source import Source

from .commit import EntryGroup, inbound_of, store
from .leases import decode
from .link import Fields, RedisLink, translated

#: letters stored (and their inbound entries acked) together: bounds one group's size
LETTERS_PER_GROUP = 100


def letter_fields(letter: DeadLetter) -> Fields:
    fields: Fields = {FORMAT_FIELD: str(ENTRY_FORMAT), "reason": letter.reason,
                      "stage": letter.stage, "payload": letter.payload, "at": repr(letter.at)}
    for key in ("message_id", "invoice_id", "source_ref", "ms4_answer", "payload_sha256"):
        value = getattr(letter, key)
        if value is not None:
            fields[key] = value
    if letter.payload_size is not None:
        fields["payload_size"] = str(letter.payload_size)
    return fields


def letter_from_fields(entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    """A letter from its stream entry, defensively (:func:`ms1.pipeline.deadletters.decode_letter`:
    a missing or unreadable field is said in ``malformed``, never an error)."""
    return decode_letter(lambda key: fields.get(key.encode()), fields.get(b"payload", b""),
                         entry_id)


class RedisDeadLetters(DeadLetterStore):
    """Dead letters in a Redis stream; ids are the stream entry ids."""

    name = "redis"
    durable = True

    def __init__(self, link: RedisLink, *, stream: str) -> None:
        self.link = link
        self.stream = stream

    def add(self, letters: Sequence[DeadLetter], source: Source | None = None) -> bool:
        inbound = inbound_of(source, self.link)
        groups: list[EntryGroup] = []
        for start in range(0, len(letters), LETTERS_PER_GROUP):
            chunk = clip(letters[start:start + LETTERS_PER_GROUP], self.max_payload_bytes)
            groups.append(([letter_fields(x) for x in chunk],
                           [x.source_ref for x in chunk if x.source_ref]))
        with translated(QueueError, f"store {len(letters)} dead letters", self.link):
            store(self.link, self.stream, groups, inbound)
        return inbound is not None

    def list(self, limit: int = 100, ids: Sequence[str] | None = None
             ) -> builtins.list[DeadLetter]:
        with translated(QueueError, f"read {self.stream}", self.link):
            if ids is None:
                entries = self.link.client.xrange(self.stream, count=limit)
            else:
                pipe = self.link.client.pipeline(transaction=False)
                for entry_id in ids:
                    pipe.xrange(self.stream, min=entry_id, max=entry_id, count=1)
                entries = [e for found in pipe.execute() for e in found][:limit]
        return [letter_from_fields(decode(i), f) for i, f in entries]

    def scan(self, after: str | None = None, limit: int = 100) -> builtins.list[DeadLetter]:
        """One XRANGE from just after entry ``after`` (gone or not: ids are ordered)."""
        if limit <= 0:
            return []
        start = "-" if after is None else f"({after}"
        with translated(QueueError, f"read {self.stream}", self.link):
            entries = self.link.client.xrange(self.stream, min=start, max="+", count=limit)
        return [letter_from_fields(decode(i), f) for i, f in entries]

    def remove(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        with translated(QueueError, f"delete from {self.stream}", self.link):
            return int(self.link.client.xdel(self.stream, *ids))

    def count(self) -> int:
        with translated(QueueError, f"count {self.stream}", self.link):
            return int(self.link.client.xlen(self.stream))

    def close(self) -> None:
        self.link.release()
