"""Reading a stream through its consumer group, and the entries this process holds.

An entry read with XREADGROUP is *held* (pending for this consumer) until it is acked.
:class:`Held` remembers which entries this process holds and, from the link's heartbeat,
re-claims them (XCLAIM JUSTID) every ``visibility_timeout / 3`` s so they never look idle.
:class:`Claimer` hands out pending entries this consumer should (re)take: first its own
from a previous life (re-read once, at start), then those idle past the visibility
timeout — held by a dead consumer — taken over with XAUTOCLAIM.

Also here: :func:`read_group` (XREADGROUP, one stream), :func:`ensure_group`,
:func:`describe_stream`, and :func:`raw_fields`, the lossless text form of an entry that
is set aside (its fields as JSON, base64 where not UTF-8).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

import redis

from ms1.errors import Ms1Error, QueueError

from .link import RedisLink, translated

log = logging.getLogger(__name__)
#: one stream entry as read: its id, and its fields (None: deleted while pending)
Entry = tuple[str, dict[bytes, bytes] | None]
#: ids per XCLAIM of the heartbeat
REFRESH_CHUNK = 1000


def decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ensure_group(link: RedisLink, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists: once per link, and
    again after Redis said NOGROUP (:func:`.link.translated` forgets the groups then): a
    failover can lose a group created just before it. A group created again starts at the
    stream's first entry, so every entry still in the stream is read again (a duplicate at
    worst, never a loss). A group that existed and whose stream is gone too is a loss
    (:meth:`.link.RedisLink.vanished`)."""
    if (stream, group) in link.groups:
        return
    if (stream, group) in link.lost_groups:  # was there, then NOGROUP: is the stream?
        if not link.client.exists(stream):
            link.vanished(stream)
        link.lost_groups.discard((stream, group))
    try:
        link.client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    link.groups.add((stream, group))


def read_group(link: RedisLink, stream: str, group: str, consumer: str, count: int,
               block_ms: int | None = None, start: str = ">") -> list[Entry]:
    """XREADGROUP on one stream: new entries (``start`` ">"), or this consumer's own
    pending ones after ``start``."""
    reply = link.client.xreadgroup(group, consumer, {stream: start}, count=count,
                                   block=block_ms)
    if not reply:
        return []
    # RESP2: [[stream, entries]]; RESP3 (protocol=3 in the URL): {stream: [entries]}
    entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
    return [(decode(entry_id), fields or None) for entry_id, fields in entries]


def raw_fields(fields: Mapping[bytes, bytes]) -> bytes:
    """An entry's fields, losslessly, as JSON: ``{"fields": [[name, value], ...]}``, each
    name and value a string when it is UTF-8, else ``{"base64": "..."}``."""
    def text(value: bytes) -> str | dict[str, str]:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}

    return json.dumps({"fields": [[text(k), text(v)] for k, v in fields.items()]}).encode()


def field_names(fields: Mapping[bytes, bytes]) -> list[str]:
    """The names of an entry's fields, readable whatever bytes they are (for logs)."""
    return sorted(k.decode("utf-8", "backslashreplace") for k in fields)


def times_delivered(link: RedisLink, stream: str, group: str,
                    entry_ids: Sequence[str]) -> dict[str, int]:
    """How often each entry has been delivered (1 if it is no longer pending), in one
    round trip."""
    pipe = link.client.pipeline(transaction=False)
    for entry_id in entry_ids:
        pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
    return {entry_id: int(info[0]["times_delivered"]) if info else 1
            for entry_id, info in zip(entry_ids, pipe.execute(), strict=True)}


