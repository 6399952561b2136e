"""Built-in plugin ``redis``: every Redis call ms1 makes lives in this module.

Components (all on Redis Streams with one consumer group, ``[redis] group``):

* source ``redis`` — the inbound stream (``ms1:emails``, one e-mail per entry in
  field ``email``). An entry is acknowledged (XACK, and XDEL unless
  ``delete_acked_inbound = no``) in the same atomic, idempotent Lua script that
  enqueues the batch holding its payload or stores its dead letter;
* queue ``redis`` — the outbound stream (``ms1:outbound``, one batch per entry).
  Senders XREADGROUP; a batch is XACKed and XDELed by one script after MS4's
  202 (or its split, or its dead letters). Entries held by this process are
  re-claimed (XCLAIM JUSTID) every ``visibility_timeout / 3`` s so they never look
  idle; entries idle longer than ``visibility_timeout`` belong to a dead consumer
  and are taken over with XAUTOCLAIM; at start an instance first re-reads its own
  pending entries. ms1 never trims: finished entries are deleted, so a stream's
  length is exactly the work not yet done, and nothing pending can be trimmed;
* queue ``auto`` — ``redis`` if a Redis answers at ``[redis] url``, else the
  in-memory queue (for the demo); it says which;
* dead letters ``redis`` — a stream (``ms1:dead-letters``): reason, stage, message
  id, invoice id, source ref, MS4's answer, time, the object;
* rate limiter ``redis`` — a sliding-window log in a sorted set, updated by a Lua
  script on the server's clock, shared by every instance on the Redis.

Connections: one redis-py client (hiredis parser) per config, on a blocking pool
sized for the threads; the hot-path commands (XREADGROUP, the enqueue and finish
scripts) go straight to a connection each pipeline thread keeps
(:meth:`RedisLink.command`); explicit connect and socket timeouts, XREADGROUP BLOCK
shorter than the socket timeout; redis-py's own retries are off (a retried XADD
whose reply was lost would be a duplicate): ms1's loops retry, and when Redis is
unreachable they log once, wait, and carry on when it is back. Every redis-py
error is translated at this boundary into :class:`~ms1.errors.QueueError` or
:class:`~ms1.errors.SourceError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ms1.config import Config, Option, Secret
from ms1.deadletters import DeadLetterStore
from ms1.errors import Ms1Error, QueueError, SourceError
from ms1.hookspecs import hookimpl
from ms1.model import Batch, DeadLetter, InboundMessage
from ms1.outbound import Delivery, MemoryQueue, QueueBackend, QueueStats
from ms1.sending.limiter import RateLimiter
from ms1.source import Source

log = logging.getLogger(__name__)
T = TypeVar("T")
SECTION = "redis"
XADD_CHUNK = 500
#: entries to XADD together, and the inbound refs whose ack they stand for
EntryGroup = tuple[Sequence[dict[str, bytes | str]], Sequence[str]]


# --- options -----------------------------------------------------------------------


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option(SECTION, "url", "str", "redis://127.0.0.1:6379/0",
               "Redis URL: redis://host:port/db, or rediss:// for TLS; a password in the URL "
               "is redacted in every output (better: password_env)"),
        Option(SECTION, "password_env", "str", "",
               "environment variable holding the Redis password (overrides the URL's)"),
        Option(SECTION, "inbound_stream", "str", "ms1:emails",
               "stream the ingestor writes e-mails to (field 'email')"),
        Option(SECTION, "outbound_stream", "str", "ms1:outbound", "stream of batches for MS4"),
        Option(SECTION, "dead_letter_stream", "str", "ms1:dead-letters",
               "stream of dead letters"),
        Option(SECTION, "rate_limit_key", "str", "ms1:rate-limit",
               "sorted set of the shared rate limiter"),
        Option(SECTION, "group", "str", "ms1", "consumer group on both streams"),
        Option(SECTION, "consumer", "str", "",
               "this instance's consumer name; empty: the host name. Give each instance on "
               "one host its own, and keep it across restarts (its pending entries are "
               "re-read first)"),
        Option(SECTION, "visibility_timeout", "float", 60.0,
               "seconds an entry may sit unrefreshed in a consumer's pending list before "
               "another instance takes it over (XAUTOCLAIM)", min=1, max=86400),
        Option(SECTION, "block_timeout", "float", 1.0,
               "seconds an XREADGROUP waits for new entries (keep below socket_timeout)",
               min=0.01, max=60),
        Option(SECTION, "socket_timeout", "float", 10.0,
               "seconds to wait for any Redis reply before the connection counts as broken",
               min=0.1, max=600),
        Option(SECTION, "connect_timeout", "float", 3.0, "seconds to connect to Redis",
               min=0.1, max=600),
        Option(SECTION, "delete_acked_inbound", "bool", True,
               "delete inbound entries once safe (XDEL); say no if other consumer groups "
               "also read the inbound stream"),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("source", "redis"), ("queue", "redis"), ("queue", "auto"),
            ("dead_letters", "redis"), ("rate_limiter", "redis")]


# --- connection --------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisLink:
    """One redis-py client with ms1's settings, shared by the components of one config."""

    def __init__(self, url: str, *, password: Secret | None = None,
                 socket_timeout: float = 10.0, connect_timeout: float = 3.0,
                 max_connections: int = 16) -> None:
        self.url = redact_url(url)
        kwargs: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": connect_timeout + socket_timeout,  # wait for a free pooled connection
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "socket_keepalive": True,
            "health_check_interval": 30,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "ms1",
        }
        if password is not None:
            kwargs["password"] = password.reveal()
        try:
            pool = redis.BlockingConnectionPool.from_url(url, **kwargs)
        except ValueError as exc:
            raise Ms1Error(f"invalid Redis URL {self.url!r}: {exc}") from None
        # typed Any: redis-py 8 annotates replies as RESP2/RESP3 unions that never narrow;
        # its response callbacks give the same shapes under both protocols
        self.client: Any = redis.Redis(connection_pool=pool)
        self._users = 0
        self.closed = False
        self._lock = threading.Lock()
        self._refreshers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._interval = 20.0
        #: time.monotonic() of the last failed Redis call (0: none yet)
        self.failed_at = 0.0
        self._local = threading.local()
        self._enqueue = self.client.register_script(_ENQUEUE)
        self._finish = self.client.register_script(_FINISH_ENTRY)

    def command(self, *args: bytes | str | int) -> Any:
        """One command on the calling thread's own pooled connection; the reply as the
        parser gives it (no response callback). The hot path: ``client.execute_command``
        checks a connection out of the pool and wraps the call in retry and metrics code
        on every call, ~40 us of CPU per command here. A connection error drops the
        connection (a reply may be half read); the next call reconnects."""
        lease = getattr(self._local, "lease", None)
        if lease is None:
            lease = self._local.lease = _Lease(self.client.connection_pool)
        conn = lease.conn
        try:
            conn.send_command(*args)
            return conn.read_response()
        except redis.ResponseError:
            raise  # an error reply: the connection is fine
        except BaseException:
            conn.disconnect()
            raise

    def script(self, script: Any, keys: Sequence[str], args: Sequence[bytes | str | int]
               ) -> Any:
        """EVALSHA ``script`` (from ``register_script``) with :meth:`command`; loads it
        first if Redis lost its script cache (a restart)."""
        try:
            return self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.script)
            return self.command("EVALSHA", script.sha, len(keys), *keys, *args)

    def xreadgroup(self, group: str, consumer: str, stream: str, count: int,
                   block_ms: int | None = None, start: str = ">"
                   ) -> list[tuple[str, list[bytes] | None]]:
        """Entries for ``consumer`` (:meth:`command`): new ones (``start`` ">"), or its own
        pending ones after ``start``; each as (id, flat field list, or None if deleted).
        The reply stays as hiredis returns it: redis-py would build a dict per entry."""
        block = () if block_ms is None else ("BLOCK", block_ms)
        return _read_entries(self.command("XREADGROUP", "GROUP", group, consumer,
                                          "COUNT", count, *block, "STREAMS", stream, start))

    def use(self) -> RedisLink:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0
            self.closed = last
        if last:
            self._stop.set()
            self.client.close()
            self.client.connection_pool.disconnect()

    def on_heartbeat(self, refresher: Callable[[], None], interval: float) -> None:
        """Call ``refresher`` every ``interval`` s (keeps held entries from looking idle)."""
        with self._lock:
            self._refreshers.append(refresher)
            self._interval = min(self._interval, interval)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="redis-heartbeat",
                                                   daemon=True)
                self._heartbeat.start()

    @property
    def heartbeat_interval(self) -> float:
        return self._interval

    def _beat(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait):
            wait = self._interval
            for refresher in list(self._refreshers):
                try:
                    refresher()
                except Ms1Error as exc:
                    log.debug("heartbeat: %s", exc)
                    wait = 1.0  # Redis is failing: refresh again as soon as it is back

    def recently_failed(self) -> bool:
        """True within one heartbeat period (+2 s) of a failed call: while Redis was away
        no instance could refresh what it holds, so nobody's idle entries mean anything
        until every live instance has had a heartbeat to refresh them."""
        return self.failed_at > 0 and time.monotonic() - self.failed_at < self._interval + 2

    def add_entries(self, stream: str, groups: Sequence[EntryGroup], *,
                    inbound: RedisSource | None = None) -> int:
        """XADD each group's entries to ``stream`` and ack the group's ``refs`` at
        ``inbound``, all in one atomic and idempotent step: a group none of whose refs is
        pending any more was done by an earlier call whose reply was lost, and is skipped
        (a group without refs is always added). Returns how many groups were added."""
        args: list[bytes | str | int] = [
            inbound.group if inbound is not None else "",
            1 if inbound is not None and inbound.delete else 0, len(groups)]
        for entries, refs in groups:
            args.append(len(refs))
            args += refs
            _pack_entries(args, entries)
        keys = [stream, inbound.stream if inbound is not None else stream]
        return int(self.script(self._enqueue, keys, args))

    def finish_entry(self, stream: str, group: str, entry_id: str,
                     parts: Sequence[dict[str, bytes | str]]) -> bool:
        """XACK + XDEL ``entry_id`` and XADD ``parts``, atomically; if the entry was acked
        already (a retry after a lost reply), only make sure it is deleted."""
        args: list[bytes | str | int] = [group, entry_id]
        _pack_entries(args, parts)
        return bool(self.script(self._finish, [stream], args))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def _pack_entries(args: list[bytes | str | int],
                  entries: Sequence[dict[str, bytes | str]]) -> None:
    """Append entries as the scripts read them: n entries, then per entry 2*n fields,
    field, value, ..."""
    args.append(len(entries))
    for fields in entries:
        args.append(len(fields) * 2)
        for key, value in fields.items():
            args += [key, value]


