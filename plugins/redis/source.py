"""The inbound source: e-mails from a Redis stream (``[redis] inbound_stream``).

The ingestor XADDs one e-mail per entry, in field ``email``. :class:`RedisSource` reads
them with XREADGROUP (after re-reading its own pending entries at start, and taking over
those of dead consumers: :mod:`.leases`). An entry is acked once what became of it is
safe: by ``scripts/enqueue.lua`` in the same atomic step that stores its batch or dead
letter (:mod:`.commit`), or by :meth:`RedisSource.ack` when that went elsewhere; XDEL
follows the XACK unless ``delete_acked_inbound = no``.

More: docs/internals.md, ``ms1_plugins.redis.source``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence

from ms1.errors import Ms1Error, SourceError, SubmitError
from ms1.model import InboundMessage
from ms1.pipeline.source import MAX_EMAIL_BYTES, Source

from .leases import (
    Claimer,
    Entry,
    Held,
    describe_stream,
    ensure_group,
    field_names,
    raw_fields,
    read_group,
)
from .link import RedisLink, lasting, translated

log = logging.getLogger(__name__)
#: e-mails per pipeline of ``push``, and per script call of ``submit``
XADD_CHUNK = 500
#: seconds a submit key is remembered (a retry with it within that adds nothing twice)
SUBMIT_MEMORY = 3600
#: seconds ``push`` (``ms1-service enqueue``) retries a chunk through an outage or failover
PUSH_RETRY = 120.0
#: seconds between those retries
RETRY_PAUSE = 0.5


def inbound_message(stream: str, entry_id: str, fields: dict[bytes, bytes],
                    max_email_bytes: int = MAX_EMAIL_BYTES) -> InboundMessage:
    """What an inbound entry is (see the module doc): an e-mail, or raw data with the
    ``problem`` that makes it a dead letter. Never raises."""
    data = fields.get(b"email")
    if data is not None and (len(fields) == 1 or _readable_names(fields)):
        if len(fields) > 1:  # an ingestor's trace id, say: the e-mail is still the e-mail
            _note_fields(stream, fields)
        if len(data) <= max_email_bytes:
            return InboundMessage(entry_id, data)
        problem = (f"{stream} entry {entry_id}: its e-mail is {len(data)} bytes, more than "
                   f"{max_email_bytes} ([batch] max_bytes): it cannot become an object of a "
                   "batch; set aside unparsed")
        log.warning("%s", problem)
        return InboundMessage(entry_id, data, problem=problem)
    names = ", ".join(f"'{name}'" for name in field_names(fields))
    if data is None:
        problem = (f"{stream} entry {entry_id} has no 'email' field (fields: {names}): kept "
                   "with its raw fields")
    else:
        extra = ", ".join(f"'{name}'" for name in field_names(
            {k: v for k, v in fields.items() if k != b"email"}))
        problem = (f"{stream} entry {entry_id} has fields besides 'email' whose names are "
                   f"not text ({extra}): kept with its raw fields")
    log.warning("%s", problem)
    return InboundMessage(entry_id, raw_fields(fields), problem=problem)


#: field names besides ``email`` already said in the log (each once; at most this many)
_NOTED: set[bytes] = set()
_NOTED_MOST = 64
_noted_lock = threading.Lock()


def _readable_names(fields: dict[bytes, bytes]) -> bool:
    """Every field name is text (UTF-8, no control character)."""
    for name in fields:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if not text.isprintable():
            return False
    return True


def _note_fields(stream: str, fields: dict[bytes, bytes]) -> None:
    """Say once per field name that entries carry fields besides ``email`` (ignored)."""
    new = []
    with _noted_lock:
        for name in fields:
            if name != b"email" and name not in _NOTED and len(_NOTED) < _NOTED_MOST:
                _NOTED.add(name)
                new.append(name.decode("utf-8"))
    if new:
        log.info("%s entries carry fields besides 'email' (%s): ignored, the 'email' field "
                 "is the e-mail (said once per name)", stream,
                 ", ".join(f"'{n}'" for n in sorted(new)))


class RedisSource(Source):
    """E-mails from the inbound stream (see the module doc)."""

    name = "redis"

    def __init__(self, link: RedisLink, *, stream: str, group: str, consumer: str,
                 visibility_timeout: float, delete_acked: bool,
                 max_email_bytes: int = MAX_EMAIL_BYTES, block_timeout: float = 60.0) -> None:
        """``block_timeout``: the longest one XREADGROUP waits (``[redis] block_timeout``:
        below the socket timeout), whatever wait a read asks for."""
        self.link = link
        self.longest_call = link.longest_call
        self.block_timeout = block_timeout
        self.max_email_bytes = max_email_bytes
        self.stream, self.group, self.consumer = stream, group, consumer
        self.delete = delete_acked
        #: the sorted set of submit keys (same hash tag as the stream: same slot)
        self.submitted_key = f"{stream}:submitted"
        self._held = Held(link, stream, group, consumer)
        self._claimer = Claimer(link, stream, group, consumer, visibility_timeout,
                                self._held)
        link.on_heartbeat(self._held.refresh, visibility_timeout / 3)

    def read(self, max_items: int, timeout: float) -> list[InboundMessage]:
        with translated(SourceError, f"read {self.stream}", self.link):
            ensure_group(self.link, self.stream, self.group)
            entries: list[Entry] = self._claimer.take(max_items) or read_group(
                self.link, self.stream, self.group, self.consumer, max_items,
                block_ms=max(1, int(min(timeout, self.block_timeout) * 1000)))
        messages = [inbound_message(self.stream, entry_id, fields, self.max_email_bytes)
                    for entry_id, fields in entries if fields is not None]
        self._held.add([m.ref for m in messages])
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:  # deleted while pending: nothing to process
            try:
                self.ack(gone)
            except SourceError as exc:  # still pending: dropped at the next re-read
                log.warning("cannot ack %d deleted entries: %s", len(gone), exc)
        return messages

    def forget(self, refs: Sequence[str]) -> None:
        """These entries are acked: stop refreshing them."""
        self._held.discard(refs)

    def ack(self, refs: Sequence[str]) -> None:
        with translated(SourceError, f"ack {len(refs)} entries of {self.stream}", self.link):
            pipe = self.link.client.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, *refs)
            if self.delete:
                pipe.xdel(self.stream, *refs)
            pipe.execute()
        self.forget(refs)

    def push(self, emails: Sequence[bytes]) -> int:
        """Add e-mails (``ms1-service enqueue``). One server without ``min_replicas_acked``:
        pipelined XADDs. Otherwise :meth:`submit` per chunk, each retried under its key for
        up to :data:`PUSH_RETRY` s (through a failover, without adding any twice)."""
        if self.link.topology.kind != "single" or self.link.min_replicas > 0:
            for start in range(0, len(emails), XADD_CHUNK):
                try:
                    self.submit(emails[start:start + XADD_CHUNK], retry_for=PUSH_RETRY)
                except SubmitError as exc:
                    why = ("Redis refuses (waiting will not help)" if exc.permanent
                           else f"after {PUSH_RETRY:.0f} s of retries")
                    raise SourceError(
                        f"e-mails {start + 1}-{min(start + XADD_CHUNK, len(emails))} of "
                        f"{len(emails)} are not known to be added, {why} (those before "
                        f"them are; enqueueing these again may add some twice): "
                        f"{exc.args[0]}") from exc
            return len(emails)
        with translated(SourceError, f"add e-mails to {self.stream}", self.link):
            for start in range(0, len(emails), XADD_CHUNK):
                pipe = self.link.client.pipeline(transaction=False)
                for data in emails[start:start + XADD_CHUNK]:
                    pipe.xadd(self.stream, {"email": data})
                pipe.execute()
        return len(emails)

    def submit(self, emails: Sequence[bytes], *, key: str | None = None,
               retry_for: float = 0.0) -> str:
        """Add ``emails`` under ``key`` (a new one if None) and return the key: once per
        key, and with ``min_replicas_acked = n`` only reported done once ``n`` replicas
        acknowledged them. Raises :class:`~ms1.errors.SubmitError` otherwise, after
        retrying for ``retry_for`` s (see :mod:`ms1.runtime.ingest`)."""
        key = key or uuid.uuid4().hex
        deadline = time.monotonic() + retry_for
        failing = False
        while True:
            try:
                self._submit_once(emails, key)
            except SubmitError as exc:
                if exc.permanent or time.monotonic() + RETRY_PAUSE > deadline:
                    raise
                if not failing:
                    log.warning("%s; retrying for up to %.0f s", exc, retry_for)
                failing = True
                time.sleep(RETRY_PAUSE)
                continue
            if failing:
                log.warning("recovered: %d e-mails submitted to %s under key %s",
                            len(emails), self.stream, key)
            return key

    def _submit_once(self, emails: Sequence[bytes], key: str) -> None:
        chunks = [emails[start:start + XADD_CHUNK]
                  for start in range(0, len(emails), XADD_CHUNK)]
        keys = [self.stream, self.submitted_key]

        def queue(pipe: object) -> None:
            for n, chunk in enumerate(chunks):
                token = key if len(chunks) == 1 else f"{key}:{n}"
                self.link.script_on(pipe, "submit", keys, [token, SUBMIT_MEMORY, *chunk])

        what = f"submit {len(emails)} e-mails to {self.stream} under key {key}"
        try:
            with translated(SourceError, what, self.link):
                _, acked = self.link.replicated(queue)
        except Ms1Error as exc:
            # (a refused WAIT comes after the scripts: they may be in even when refused)
            permanent = lasting(exc)
            retry = ("Redis refuses, and waiting will not change that; they may or may not "
                     "be in the stream: once the key or the ACL is fixed, retry" if permanent
                     else "they may or may not be in the stream; retry")
            raise SubmitError(f"{exc}: {retry} with key {key!r} to add none twice", key=key,
                              permanent=permanent) from exc
        wanted = self.link.min_replicas
        if acked < wanted:
            how = "fsynced" if self.link.uses_waitaof else "acknowledged"
            raise SubmitError(
                f"{what}: only {acked} of {wanted} replicas {how} them within "
                f"{self.link.replica_timeout:g} s ([redis] min_replicas_acked, "
                f"replica_ack_timeout): they are on the primary ({self.link.primary()}) but "
                f"could be lost in a failover; retry with key {key!r} to add none twice",
                key=key, added=True)

    def describe(self) -> dict[str, object]:
        return {**describe_stream(self.link, self.stream, self.group, SourceError),
                **self.link.describe()}

    def close(self) -> None:
        self.link.release()
