"""The outbound queue: batches for MS4 in a Redis stream (``[redis] outbound_stream``).

One batch per entry (:func:`batch_fields` / :func:`batch_from_fields`, the one place that
decides whether an entry is a batch: fields, UTF-8, types, counts). Enqueueing is
:func:`.commit.store` (the batches' inbound e-mails acked in the same atomic step when the
source is Redis too). Senders take batches from :meth:`RedisQueue.get`: one fetcher at a
time reads up to ``prefetch`` entries with XREADGROUP, the others take theirs from that
buffer; entries of dead consumers are taken over (:mod:`.leases`).

More: docs/internals.md, ``ms1_plugins.redis.outbound``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import redis
from redis.exceptions import RedisClusterException

from ms1.errors import QueueError
from ms1.model import (
    BATCH_PATH,
    DEFAULT_MAX_PAYLOAD_BYTES,
    ENTRY_FORMAT,
    FORMAT_FIELD,
    UNIT_PATH,
    Batch,
    DeadLetter,
    NewerFormat,
    entry_format,
)
from ms1.pipeline.outbound import Delivery, QueueBackend, QueueStats
from ms1.pipeline.source import Source

from .commit import inbound_of, pack_entries, store
from .deadletters import letter_fields
from .leases import (
    Claimer,
    Entry,
    Held,
    describe_stream,
    ensure_group,
    raw_fields,
    read_group,
    times_delivered,
)
from .link import Fields, RedisLink, eviction_refusal, evicts_any, translated

log = logging.getLogger(__name__)


#: newer-format entries an instance remembers (and checks are still there)
NEWER_KEPT = 100


def batch_fields(batch: Batch) -> Fields:
    return {
        FORMAT_FIELD: str(ENTRY_FORMAT),
        "id": batch.id,
        "path": batch.path,
        "payloads": b"\n".join(batch.payloads),  # compact JSON never holds a raw newline
        "invoice_ids": json.dumps(batch.invoice_ids),
        "message_ids": json.dumps(batch.message_ids),
        "created_at": repr(batch.created_at),
        # inbound entry ids: their timestamps give inbound-to-202 latency after a restart too
        "refs": json.dumps(batch.refs),
    }


#: the fields every batch entry has (``refs`` is optional; other fields are ignored, so a
#: newer ms1 may add some without its batches being set aside by an older one)
BATCH_FIELDS = (b"id", b"path", b"payloads", b"invoice_ids", b"message_ids", b"created_at")


def batch_from_fields(fields: dict[bytes, bytes]) -> Batch:
    """The batch an outbound entry holds, or ValueError saying why it holds none: the one
    place that decides. Never raises anything else (a JSON nested too deeply, binary field
    names or values, wrong types, counts that differ are all a ValueError)."""
    try:
        return _decode_batch(fields)
    except ValueError:
        raise
    except Exception as exc:  # RecursionError from json, anything unforeseen
        raise ValueError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _decode_batch(fields: dict[bytes, bytes]) -> Batch:
    entry_format(fields.get(FORMAT_FIELD.encode()))  # NewerFormat: left untouched
    missing = [name.decode() for name in BATCH_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")

    def text(name: bytes) -> str:
        try:
            return fields[name].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"field {name.decode()!r} is not UTF-8") from None

    def strings(name: bytes, default: str | None = None) -> tuple[str, ...]:
        raw = text(name) if name in fields or default is None else default
        try:
            value = json.loads(raw)
        except ValueError:
            raise ValueError(f"field {name.decode()!r} is not JSON: {raw[:60]!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"field {name.decode()!r} is not a JSON list of strings: "
                             f"{raw[:60]!r}")
        return tuple(value)

    path, batch_id = text(b"path"), text(b"id")
    if path not in (BATCH_PATH, UNIT_PATH):
        raise ValueError(f"unknown path {path!r}")
    if not batch_id or not batch_id.isprintable() or len(batch_id) > 200:
        raise ValueError(f"bad id {batch_id[:60]!r}")
    payloads = tuple(fields[b"payloads"].split(b"\n"))
    for n, payload in enumerate(payloads):
        if not (payload.startswith(b"{") and payload.endswith(b"}")):
            raise ValueError(f"payload {n} is not a JSON object: {payload[:60]!r}")
    if path == UNIT_PATH and len(payloads) != 1:
        raise ValueError(f"{len(payloads)} payloads for {UNIT_PATH} (one object per request)")
    invoice_ids, message_ids = strings(b"invoice_ids"), strings(b"message_ids")
    refs = strings(b"refs", "[]")
    if not len(payloads) == len(invoice_ids) == len(message_ids):
        raise ValueError(f"payloads, invoice_ids and message_ids differ in number "
                         f"({len(payloads)}, {len(invoice_ids)}, {len(message_ids)})")
    if refs and len(refs) != len(payloads):
        raise ValueError(f"{len(refs)} refs for {len(payloads)} payloads")
    try:
        created_at = float(text(b"created_at"))
    except ValueError:
        raise ValueError(f"created_at is not a number: {fields[b'created_at'][:60]!r}") \
            from None
    if not math.isfinite(created_at):
        raise ValueError(f"created_at is not finite: {created_at}")
    return Batch(path=path, payloads=payloads, invoice_ids=invoice_ids,
                 message_ids=message_ids, id=batch_id, created_at=created_at, refs=refs)


class RedisQueue(QueueBackend):
    """The outbound queue on a Redis stream with a consumer group (see the module doc)."""

    name = "redis"
    durable = True
    group_commit = True  # put_many: atomic, idempotent script calls (see .commit)

    def __init__(self, link: RedisLink, *, stream: str, group: str, consumer: str,
                 visibility_timeout: float, block_timeout: float, prefetch: int = 4,
                 dead_letter_stream: str = "ms1:dead-letters",
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.link = link
        self.longest_call = link.longest_call
        self.max_payload_bytes = max_payload_bytes
        self.stream, self.group, self.consumer = stream, group, consumer
        self.dead_letter_stream = dead_letter_stream
        self._block_ms = max(1, int(block_timeout * 1000))
        self._prefetch = max(1, prefetch)
        self._buffer: deque[Delivery] = deque()
        self._buffer_lock = threading.Lock()
        #: entries of a newer format seen (id: format), at most NEWER_KEPT
        self._newer: dict[str, int] = {}
        self._fetching = threading.Lock()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._held = Held(link, stream, group, consumer)
        self._claimer = Claimer(link, stream, group, consumer, visibility_timeout,
                                self._held)
        link.on_heartbeat(self._held.refresh, visibility_timeout / 3)

    def _ensure(self) -> None:
        link = self.link
        if link.refusal is not None:
            raise QueueError(link.refusal)
        ensure_group(link, self.stream, self.group)  # a set lookup once it exists
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                self._check_server()
                self._ready = True
        if link.refusal is not None:
            raise QueueError(link.refusal)

    def _check_server(self) -> None:
        """At first use: WARNING without AOF; a Redis that evicts any key is refused unless
        ``[redis] allow_eviction`` (checked at start too, when Redis answered then)."""
        link = self.link
        policy = link.memory_policy()
        if policy is not None and evicts_any(policy):
            if link.allow_eviction:
                log.warning("Redis at %s evicts any key (maxmemory-policy %s) and "
                            "allow_eviction = yes: a stream it evicts is reported as lost "
                            "work", link.url, policy)
            else:
                link.refusal = eviction_refusal(link, policy) + (
                    " ([redis] allow_eviction): storing and sending stopped")
                log.critical("%s", link.refusal)
        try:
            aof = link.server_config("appendonly")
        except (redis.RedisError, RedisClusterException):
            return  # CONFIG may be disabled (managed Redis): nothing to check
        if aof != "yes":
            log.warning("Redis at %s runs without AOF (appendonly %s): a Redis crash can lose "
                        "queued batches; production needs appendonly yes", link.url, aof)

    # --- enqueue -----------------------------------------------------------------------

    def put(self, batch: Batch, source: Source | None = None) -> bool:
        return self.put_many([batch], source)

    def put_many(self, batches: Sequence[Batch], source: Source | None = None) -> bool:
        """Store ``batches``; with a Redis source on the same server their inbound entries
        are acked in the same atomic step (calls of bounded size: :mod:`.commit`)."""
        inbound = inbound_of(source, self.link)
        what = (f"enqueue batch {batches[0].id}" if len(batches) == 1
                else f"enqueue {len(batches)} batches")
        with translated(QueueError, what, self.link):
            self._ensure()
            store(self.link, self.stream, [([batch_fields(b)], b.refs) for b in batches],
                  inbound)
        return inbound is not None

    # --- hand out --------------------------------------------------------------------

    def get(self, consumer: str, timeout: float) -> Delivery | None:
        """One batch. A single fetcher at a time reads up to ``prefetch`` entries with one
        XREADGROUP; the other senders take theirs from that buffer (held entries all)."""
        with self._buffer_lock:
            if self._buffer:
                return self._buffer.popleft()
        if not self._fetching.acquire(timeout=timeout):
            return None
        try:
            with self._buffer_lock:
                if self._buffer:
                    return self._buffer.popleft()
            with translated(QueueError, "take a batch", self.link):
                self._ensure()
                claimed = self._claimer.take(self._prefetch)
                deliveries = self._deliveries(claimed, claimed=True)
                if not deliveries:
                    block = min(self._block_ms, max(1, int(timeout * 1000)))
                    entries = read_group(self.link, self.stream, self.group, self.consumer,
                                         self._prefetch, block_ms=block)
                    deliveries = self._deliveries(entries, claimed=False)
            if not deliveries:
                return None
            with self._buffer_lock:
                self._buffer.extend(deliveries[1:])
            return deliveries[0]
        finally:
            self._fetching.release()

    def _deliveries(self, entries: Sequence[Entry], claimed: bool) -> list[Delivery]:
        """The batches among ``entries`` (now held); the other entries are finished on their
        own: deleted ones acked, malformed ones set aside as dead letters."""
        deliveries: list[Delivery] = []
        odd: list[tuple[str, list[Fields]]] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending: nothing left to send
                odd.append((entry_id, []))
                continue
            try:
                batch = batch_from_fields(fields)
            except NewerFormat as exc:  # pending, not kept alive: a newer instance takes it
                self._newer_format(entry_id, exc)
                continue
            except ValueError as exc:
                reason = f"{self.stream} entry {entry_id} is not an ms1 batch ({exc})"
                log.error("%s: set aside as a dead letter in %s", reason,
                          self.dead_letter_stream)
                odd.append((entry_id, [letter_fields(DeadLetter(
                    reason=reason, stage="queue", payload=raw_fields(fields),
                    source_ref=entry_id).clipped(self.max_payload_bytes))]))
                continue
            deliveries.append(Delivery(batch, entry_id))
        if claimed and deliveries:  # taken over or re-read: count earlier deliveries
            counts = times_delivered(self.link, self.stream, self.group,
                                     [d.token for d in deliveries])
            deliveries = [replace(d, attempts=counts[d.token]) for d in deliveries]
        self._held.add([d.token for d in deliveries])
        for entry_id, letters in odd:
            try:
                self._finish(entry_id, letters, self.dead_letter_stream,
                             f"set aside entry {entry_id}")
            except QueueError as exc:  # left pending: taken over and tried again later
                log.error("%s", exc)
        return deliveries

    # --- settle ------------------------------------------------------------------------

    def _finish(self, entry_id: str, replacements: Sequence[Fields], to: str,
                what: str) -> None:
        """XACK + XDEL the entry and XADD ``replacements`` to stream ``to``, atomically and
        once (``scripts/finish.lua``): the one place an outbound entry is acked."""
        with translated(QueueError, what, self.link):
            self._ensure()  # the group again, if a failover lost it (NOGROUP)
            self.link.script("finish", [self.stream, to],
                             [self.group, entry_id, *pack_entries(replacements)],
                             replicate=True)
        self._held.discard([entry_id])

    def ack(self, delivery: Delivery) -> None:
        self._finish(delivery.token, (), self.stream, f"ack batch {delivery.batch.id}")

    def replace(self, delivery: Delivery, parts: Sequence[Batch]) -> None:
        self._finish(delivery.token, [batch_fields(part) for part in parts], self.stream,
                     f"split batch {delivery.batch.id}")

    def merge(self, deliveries: Sequence[Delivery], batch: Batch) -> bool:
        """``scripts/merge.lua``: all or nothing, and only entries still this consumer's.
        Whatever the outcome, the entries are no longer kept alive here: merged, they are
        gone; not merged or unknown, their lease runs out and they are handed out again."""
        tokens = [delivery.token for delivery in deliveries]
        try:
            with translated(QueueError, f"merge {len(tokens)} batches into {batch.id}",
                            self.link):
                self._ensure()
                merged = self.link.script(
                    "merge", [self.stream],
                    [self.group, self.consumer, len(tokens), *tokens,
                     *pack_entries([batch_fields(batch)])], replicate=True)
        except QueueError:
            self._held.discard(tokens)
            raise
        if merged:
            self._held.discard(tokens)
        return bool(merged)

    def release(self, delivery: Delivery) -> None:
        """Mark the entry idle past the visibility timeout: the next XAUTOCLAIM of any
        instance (this one included) takes it at once. It never leaves the stream."""
        self._held.discard([delivery.token])
        with translated(QueueError, f"release batch {delivery.batch.id}", self.link):
            self.link.client.xclaim(self.stream, self.group, self.consumer, 0,
                                    [delivery.token], idle=self._claimer.visibility_ms + 1,
                                    justid=True)
        self._claimer.claim_soon()

    # --- report ------------------------------------------------------------------------

    #: entries read per script call by :meth:`held_messages`
    HELD_PER_CALL = 50  # XRANGE brings whole entries (payloads too) into the script

    def held_messages(self) -> set[str] | None:
        held: set[str] = set()
        start = "-"
        while True:
            with translated(QueueError, f"list the message ids {self.stream} holds",
                            self.link):
                last, *lists = self.link.script("held_messages", [self.stream],
                                                [start, self.HELD_PER_CALL])
            for text in lists:
                with contextlib.suppress(ValueError, TypeError, RecursionError):
                    ids = json.loads(text)
                    if isinstance(ids, list):
                        held.update(str(m) for m in ids)
            if not last:  # no entry after start
                return held
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    def stats(self) -> QueueStats:
        with translated(QueueError, "read queue length", self.link):
            self._ensure()
            link = self.link
            # the other streams ms1 reads here (the inbound one): counted too, so that a
            # stream found gone says what it held (RedisLink.vanished)
            others = sorted({stream for stream, _ in link.groups} - {self.stream})
            pipe = link.client.pipeline(transaction=False)
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.group)
            for stream in others:
                pipe.xlen(stream)
            with self._buffer_lock:
                newer = list(self._newer.items())
            for entry_id, _ in newer:
                pipe.xrange(self.stream, entry_id, entry_id)
            length, pending, *lengths = pipe.execute()
            found = lengths[len(lengths) - len(newer):] if newer else []
            lengths = lengths[:len(lengths) - len(newer)]
        still = [(entry_id, version) for (entry_id, version), entries in zip(
            newer, found, strict=True) if entries]
        with self._buffer_lock:
            for entry_id, _ in newer:
                if (entry_id, self._newer.get(entry_id)) not in still:
                    self._newer.pop(entry_id, None)
        in_flight = int(pending["pending"])
        link.last_lengths.update({self.stream: int(length)} | {
            stream: int(count) for stream, count in zip(others, lengths, strict=True)})
        return QueueStats(max(0, int(length) - in_flight), in_flight, None,
                          losses=tuple(link.losses),
                          lost_batches=link.lost_counts.get(self.stream, 0),
                          newer=tuple(f"{self.stream} entry {entry_id} (format {version})"
                                      for entry_id, version in still))

    def describe(self) -> dict[str, object]:
        return {**describe_stream(self.link, self.stream, self.group, QueueError),
                **self.link.describe()}

    def _newer_format(self, entry_id: str, exc: NewerFormat) -> None:
        """An entry a newer ms1 wrote: left untouched (pending, so a newer instance takes
        it over after the lease), said once (CRITICAL) and in :meth:`stats` until the
        stream holds no such entry this instance saw."""
        with self._buffer_lock:
            if entry_id in self._newer:
                return
            self._newer[entry_id] = exc.version
            while len(self._newer) > NEWER_KEPT:
                self._newer.pop(next(iter(self._newer)))
        log.critical("%s entry %s is of %s. Upgrade this instance (a rolling upgrade: stop "
                     "the older ones)", self.stream, entry_id, exc)

    def close(self) -> None:
        """Give back prefetched batches no sender took, then let go of the connection."""
        with self._buffer_lock:
            unsent, self._buffer = list(self._buffer), deque()
        for delivery in unsent:
            with contextlib.suppress(QueueError):
                self.release(delivery)
        self.link.release()