class _Lease:
    """A pooled connection one thread keeps for :meth:`RedisLink.command`; it goes back
    to the pool when the thread ends (its thread-local data is dropped then)."""

    __slots__ = ("conn", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conn = pool.get_connection()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.release(self.conn)


_links: weakref.WeakKeyDictionary[Config, dict[str, RedisLink]] = weakref.WeakKeyDictionary()


def link_for(config: Config) -> RedisLink:
    """The shared client of this config (created on first use, never at import)."""
    url = config.get_str(SECTION, "url")
    by_url = _links.setdefault(config, {})
    link = by_url.get(url)
    if link is None or link.closed:
        password = None
        env = config.get_str(SECTION, "password_env")
        if env:
            value = os.environ.get(env, "")
            if not value:
                raise config.error(SECTION, "password_env", f"${env} is not set or empty")
            password = Secret(value, f"${env}")
        try:
            link = RedisLink(url, password=password,
                             socket_timeout=config.get_float(SECTION, "socket_timeout"),
                             connect_timeout=config.get_float(SECTION, "connect_timeout"),
                             max_connections=config.get_int("send", "threads") + 8)
        except Ms1Error as exc:
            raise config.error(SECTION, "url", str(exc)) from None
        if config.get_float(SECTION, "block_timeout") >= config.get_float(SECTION,
                                                                           "socket_timeout"):
            raise config.error(SECTION, "block_timeout", "must be shorter than socket_timeout "
                               "(a blocked read would otherwise time out as an error)")
        by_url[url] = link
    return link.use()


def consumer_name(config: Config) -> str:
    return config.get_str(SECTION, "consumer") or socket.gethostname()


@contextlib.contextmanager
def translated(error: type[Ms1Error], what: str, link: RedisLink) -> Iterator[None]:
    """Turn redis-py's exceptions into ms1's, naming the operation and the (redacted) URL."""
    try:
        yield
    except redis.RedisError as exc:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            link.failed_at = time.monotonic()
        raise error(f"{what}: {type(exc).__name__}: {exc} (Redis at {link.url})") from exc


# One script enqueues groups of entries and acks the inbound refs each group came from.
# It is atomic (like MULTI) and idempotent: retried after a reply was lost, it finds the
# refs of every group it added no longer pending and adds nothing twice.
# KEYS: target stream, inbound stream. ARGV: group, delete (0/1), n groups, then per
# group: n refs, refs..., n entries, then per entry: 2*n fields, field, value, ...
_ENQUEUE = """
local group, delete = ARGV[1], ARGV[2] == '1'
local i = 4
local added = 0
for g = 1, tonumber(ARGV[3]) do
  local nrefs = tonumber(ARGV[i]); i = i + 1
  local refs = {}
  for k = 1, nrefs do refs[k] = ARGV[i]; i = i + 1 end
  local live = nrefs == 0
  for k = 1, nrefs do
    if #redis.call('XPENDING', KEYS[2], group, refs[k], refs[k], 1) > 0 then
      live = true
      break
    end
  end
  local nentries = tonumber(ARGV[i]); i = i + 1
  for e = 1, nentries do
    local n = tonumber(ARGV[i]); i = i + 1
    if live then
      local fields = {}
      for f = 1, n do fields[f] = ARGV[i + f - 1] end
      redis.call('XADD', KEYS[1], '*', unpack(fields))
    end
    i = i + n
  end
  if live then
    added = added + 1
    if nrefs > 0 then
      redis.call('XACK', KEYS[2], group, unpack(refs))
      if delete then redis.call('XDEL', KEYS[2], unpack(refs)) end
    end
  end
end
return added
"""

# Finishing a delivered entry: ack + delete it and add its parts (after a 400 split), once.
# KEYS: stream. ARGV: group, entry id, n parts, (2*n fields, field, value...)...
_FINISH_ENTRY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 0
end
local i = 4
for e = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[i]); i = i + 1
  local fields = {}
  for f = 1, n do fields[f] = ARGV[i]; i = i + 1 end
  redis.call('XADD', KEYS[1], '*', unpack(fields))
