"""The invoice ledger in Redis (``[redis] ledger_key``, the same hash tag as every key):
one list per batch (``<key>:b:<batch id>``: its events as JSON), per-day index hashes
(``<key>:i:<day>:<bucket>``: invoice id or message id -> the batch ids it was in) and
per-read-day e-mail hashes (``<key>:e:<day>:<bucket>``: e-mail -> its outcome letter,
when it was read, its invoice id), every key with the retention as its time to live, so
retention never touches pending work (that lives in the outbound stream). One script
call per step (``scripts/ledger_record.lua``)."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ms1.errors import QueueError
from ms1.pipeline.ledger import OUTCOMES, Attempt, EmailState, Ledger, LedgerEvent, Trace

from .link import RedisLink, translated

#: index buckets per day: keeps each hash small (a listpack below ~128 fields at
#: 100,000 ids a day)
BUCKETS = 1024
#: keys per script call at most (a batch of 1,000 invoices indexes 2,000 ids; the script
#: loops over its keys, no unpack)
IDS_PER_CALL = 4000
#: an event whose e-mails may have been read on more days than this (a replay: any day
#: the retention keeps) has each e-mail's read day looked up first, by pipelined reads;
#: the script then looks on that day only, and the event's (it looked on every day, for
#: every e-mail: 1,000 e-mails and a year's retention made one call of 369,001 keys,
#: holding Redis)
LOOK_DAYS = 3
#: commands per pipeline when reading many keys
READS_PER_PIPELINE = 256
#: whole e-mail hashes per pipeline (``emails``): about a thousand e-mails each on a
#: million-e-mail day, so 32 hold some 32,000 at once (256 held 47.7 MB at the peak)
HASHES_PER_PIPELINE = 32


def day_of(at: float) -> int:
    """The UTC day number of ``at`` (``time.time()``)."""
    return int(at // 86400)


def bucket_of(id: str) -> int:
    return zlib.crc32(id.encode("utf-8", "surrogatepass")) % BUCKETS


#: the outcome letters as stored
_OUTCOMES = {letter.encode(): outcome for letter, outcome in OUTCOMES.items()}


def email_state(email: str, value: bytes | None) -> EmailState | None:
    """An e-mail hash's value as a state; None for one that is not (hostile)."""
    if not value:
        return None
    parts = value.decode("utf-8", "replace").split(" ", 2)
    try:
        read_at = float(parts[1])
        outcome = OUTCOMES[parts[0]]
    except (IndexError, KeyError, ValueError):
        return None
    if read_at != read_at:  # NaN
        return None
    return EmailState(email, parts[2] if len(parts) > 2 else "", outcome, read_at)


def event_json(event: LedgerEvent) -> str:
    return json.dumps({
        "kind": event.kind, "batch": event.batch_id, "at": event.at,
        "invoices": list(event.invoice_ids), "messages": list(event.message_ids),
        "refs": list(event.refs), "detail": event.detail, "parts": list(event.parts),
        "attempts": [[a.at, a.status, a.latency, a.traceparent] for a in event.attempts]},
        separators=(",", ":"))


def event_from_json(text: bytes | str) -> LedgerEvent | None:
    """The event a stored record holds; None for one that is not (hostile or a newer
    version's): the ledger reads defensively, as every reader of a stored record does."""
    try:
        data: Any = json.loads(text)
        attempts = tuple(Attempt(float(a[0]), None if a[1] is None else int(a[1]),
                                 float(a[2]), str(a[3]) if len(a) > 3 else "")
                         for a in data.get("attempts", []))
        return LedgerEvent(
            kind=str(data["kind"]), batch_id=str(data["batch"]), at=float(data["at"]),
            invoice_ids=tuple(map(str, data.get("invoices", []))),
            message_ids=tuple(map(str, data.get("messages", []))),
            refs=tuple(map(str, data.get("refs", []))), detail=str(data.get("detail", "")),
            parts=tuple(map(str, data.get("parts", []))), attempts=attempts)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None