class Held:
    """Entry ids this process holds (read, not yet acked), refreshed by the heartbeat."""

    def __init__(self, link: RedisLink, stream: str, group: str, consumer: str) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._link, self._stream, self._group, self._consumer = link, stream, group, consumer

    def add(self, ids: Sequence[str]) -> None:
        with self._lock:
            self._ids.update(ids)

    def discard(self, ids: Sequence[str]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def holds(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._ids

    def refresh(self) -> None:
        """XCLAIM every held entry for this consumer with idle 0 (JUSTID: no data)."""
        with self._lock:
            ids = list(self._ids)
        if not ids:
            return
        with translated(QueueError, "refresh held entries", self._link):
            pipe = self._link.client.pipeline(transaction=False)
            for start in range(0, len(ids), REFRESH_CHUNK):
                pipe.xclaim(self._stream, self._group, self._consumer, 0,
                            ids[start:start + REFRESH_CHUNK], justid=True)
            pipe.execute()


#: most idle entries one XAUTOCLAIM takes over (a page; the scan goes on while full)
CLAIM_PAGE = 100


class Claimer:
    """Pending entries this consumer should (re)take: its own from a previous life, once,
    then those idle past the visibility timeout (dead consumers), with XAUTOCLAIM."""

    def __init__(self, link: RedisLink, stream: str, group: str, consumer: str,
                 visibility: float, held: Held) -> None:
        self._link, self._stream, self._group, self._consumer = link, stream, group, consumer
        self._held = held
        self.visibility_ms = int(visibility * 1000)
        self._lock = threading.Lock()
        self._own_loaded = False
        self._backlog: deque[Entry] = deque()
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._claim_every = min(max(visibility / 4, 0.5), 5.0)

    def claim_soon(self) -> None:
        with self._lock:
            self._next_claim = 0.0
            self._cursor = "0-0"

    def take(self, count: int) -> list[Entry]:
        """Up to ``count`` entries to (re)deliver. Entries are claimed a page at a time
        (:data:`CLAIM_PAGE`, however few are asked for), so a dead instance's entries come
        back together; the scan goes on at once while pages come back full. Claimed
        entries are held (refreshed by the heartbeat) while they wait here."""
        with self._lock:
            if not self._own_loaded:
                self._load_own()
                self._own_loaded = True
            now = time.monotonic()
            if (not self._backlog and now >= self._next_claim
                    and not self._link.recently_failed()):
                more = self._autoclaim(max(count, CLAIM_PAGE))
                self._next_claim = now if more else now + self._claim_every
            return [self._backlog.popleft() for _ in range(min(count, len(self._backlog)))]

    def _load_own(self) -> None:
        last = "0"
        while entries := read_group(self._link, self._stream, self._group, self._consumer,
                                    500, start=last):
            self._backlog.extend(entries)
            self._held.add([entry_id for entry_id, _ in entries])
            last = entries[-1][0]
        if self._backlog:
            log.warning("%s: re-reading %d entries this consumer (%s) held before it stopped",
                        self._stream, len(self._backlog), self._consumer)

    def _autoclaim(self, count: int) -> bool:
        """Claim up to ``count`` idle entries into the backlog; True if the scan of the
        pending list has more to go (the next page may be claimed at once)."""
        reply = self._link.client.xautoclaim(self._stream, self._group, self._consumer,
                                             self.visibility_ms, start_id=self._cursor,
                                             count=count)
        self._cursor = decode(reply[0])
        # entries this process still holds only look idle (e.g. just after an outage):
        # claiming them refreshed them; they must not be handed out a second time
        claimed = [(decode(i), f or None) for i, f in reply[1]
                   if not self._held.holds(decode(i))]
        self._backlog.extend(claimed)
        self._held.add([entry_id for entry_id, _ in claimed])
        if claimed:
            log.warning("%s: took over %d entries idle for more than %.0f s from other "
                        "consumers", self._stream, len(claimed), self.visibility_ms / 1000)
        return self._cursor != "0-0"


def describe_stream(link: RedisLink, stream: str, group: str,
                    error: type[Ms1Error]) -> dict[str, object]:
    """Length, pending and lag of the group, and its consumers with pending and idle time."""
    with translated(error, f"describe {stream}", link):
        pipe = link.client.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xinfo_consumers(stream, group)
        length, groups, consumers = pipe.execute(raise_on_error=False)
        if isinstance(length, redis.RedisError):  # e.g. the key is no stream
            raise length
    if isinstance(groups, redis.RedisError) or isinstance(consumers, redis.RedisError):
        groups, consumers = [], []  # no such stream or group yet
    info: dict[str, object] = {"stream": stream, "length": length}
    for g in groups:
        if decode(g["name"]) == group:
            info.update(group=group, pending=g["pending"], lag=g.get("lag"))
    info["consumers"] = [{"name": decode(c["name"]), "pending": c["pending"],
                          "idle_s": round(c["idle"] / 1000, 1)} for c in consumers]
    return info