end
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


def _ensure_group(link: RedisLink, stream: str, group: str) -> None:
    try:
        link.client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class _Held:
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
        with self._lock:
            ids = list(self._ids)
        if not ids:
            return
        with translated(QueueError, "refresh held entries", self._link):
            self._link.client.xclaim(self._stream, self._group, self._consumer, 0, ids,
                                     justid=True)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_entries(reply: Any) -> list[tuple[str, list[bytes] | None]]:
    """Entries of a raw XREADGROUP reply on one stream: (id, flat field list or None).

    RESP3 replies are a map {stream: entries}, RESP2 ones a list [[stream, entries]]."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(_decode(entry_id), fields) for entry_id, fields in entries]


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Claimer:
    """Pending entries this consumer should (re)take: its own from a previous life, once,
    then those idle past the visibility timeout (dead consumers), with XAUTOCLAIM."""

    def __init__(self, link: RedisLink, stream: str, group: str, consumer: str,
                 visibility: float, held: _Held) -> None:
        self._link, self._stream, self._group, self._consumer = link, stream, group, consumer
        self._held = held
        self.visibility_ms = int(visibility * 1000)
        self._lock = threading.Lock()
        self._own_loaded = False
        self._backlog: deque[tuple[str, dict[bytes, bytes] | None]] = deque()
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._claim_every = min(max(visibility / 4, 0.5), 5.0)

    def claim_soon(self) -> None:
        with self._lock:
            self._next_claim = 0.0
            self._cursor = "0-0"

    def take(self, count: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
        with self._lock:
            if not self._own_loaded:
                self._load_own()
                self._own_loaded = True
            if (not self._backlog and time.monotonic() >= self._next_claim
                    and not self._link.recently_failed()):
                self._next_claim = time.monotonic() + self._claim_every
                self._autoclaim(count)
            return [self._backlog.popleft() for _ in range(min(count, len(self._backlog)))]

    def _load_own(self) -> None:
        last = "0"
        while True:
            entries = self._link.xreadgroup(self._group, self._consumer, self._stream, 500,
                                            start=last)
            if not entries:
                break
            for entry_id, flat in entries:
                self._backlog.append((entry_id, _fields(flat) if flat else None))
            last = entries[-1][0]
        if self._backlog:
            log.warning("%s: re-reading %d entries this consumer (%s) held before it stopped",
                        self._stream, len(self._backlog), self._consumer)

    def _autoclaim(self, count: int) -> None:
        reply = self._link.client.xautoclaim(self._stream, self._group, self._consumer,
                                             self.visibility_ms, start_id=self._cursor,
                                             count=count)
        self._cursor = _decode(reply[0])
        # entries this process still holds only look idle (e.g. just after an outage):
        # claiming them refreshed them; they must not be handed out a second time
        claimed = [(i, f) for i, f in reply[1] if not self._held.holds(_decode(i))]
        for entry_id, fields in claimed:
            self._backlog.append((_decode(entry_id), fields or None))
        if claimed:
            log.warning("%s: took over %d entries idle for more than %.0f s from other "
                        "consumers", self._stream, len(claimed), self.visibility_ms / 1000)


def _times_delivered(link: RedisLink, stream: str, group: str, entry_id: str) -> int:
    info = link.client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
    return int(info[0]["times_delivered"]) if info else 1


# --- outbound queue ------------------------------------------------------------------


def batch_fields(batch: Batch) -> dict[str, bytes | str]:
    return {
        "id": batch.id,
        "path": batch.path,
        "payloads": b"\n".join(batch.payloads),  # compact JSON never holds a raw newline
        "invoice_ids": json.dumps(batch.invoice_ids),
        "message_ids": json.dumps(batch.message_ids),
        "created_at": repr(batch.created_at),
        # inbound entry ids: their timestamps give inbound-to-202 latency after a restart too
        "refs": json.dumps(batch.refs),
    }


def batch_from_fields(fields: dict[bytes, bytes]) -> Batch:
    return Batch(
        path=fields[b"path"].decode(),
        payloads=tuple(fields[b"payloads"].split(b"\n")),
        invoice_ids=tuple(json.loads(fields[b"invoice_ids"])),
        message_ids=tuple(json.loads(fields[b"message_ids"])),
        id=fields[b"id"].decode(),
        created_at=float(fields[b"created_at"]),
        refs=tuple(json.loads(fields.get(b"refs", b"[]"))),
    )


class RedisQueue(QueueBackend):
    """The outbound queue on a Redis stream with a consumer group (see the module doc)."""

    name = "redis"
    durable = True
    group_commit = True  # put_many is one atomic, idempotent script

    def __init__(self, link: RedisLink, *, stream: str, group: str, consumer: str,
                 visibility_timeout: float, block_timeout: float, prefetch: int = 4) -> None:
        self.link = link
        self.stream, self.group, self.consumer = stream, group, consumer
        self._block_ms = max(1, int(block_timeout * 1000))
        self._prefetch = max(1, prefetch)
        self._buffer: deque[Delivery] = deque()
        self._buffer_lock = threading.Lock()
        self._fetching = threading.Lock()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._held = _Held(link, stream, group, consumer)
        self._claimer = _Claimer(link, stream, group, consumer, visibility_timeout,
                                 self._held)
        link.on_heartbeat(self._held.refresh, visibility_timeout / 3)

    def _ensure(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                _ensure_group(self.link, self.stream, self.group)
                self._check_persistence()
                self._ready = True

    def _check_persistence(self) -> None:
        try:
            aof = self.link.client.config_get("appendonly").get("appendonly")
            policy = self.link.client.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.RedisError:
            return  # CONFIG may be disabled (managed Redis): nothing to check
        if aof != "yes":
            log.warning("Redis at %s runs without AOF (appendonly %s): a Redis crash can lose "
                        "queued batches; production needs appendonly yes", self.link.url, aof)
        if policy not in (None, "noeviction"):
            log.warning("Redis at %s evicts keys (maxmemory-policy %s): queued batches can be "
                        "lost; production needs noeviction", self.link.url, policy)

    def put(self, batch: Batch, source: Source | None = None) -> bool:
        return self.put_many([batch], source)

    def put_many(self, batches: Sequence[Batch], source: Source | None = None) -> bool:
        """All ``batches`` in one script call; with a Redis source on the same server their
        inbound entries are acked in the same atomic step."""
        inbound = _sibling(source, self.link)
        what = (f"enqueue batch {batches[0].id}" if len(batches) == 1
                else f"enqueue {len(batches)} batches")
        with translated(QueueError, what, self.link):
            self._ensure()
            self.link.add_entries(
                self.stream,
                [([batch_fields(b)], b.refs if inbound is not None else ()) for b in batches],
                inbound=inbound)
        if inbound is not None:
            inbound.forget([ref for batch in batches for ref in batch.refs])
        return inbound is not None

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
                for entry_id, fields in self._claimer.take(1):
                    delivery = self._delivery(entry_id, fields, claimed=True)
                    if delivery is not None:
                        return delivery
                block = min(self._block_ms, max(1, int(timeout * 1000)))
                entries = self.link.xreadgroup(self.group, self.consumer, self.stream,
                                               self._prefetch, block)
                deliveries = [d for entry_id, flat in entries
                              if (d := self._delivery(entry_id, _fields(flat) if flat else None,
                                                      claimed=False)) is not None]
            if not deliveries:
                return None
            with self._buffer_lock:
                self._buffer.extend(deliveries[1:])
            return deliveries[0]
        finally:
            self._fetching.release()

    def _delivery(self, entry_id: str, fields: dict[bytes, bytes] | None,
                  claimed: bool) -> Delivery | None:
        if not fields:  # deleted while pending: nothing left to send
            self.link.client.xack(self.stream, self.group, entry_id)
            return None
        try:
            batch = batch_from_fields(fields)
        except (KeyError, ValueError) as exc:
            raise QueueError(f"entry {entry_id} of {self.stream} is not an ms1 batch "
                             f"({exc!r}); left pending for an operator") from None
        attempts = _times_delivered(self.link, self.stream, self.group, entry_id) \
            if claimed else 1
        self._held.add([entry_id])
        return Delivery(batch, entry_id, attempts)

    def _finish(self, delivery: Delivery, parts: Sequence[Batch], what: str) -> None:
        with translated(QueueError, what, self.link):
            self.link.finish_entry(self.stream, self.group, delivery.token,
                                   [batch_fields(part) for part in parts])
        self._held.discard([delivery.token])

    def ack(self, delivery: Delivery) -> None:
        self._finish(delivery, (), f"ack batch {delivery.batch.id}")

    def replace(self, delivery: Delivery, parts: Sequence[Batch]) -> None:
        self._finish(delivery, parts, f"split batch {delivery.batch.id}")

    def release(self, delivery: Delivery) -> None:
        """Mark the entry idle past the visibility timeout: the next XAUTOCLAIM of any
        instance (this one included) takes it at once. It never leaves the stream."""
        self._held.discard([delivery.token])
        with translated(QueueError, f"release batch {delivery.batch.id}", self.link):
            self.link.client.xclaim(self.stream, self.group, self.consumer, 0,
                                    [delivery.token], idle=self._claimer.visibility_ms + 1,
                                    justid=True)
        self._claimer.claim_soon()

    def stats(self) -> QueueStats:
        with translated(QueueError, "read queue length", self.link):
            self._ensure()
            pipe = self.link.client.pipeline(transaction=False)
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.group)
            length, pending = pipe.execute()
        in_flight = int(pending["pending"])
        return QueueStats(max(0, int(length) - in_flight), in_flight, None)

    def describe(self) -> dict[str, object]:
        return describe_stream(self.link, self.stream, self.group, QueueError)

    def close(self) -> None:
        """Give back prefetched batches no sender took, then let go of the connection."""
        with self._buffer_lock:
            unsent, self._buffer = list(self._buffer), deque()
        for delivery in unsent:
            with contextlib.suppress(QueueError):
                self.release(delivery)
        self.link.release()


def _sibling(source: Source | None, link: RedisLink) -> RedisSource | None:
    """``source`` if it is a Redis source on the same client (so acks can be atomic)."""
    if isinstance(source, RedisSource) and source.link is link:
        return source
    return None


def describe_stream(link: RedisLink, stream: str, group: str,
                    error: type[Ms1Error]) -> dict[str, object]:
    """Length, pending and lag of the group, and its consumers with pending and idle time."""
    with translated(error, f"describe {stream}", link):
        length = link.client.xlen(stream)
        try:
            groups = link.client.xinfo_groups(stream)
            consumers = link.client.xinfo_consumers(stream, group)
        except redis.ResponseError:  # no such stream or group yet
            groups, consumers = [], []
    info: dict[str, object] = {"stream": stream, "length": length}
    for g in groups:
        if _decode(g["name"]) == group:
            info.update(group=group, pending=g["pending"], lag=g.get("lag"))
    info["consumers"] = [{"name": _decode(c["name"]), "pending": c["pending"],
                          "idle_s": round(c["idle"] / 1000, 1)} for c in consumers]
    return info


# --- inbound source ----------------------------------------------------------------


class RedisSource(Source):
    """E-mails from the inbound stream (see the module doc)."""

    name = "redis"

    def __init__(self, link: RedisLink, *, stream: str, group: str, consumer: str,
                 visibility_timeout: float, delete_acked: bool) -> None:
        self.link = link
        self.stream, self.group, self.consumer = stream, group, consumer
        self.delete = delete_acked
        self._ready = False
        self._held = _Held(link, stream, group, consumer)
        self._claimer = _Claimer(link, stream, group, consumer, visibility_timeout,
                                 self._held)
        link.on_heartbeat(self._held.refresh, visibility_timeout / 3)

    def _ensure(self) -> None:
        if not self._ready:
            _ensure_group(self.link, self.stream, self.group)
            self._ready = True

    def read(self, max_items: int, timeout: float) -> list[InboundMessage]:
        with translated(SourceError, f"read {self.stream}", self.link):
            self._ensure()
            claimed = self._claimer.take(max_items)
            messages = []
            gone = []
            if claimed:
                for entry_id, fields in claimed:
                    if not fields:
                        gone.append(entry_id)
                    else:
                        messages.append(self._message(entry_id, fields.get(b"email"), fields))
            else:
                entries = self.link.xreadgroup(self.group, self.consumer, self.stream,
                                               max_items, max(1, int(timeout * 1000)))
                for entry_id, flat in entries:
                    if not flat:
                        gone.append(entry_id)
                    elif len(flat) == 2 and flat[0] == b"email":  # the usual shape: fast
                        messages.append(InboundMessage(entry_id, flat[1]))
                    else:
                        fields = _fields(flat)
                        messages.append(self._message(entry_id, fields.get(b"email"), fields))
            if gone:
                self.link.client.xack(self.stream, self.group, *gone)
        self._held.add([m.ref for m in messages])
        return messages

    def _message(self, entry_id: str, data: bytes | None,
                 fields: dict[bytes, bytes]) -> InboundMessage:
        if data is None:
            log.error("%s entry %s has no 'email' field (fields: %s): dead-lettered",
                      self.stream, entry_id, sorted(_decode(k) for k in fields))
            data = b""
        return InboundMessage(entry_id, data)

    def forget(self, refs: Sequence[str]) -> None:
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
        with translated(SourceError, f"add e-mails to {self.stream}", self.link):
            for start in range(0, len(emails), XADD_CHUNK):
                pipe = self.link.client.pipeline(transaction=False)
                for data in emails[start:start + XADD_CHUNK]:
                    pipe.xadd(self.stream, {"email": data})
                pipe.execute()
        return len(emails)

    def describe(self) -> dict[str, object]:
        return describe_stream(self.link, self.stream, self.group, SourceError)

    def close(self) -> None:
        self.link.release()


# --- dead letters ----------------------------------------------------------------


def letter_fields(letter: DeadLetter) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {"reason": letter.reason, "stage": letter.stage,
                                      "payload": letter.payload, "at": repr(letter.at)}
    for key in ("message_id", "invoice_id", "source_ref", "ms4_answer"):
        value = getattr(letter, key)
        if value is not None:
            fields[key] = value
    return fields


def letter_from_fields(entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(key: str) -> str | None:
        value = fields.get(key.encode())
        return None if value is None else value.decode("utf-8", "replace")

    return DeadLetter(reason=text("reason") or "", stage=text("stage") or "",
                      payload=fields.get(b"payload", b""), message_id=text("message_id"),
                      invoice_id=text("invoice_id"), source_ref=text("source_ref"),
                      ms4_answer=text("ms4_answer"), at=float(text("at") or 0), id=entry_id)


class RedisDeadLetters(DeadLetterStore):
    """Dead letters in a Redis stream; ids are the stream entry ids."""

    name = "redis"
    durable = True

    def __init__(self, link: RedisLink, *, stream: str) -> None:
        self.link = link
        self.stream = stream

    def add(self, letters: Sequence[DeadLetter], source: Source | None = None) -> bool:
        inbound = _sibling(source, self.link)
        refs = [letter.source_ref for letter in letters if letter.source_ref] \
            if inbound is not None else []
        with translated(QueueError, f"store {len(letters)} dead letters", self.link):
            self.link.add_entries(self.stream, [([letter_fields(x) for x in letters], refs)],
                                  inbound=inbound)
        if inbound is not None:
            inbound.forget(refs)
        return inbound is not None

    def list(self, limit: int = 100, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        with translated(QueueError, f"read {self.stream}", self.link):
            if ids is None:
                entries = self.link.client.xrange(self.stream, count=limit)
            else:
                pipe = self.link.client.pipeline(transaction=False)
                for entry_id in ids:
                    pipe.xrange(self.stream, min=entry_id, max=entry_id, count=1)
                entries = [e for found in pipe.execute() for e in found][:limit]
        return [letter_from_fields(_decode(i), f) for i, f in entries]

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


# --- shared rate limiter -------------------------------------------------------------

_LIMIT_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + lease) * 1000))
  return {1, '0'}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(oldest[2]) + window - now)}
"""