class RedisLedger(Ledger):
    """The ledger on the Redis of the queue: shared by every instance."""

    name = "redis"

    def __init__(self, link: RedisLink, *, key: str, retention_days: float) -> None:
        self.link = link
        self.key = key
        self.retention_days = retention_days

    @property
    def _ttl(self) -> int:
        return max(1, int(self.retention_days * 86400) + 86400)  # + the day being written

    def _index_key(self, day: int, id: str) -> str:
        return f"{self.key}:i:{day}:{bucket_of(id)}"

    def _email_key(self, day: int, email: str) -> str:
        return f"{self.key}:e:{day}:{bucket_of(email)}"

    def _days(self, since: float | None, until: float) -> list[int]:
        """The days from ``since`` (None: the oldest the retention keeps) to ``until``,
        newest first."""
        oldest = time.time() - self.retention_days * 86400 - 86400
        first = day_of(oldest if since is None else max(since, oldest))
        return list(range(day_of(until), first - 1, -1)) or [day_of(until)]

    def record(self, events: Sequence[LedgerEvent]) -> None:
        if not events:
            return
        calls: list[tuple[list[str], list[str | int]]] = []
        keys: list[str] = []
        args: list[str | int] = []
        count = 0
        for event in events:
            ids = sorted({i for i in (*event.invoice_ids, *event.message_ids) if i})
            emails = event.emails()
            read = event.at if event.read_after is None else event.read_after
            days = self._days(min(read, event.at), max(read, event.at))  # clocks differ
            looks = [days] * len(emails)  # the days to look on, per e-mail
            if len(days) > LOOK_DAYS and emails:  # (a replay) where each was read, first
                held = self._find((email for email, _ in emails), days)
                looks = [[days[0]] if email not in held or held[email][0] == days[0]
                         else [days[0], held[email][0]] for email, _ in emails]
            size = 1 + len(ids) + sum(len(look) for look in looks)
            if count and len(keys) + size > IDS_PER_CALL:
                calls.append((keys, [self._ttl, count, *args]))
                keys, args, count = [], [], 0
            day = day_of(event.at)
            keys += [f"{self.key}:b:{event.batch_id}", *(self._index_key(day, i) for i in ids)]
            args += [event_json(event), event.batch_id, len(ids), *ids,
                     event.kind, f"{event.at:.3f}", len(emails)]
            for (email, invoice), look in zip(emails, looks, strict=True):
                keys += [self._email_key(d, email) for d in look]
                args += [email, invoice, len(look)]
            count += 1
        calls.append((keys, [self._ttl, count, *args]))
        with translated(QueueError, f"record {len(events)} ledger events", self.link):
            for call_keys, call_args in calls:
                self.link.script("ledger_record", call_keys, call_args)

    def trace(self, id: str) -> Trace | None:
        now = time.time()
        days = range(day_of(now - self.retention_days * 86400), day_of(now) + 1)
        with translated(QueueError, f"trace {id[:80]!r}", self.link):
            client = self.link.client
            pipe = client.pipeline(transaction=False)
            for day in days:
                pipe.hget(self._index_key(day, id), id)
            found = pipe.execute()
            batches: list[str] = []
            for value in found:
                for batch in (value or b"").decode("utf-8", "replace").split():
                    if batch not in batches:
                        batches.append(batch)
            if not batches:
                return None
            pipe = client.pipeline(transaction=False)
            for batch in batches:
                pipe.lrange(f"{self.key}:b:{batch}", 0, -1)
            lists = pipe.execute()
        events: list[LedgerEvent] = []
        for records in lists:
            for record in records or []:
                if not record:
                    continue
                event = event_from_json(record)
                if event is not None:
                    events.append(event)
        events.sort(key=lambda event: event.at)
        return Trace(id, tuple(events)) if events else None

    def emails(self, since: float, until: float) -> Iterator[EmailState]:
        # bucket by bucket across the days (an e-mail keeps its bucket from day to day),
        # so one read again on a later day is met in the same bucket and given once, its
        # newest state, while only one bucket's e-mails are held at a time
        make = EmailState._make
        days = self._days(since, until)[::-1]  # oldest first: the newest state wins
        step = max(1, HASHES_PER_PIPELINE // len(days))
        for first in range(0, BUCKETS, step):
            buckets = range(first, min(BUCKETS, first + step))
            with translated(QueueError, f"read the ledger's e-mails of days {days[0]}.."
                            f"{days[-1]}", self.link):
                pipe = self.link.client.pipeline(transaction=False)
                for bucket in buckets:
                    for day in days:
                        pipe.hgetall(f"{self.key}:e:{day}:{bucket}")
                found = pipe.execute()
            for n in range(len(buckets)):
                states: dict[bytes, EmailState] = {}
                for fields in found[n * len(days):(n + 1) * len(days)]:
                    for email, value in (fields or {}).items():  # email_state's rule, inline
                        parts = value.split(b" ", 2)
                        try:
                            read_at = float(parts[1])
                            outcome = _OUTCOMES[parts[0]]
                        except (IndexError, KeyError, ValueError):
                            continue  # hostile: not a state
                        if since <= read_at < until:  # NaN is neither
                            states[email] = make((email.decode("utf-8", "replace"),
                                                  parts[2].decode("utf-8", "replace")
                                                  if len(parts) > 2 else "", outcome,
                                                  read_at))
                yield from states.values()

    def outcomes(self, emails: Iterable[str]) -> dict[str, EmailState]:
        return {email: state for email, (_, state)
                in self._find(emails, self._days(None, time.time())).items()}

    def _find(self, emails: Iterable[str],
              days: Sequence[int]) -> dict[str, tuple[int, EmailState]]:
        """Where each e-mail's state is kept, and the state: its day (the newest of
        ``days`` that holds one). Pipelined reads, which never hold Redis for long."""
        wanted = list(dict.fromkeys(emails))
        found: dict[str, tuple[int, EmailState]] = {}
        step = max(1, READS_PER_PIPELINE // max(1, len(days)))
        for start in range(0, len(wanted), step):
            chunk = wanted[start:start + step]
            with translated(QueueError, f"read {len(chunk)} e-mails' outcomes", self.link):
                pipe = self.link.client.pipeline(transaction=False)
                for email in chunk:
                    for day in days:
                        pipe.hget(self._email_key(day, email), email)
                values = pipe.execute()
            for n, email in enumerate(chunk):
                row = values[n * len(days):(n + 1) * len(days)]
                for day, value in zip(days, row, strict=True):  # newest day first
                    state = email_state(email, value)
                    if state is not None:
                        found[email] = (day, state)
                        break
        return found