_LIMIT_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
"""


class RedisRateLimiter(RateLimiter):
    """At most ``limit`` requests in any ``window`` s for every instance on the Redis.

    A sliding-window log in a sorted set: member = one request, score = when it ended
    (Redis's clock, so hosts need not agree on the time). While in flight a request's
    score is start + ``lease`` (the longest a request can take), so the slot of a
    process killed mid-request still expires.
    """

    def __init__(self, link: RedisLink, *, key: str, limit: int, window: float,
                 lease: float) -> None:
        self.link = link
        self.key, self.limit, self.window, self.lease = key, limit, window, lease
        self._acquire = link.client.register_script(_LIMIT_ACQUIRE)
        self._finish = link.client.register_script(_LIMIT_FINISH)

    def try_acquire(self) -> tuple[str | None, float]:
        token = uuid.uuid4().hex
        with translated(QueueError, "take a rate-limit slot", self.link):
            granted, wait = self._acquire(keys=[self.key],
                                          args=[self.limit, self.window, token, self.lease])
        if int(granted):
            return token, 0.0
        return None, max(float(wait), 0.001)

    def finish(self, token: str) -> None:
        with translated(QueueError, "stamp a rate-limit slot", self.link):
            self._finish(keys=[self.key], args=[token])

    def cancel(self, token: str) -> None:
        with translated(QueueError, "give back a rate-limit slot", self.link):
            self.link.client.zrem(self.key, token)

    def close(self) -> None:
        self.link.release()


# --- factories ---------------------------------------------------------------------


def _check_linger(config: Config) -> None:
    visibility = config.get_float(SECTION, "visibility_timeout")
    if config.get_float("batch", "max_wait") * 2 + 5 > visibility:
        raise config.error(SECTION, "visibility_timeout",
                           f"must exceed 2 x [batch] max_wait + 5 s ({visibility} s is too "
                           "short: e-mails waiting in an open batch would be taken over)")


def _queue(config: Config, link: RedisLink) -> RedisQueue:
    return RedisQueue(link, stream=config.get_str(SECTION, "outbound_stream"),
                      group=config.get_str(SECTION, "group"), consumer=consumer_name(config),
                      visibility_timeout=config.get_float(SECTION, "visibility_timeout"),
                      block_timeout=config.get_float(SECTION, "block_timeout"),
                      prefetch=min(8, config.get_int("send", "threads")))


@hookimpl
def ms1_make_queue(name: str, config: Config) -> QueueBackend | None:
    if name == "redis":
        return _queue(config, link_for(config))
    if name == "auto":
        link = link_for(config)
        if link.ping():
            log.info("queue: Redis answers at %s: using the durable redis backend", link.url)
            return _queue(config, link)
        link.release()
        log.warning("queue: no Redis answers at %s: using the in-memory backend (not "
                    "durable: batches not yet delivered are lost if ms1 stops)", link.url)
        return MemoryQueue()
    return None


@hookimpl
def ms1_make_source(name: str, config: Config, inputs: Sequence[str]) -> Source | None:
    if name != "redis":
        return None
    if inputs:
        raise config.error("source", "name", "the redis source reads the inbound stream, not "
                           "files: push files with 'ms1-service enqueue FILE...'")
    _check_linger(config)
    return RedisSource(link_for(config), stream=config.get_str(SECTION, "inbound_stream"),
                       group=config.get_str(SECTION, "group"), consumer=consumer_name(config),
                       visibility_timeout=config.get_float(SECTION, "visibility_timeout"),
                       delete_acked=config.get_bool(SECTION, "delete_acked_inbound"))


@hookimpl
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    if name != "redis":
        return None
    return RedisDeadLetters(link_for(config),
                            stream=config.get_str(SECTION, "dead_letter_stream"))


@hookimpl
def ms1_make_rate_limiter(name: str, config: Config) -> RateLimiter | None:
    if name != "redis":
        return None
    lease = 60.0
    with contextlib.suppress(Ms1Error):
        lease = sum(config.get_float("transport.http", k) for k in
                    ("connect_timeout", "write_timeout", "read_timeout", "pool_timeout"))
    return RedisRateLimiter(link_for(config), key=config.get_str(SECTION, "rate_limit_key"),
                            limit=config.get_int("send", "requests_per_minute"),
                            window=config.get_float("send", "rate_window"), lease=lease)
