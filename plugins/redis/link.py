"""The connection to Redis: one redis-py client per config, and what goes with it.

:class:`RedisLink` holds the client, its connection pool, the Lua scripts (``scripts/*.lua``,
registered with redis-py, which loads one again when Redis lost its script cache) and
the heartbeat thread. :func:`link_for` builds or shares the link of a config,
:func:`translated` turns redis-py's errors into ms1's, :func:`redact_url` hides the
password (ms1's one redaction), :func:`check_url` is the ``[redis] url`` option's check,
:func:`key_names` is the one rule that names every key ms1 uses.

More: docs/internals.md, ``ms1_plugins.redis.link``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ms1.config import Config, Secret, sender_threads, split_address
from ms1.errors import Ms1Error
from ms1.redaction import redact

log = logging.getLogger(__name__)
SECTION = "redis"
#: the Lua scripts, ``scripts/<name>.lua``
SCRIPTS = ("enqueue", "finish", "held_messages", "ledger_record", "merge", "submit",
           "limiter_acquire", "limiter_finish", "limiter_learn")
#: a stream entry's fields as ms1 writes them
Fields = dict[str, bytes | str]
#: seconds ms1 leaves out the WAIT after its own scripts once one fell short
OWN_WAIT_PAUSE = 5.0
#: the hash tag of every key when ``[redis] cluster = yes`` and ``key_tag`` is empty
CLUSTER_KEY_TAG = "ms1"
#: options naming a key, and the key they name (:func:`key_names`)
KEY_OPTIONS = ("inbound_stream", "outbound_stream", "dead_letter_stream", "rate_limit_key",
               "ledger_key")
#: errors that mean "Redis (or its primary) is not there right now", not "wrong command"
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError, redis.exceptions.MovedError,
    redis.exceptions.TryAgainError, RedisClusterException)
#: how Redis says no wait will help: a key of another type, an ACL that forbids the
#: command or key (``NOPERM``; inside a script, "can't run this command")
LASTING_CODES = ("WRONGTYPE", "NOPERM")
LASTING_TEXTS = ("can't run this command", "no permissions to")


def redact_url(url: str) -> str:
    """The URL as it may be shown: ``user:***@``, ``?password=***``
    (:func:`ms1.redaction.redact`)."""
    return redact(url)


def check_url(url: str) -> None:
    """What redis-py refuses in ``[redis] url`` (its own parser: scheme, port, ``db``,
    query arguments): raise ValueError. Run at load, so ``check`` refuses it too."""
    redis.connection.parse_url(url)  # type: ignore[no-untyped-call]  # redis-py: untyped


def parse_addresses(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port, host:port, ...`` (``[redis] sentinels``, ``cluster_nodes``) as pairs;
    empty text: none. Raise ValueError naming the bad one."""
    found = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        host, port = split_address(part)
        found.append((host, port))
    if text.strip() and not found:
        raise ValueError(f"expected host:port, host:port, ..., got {text!r}")
    return tuple(found)


def check_addresses(text: str) -> None:
    parse_addresses(text)


def hash_tag(key: str) -> str | None:
    """The hash tag of ``key`` as Redis Cluster reads it: what lies between the first
    ``{`` and the next ``}``, if that is not empty; None if it has none."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1:end]


def check_key_tag(tag: str) -> None:
    if any(char in tag for char in "{}") or tag != tag.strip() or any(
            not char.isprintable() for char in tag):
        raise ValueError(f"a hash tag without braces or spaces, e.g. ms1 (keys become "
                         f"{{ms1}}:emails ...), got {tag!r}")


def tagged(name: str, tag: str) -> str:
    """The key ms1 uses for the configured name ``name`` under hash tag ``tag`` (the one
    key-naming rule): no tag, or a name that already carries it: the name as it is; a name
    starting with ``tag:`` gets that prefix in braces (``ms1:emails`` -> ``{ms1}:emails``);
    any other name gets ``{tag}:`` in front (``orders:in`` -> ``{ms1}:orders:in``). A name
    carrying another hash tag is a ValueError (its keys would land in another slot)."""
    if not tag:
        return name
    found = hash_tag(name)
    if found == tag:
        return name
    if found is not None:
        raise ValueError(f"{name!r} carries the hash tag {{{found}}}, not key_tag {{{tag}}}: "
                         f"every key must be in one slot (set key_tag = {found}?)")
    if name.startswith(f"{tag}:"):
        return f"{{{tag}}}{name[len(tag):]}"
    return f"{{{tag}}}:{name}"


def pool_size(threads: int) -> int:
    """Most connections of a process started with ``threads`` senders: enough for every
    thread to run a command at the same moment (the senders, the reader, the committer,
    the queue's fetcher, the heartbeat, status and metrics), at least 16. Senders added
    by a reload share them: a connection is held for one command, a caller finding them
    all busy waits for one."""
    return max(16, threads + 8)


def _script_text(name: str) -> str:
    package = resources.files(__name__.rpartition(".")[0])
    return package.joinpath("scripts", f"{name}.lua").read_text()


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(char for char in part if char.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool (its connections ask the Sentinels for the primary, and
    drop a connection to a demoted one), blocking like ms1's single-server pool: a caller
    finding every connection busy waits for one instead of failing."""


@dataclass(frozen=True)
class Topology:
    """How the primary is found: one server (the URL), Sentinels, or a Redis Cluster."""

    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = "mymaster"
    sentinel_password: Secret | None = None
    cluster: bool = False
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def kind(self) -> str:
        return "sentinel" if self.sentinels else "cluster" if self.cluster else "single"

    def describe(self) -> str:
        if self.sentinels:
            where = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"Sentinel service {self.service_name!r} ({where})"
        return "Redis Cluster" if self.cluster else "one server"


SINGLE = Topology()


def _without_password(url: str) -> str:
    """``url`` with no password in its userinfo (the password goes in by argument)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host + \
        (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisLink:
    """One redis-py client with ms1's settings, shared by the components of one config."""

    def __init__(self, url: str, *, password: Secret | None = None,
                 socket_timeout: float = 10.0, connect_timeout: float = 3.0,
                 max_connections: int = 16, topology: Topology = SINGLE, key_tag: str = "",
                 min_replicas: int = 0, replica_timeout: float = 1.0,
                 tls: Mapping[str, str] | None = None) -> None:
        """``tls``: redis-py's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` for a
        ``rediss://`` URL (``[redis] ca_file``, ``client_cert_file``, ``client_key_file``)."""
        self.topology = topology
        self._tls = dict(tls or {})
        self.key_tag = CLUSTER_KEY_TAG if topology.cluster and not key_tag else key_tag
        #: a key in the slot of every key ms1 uses (routes WAIT in a cluster)
        self.home_key = f"{{{self.key_tag}}}" if self.key_tag else "ms1"
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        redacted = redact_url(url)
        self.url = redacted if topology.kind == "single" else \
            f"{topology.describe()}, {redacted}"
        self._lock = threading.Lock()
        self._client: Any = None
        self._sentinel: Sentinel | None = None
        self._scripts: dict[str, Script] = {}
        self._build: Callable[[], Any]
        #: the longest one Redis call may take by design (the parts' ``longest_call``)
        self.longest_call = socket_timeout + connect_timeout
        self._make_client(url, password, socket_timeout, connect_timeout, max_connections)
        self._users = 0
        self.closed = False
        self._refreshers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._interval = 20.0
        #: time.monotonic() of the last failed Redis call (0: none yet)
        self.failed_at = 0.0
        self._primary: str | None = None
        self._waitaof: bool | None = None  # does the primary have WAITAOF (7.2+)?
        #: (stream, group) pairs known to exist (:func:`.leases.ensure_group`); forgotten
        #: when Redis answers NOGROUP
        self.groups: set[tuple[str, str]] = set()
        #: groups that existed and then drew a NOGROUP: is their stream still there?
        self.lost_groups: set[tuple[str, str]] = set()
        #: a stream's length as last counted (the queue's counts): what its loss loses
        self.last_lengths: dict[str, int] = {}
        #: streams found gone while ms1 used them, each said in a line (:meth:`vanished`)
        self.losses: list[str] = []
        #: the entries they held at the last count (at least), by stream
        self.lost_counts: dict[str, int] = {}
        #: Redis's maxmemory-policy as last read (None: not read, or CONFIG/INFO refused)
        self.eviction_policy: str | None = None
        #: ``[redis] allow_eviction``; and why ms1 refuses to use this Redis, once it found
        #: it evicting without that (every queue call then fails with it)
        self.allow_eviction = False
        self.refusal: str | None = None
        self._own_wait_paused_until = 0.0

    # --- the client ----------------------------------------------------------------------

    def _make_client(self, url: str, password: Secret | None, socket_timeout: float,
                     connect_timeout: float, max_connections: int) -> None:
        kwargs: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": connect_timeout + socket_timeout,  # wait for a free pooled connection
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "client_name": "ms1",
        }
        secret = password.reveal() if password is not None else None
        kind = self.topology.kind
        try:
            scheme = urlsplit(url).scheme
            if scheme in ("redis", "rediss"):
                kwargs["socket_keepalive"] = True
            if scheme == "rediss":
                kwargs.update(self._tls)
            if kind == "single":
                if secret is not None:
                    kwargs["password"] = secret
                pool = redis.BlockingConnectionPool.from_url(
                    url, health_check_interval=30, retry=Retry(NoBackoff(), 0), **kwargs)
                self._client = redis.Redis(connection_pool=pool)
                self._register_scripts()
                return
            if scheme == "unix":
                raise ValueError(f"{kind} needs a redis:// or rediss:// URL, not unix://")
            if kind == "sentinel":
                self._sentinel_client(url, secret, kwargs, connect_timeout)
                return
            # a cluster: built on first use (construction reads the slot table)
            options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
            if options.get("db", 0) != 0:
                raise ValueError("a Redis Cluster has database 0 only: drop /N from the URL")
            if secret is not None:
                url = _without_password(url)
                kwargs["password"] = secret
            nodes = [ClusterNode(host, port)  # type: ignore[no-untyped-call]  # redis-py
                     for host, port in self.topology.cluster_nodes]
            self._build = lambda: RedisCluster(
                url=url, startup_nodes=nodes, retry=Retry(NoBackoff(), 0),
                require_full_coverage=False,
                connection_pool_class=redis.BlockingConnectionPool, **kwargs)
        except ValueError as exc:
            raise Ms1Error(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None

    def _sentinel_client(self, url: str, secret: str | None, kwargs: dict[str, Any],
                         connect_timeout: float) -> None:
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        ssl = options.pop("connection_class", None) is redis.SSLConnection
        for name in ("host", "port"):
            options.pop(name, None)
        if secret is not None:
            options["password"] = secret
        if ssl:
            options["ssl"] = True
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": connect_timeout, "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0), "client_name": "ms1-sentinel-query"}
        if ssl:
            sentinel_kwargs["ssl"] = True
            sentinel_kwargs.update(self._tls)
        if self.topology.sentinel_password is not None:
            sentinel_kwargs["password"] = self.topology.sentinel_password.reveal()
        self._sentinel = Sentinel(
            list(self.topology.sentinels), sentinel_kwargs=sentinel_kwargs)
        self._client = self._sentinel.master_for(
            self.topology.service_name, connection_pool_class=BlockingSentinelPool,
            health_check_interval=30, retry=Retry(NoBackoff(), 0), **{**kwargs, **options})
        self._register_scripts()

    def _register_scripts(self) -> None:
        self._scripts = {name: self._client.register_script(_script_text(name))
                         for name in SCRIPTS}

    @property
    def client(self) -> Any:
        """The redis-py client (``redis.Redis``, Sentinel's primary client or
        ``RedisCluster``). A cluster client is built on first use, which reads the slot
        table: while no node answers this raises, like any call during an outage. Typed
        Any: redis-py annotates replies as RESP2/RESP3 unions that never narrow."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._build()
                self._register_scripts()
            return self._client

    def script(self, name: str, keys: Sequence[str],
               args: Sequence[bytes | str | int | float], *, replicate: bool = False) -> Any:
        """Run ``scripts/<name>.lua`` (EVALSHA; redis-py loads it again after NOSCRIPT).
        ``replicate``: one of ms1's own writes that should reach ``min_replicas_acked``
        replicas before it counts as done (best effort: see the module doc)."""
        client = self.client
        if not replicate or not self._own_wait_due():
            return self._scripts[name](keys=keys, args=args, client=client)
        replies, acked = self.replicated(
            lambda pipe: self._scripts[name](keys=keys, args=args, client=pipe))
        self._own_wait_done(acked, name)
        return replies[0]

    def script_on(self, pipe: Any, name: str, keys: Sequence[str],
                  args: Sequence[bytes | str | int | float]) -> None:
        """Queue ``scripts/<name>.lua`` on ``pipe`` (a pipeline of :meth:`replicated`)."""
        self._scripts[name](keys=keys, args=args, client=pipe)

    # --- replicas --------------------------------------------------------------------------

    @property
    def uses_waitaof(self) -> bool:
        """True once the primary was found to have WAITAOF (Redis 7.2+)."""
        return bool(self._waitaof)

    def replicated(self, queue: Callable[[Any], object]) -> tuple[list[Any], int]:
        """Run the commands ``queue`` puts on a pipeline, followed on the same connection
        by ``WAIT min_replicas_acked timeout`` (``WAITAOF 0 n timeout`` on Redis 7.2+).
        Returns their replies and how many replicas acknowledged them (0 without
        ``min_replicas_acked``: then no WAIT is sent). Raises redis-py's errors."""
        try:
            pipe = self._node_client().pipeline(transaction=False)
        except (redis.RedisError, RedisClusterException):
            self._reroute()  # e.g. the slot is not in the table just now
            raise
        try:
            queue(pipe)
            count = len(pipe)
            if self.min_replicas > 0:
                waitaof = self._has_waitaof()
                timeout_ms = max(1, int(self.replica_timeout * 1000))
                if waitaof:
                    pipe.execute_command("WAITAOF", 0, self.min_replicas, timeout_ms)
                else:
                    pipe.execute_command("WAIT", self.min_replicas, timeout_ms)
            replies = pipe.execute()
        except (redis.RedisError, RedisClusterException):
            self._reroute()
            raise
        finally:
            pipe.reset()
        if self.min_replicas <= 0:
            return list(replies), 0
        ack = replies[count]
        acked = int(ack[1]) if isinstance(ack, list | tuple) else int(ack)
        return list(replies[:count]), acked

    def _node_client(self) -> Any:
        """A client of the primary holding every key ms1 uses: the client itself, or in a
        cluster the node serving the keys' slot (a pipeline there is one connection, so a
        WAIT follows the writes it is about)."""
        client = self.client
        if self.topology.cluster:
            return client.get_redis_connection(client.get_node_from_key(self.home_key))
        return client

    def _reroute(self) -> None:
        """After a failed call through a cluster node's own client: one routed call, so the
        cluster client reads the slot table again (it does on a connection error or a
        MOVED) and the next try goes to the slot's new primary."""
        if self.topology.cluster and self._client is not None:
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                self._client.exists(self.home_key)

    def _has_waitaof(self) -> bool:
        """Whether the primary has WAITAOF (Redis 7.2+); asked once per primary."""
        if self._waitaof is None:
            try:
                info = self._node_client().info("server")
            except redis.ResponseError as exc:  # NOPERM: an ACL user without INFO
                self._waitaof = False
                log.warning("cannot ask Redis its version (%s): a write counts as on a "
                            "replica once WAIT says the replica has it (WAITAOF needs 7.2 "
                            "and INFO to know it is there)", exc)
                return False
            version = str(info.get("redis_version", "0"))
            self._waitaof = _version(version) >= (7, 2)
            if self._waitaof:
                log.info("Redis %s has WAITAOF: a write counts as on a replica once that "
                         "replica has fsynced it to its AOF (replicas need appendonly yes)",
                         version)
            else:
                log.info("Redis %s has no WAITAOF (7.2+): a write counts as on a replica once "
                         "that replica has received it (WAIT)", version)
        return self._waitaof

    def _own_wait_due(self) -> bool:
        return self.min_replicas > 0 and time.monotonic() >= self._own_wait_paused_until

    def _own_wait_done(self, acked: int, what: str) -> None:
        if acked >= self.min_replicas:
            if self._own_wait_paused_until:
                self._own_wait_paused_until = 0.0
                log.warning("Redis replicas acknowledge ms1's writes again (%d of %d)",
                            acked, self.min_replicas)
            return
        if not self._own_wait_paused_until:
            log.warning("only %d of %d Redis replicas acknowledged ms1's %s within %g s "
                        "([redis] min_replicas_acked, replica_ack_timeout): delivery goes on; "
                        "a failover now can send some batches twice; waiting for replicas "
                        "is left out for %g s at a time until they answer", acked,
                        self.min_replicas, what, self.replica_timeout, OWN_WAIT_PAUSE)
        self._own_wait_paused_until = time.monotonic() + OWN_WAIT_PAUSE

    # --- the primary -----------------------------------------------------------------------

    def primary(self) -> str | None:
        """``host:port`` of the primary ms1 uses now, as the client last found it (no I/O):
        the URL's server, the Sentinels' primary, the cluster node serving ms1's slot.
        None before the first connection."""
        client = self._client
        if client is None:
            return None
        try:
            if self.topology.sentinels:
                address = client.connection_pool.master_address
                return None if address is None else f"{address[0]}:{address[1]}"
            if self.topology.cluster:
                return str(client.get_node_from_key(self.home_key).name)
        except (redis.RedisError, RedisClusterException, AttributeError):
            return None
        kwargs = client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host')}:{kwargs.get('port')}"

    def succeeded(self) -> None:
        """A call just succeeded: log which primary ms1 uses when it is not the one it used
        before (the first one at INFO, a new one after a failover at WARNING). One attribute
        read and a comparison when nothing changed; nothing with one server."""
        if self.topology.kind == "single":
            return
        current = self.primary()
        if current is None or current == self._primary:
            return
        with self._lock:
            if current == self._primary:
                return
            previous, self._primary = self._primary, current
            if previous is not None:
                self._waitaof = None  # another server: ask again
        if previous is None:
            log.info("Redis: %s: primary %s", self.topology.describe(), current)
        else:
            log.warning("Redis: %s: the primary is now %s (was %s)", self.topology.describe(),
                        current, previous)

    def describe(self) -> dict[str, object]:
        """For ``status``: the topology and the primary in use (nothing for one server)."""
        if self.topology.kind == "single":
            return {}
        return {"redis": f"{self.topology.describe()}, primary {self.primary() or '?'}"}

    # --- users -----------------------------------------------------------------------------

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
            client = self._client
            if client is not None:
                client.close()
                if not self.topology.cluster:
                    client.connection_pool.disconnect()
            if self._sentinel is not None:
                with contextlib.suppress(redis.RedisError):
                    self._sentinel.close()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, RedisClusterException):
            return False

    def tls_hint(self, exc: BaseException) -> str:
        """For a TLS failure, what to check, naming the ``[redis]`` option: the handshake
        errors say nothing of ms1's settings."""
        text = str(exc)
        lower = text.lower()
        if "certificate_verify_failed" in lower or "certificate verify failed" in lower:
            trusted = self._tls.get("ssl_ca_certs")
            return ("; TLS: Redis's certificate is not trusted by "
                    + (f"[redis] ca_file {trusted}" if trusted else
                       "the system's CAs ([redis] ca_file is unset)"))
        if "wrong version number" in lower or "record layer failure" in lower:
            return "; TLS: no TLS answers on that port (rediss:// needs Redis's tls-port)"
        if "rediss://" in self.url and ("eof occurred in violation of protocol" in lower
                                               or "certificate required" in lower
                                               or "unknown ca" in lower
                                               or "bad certificate" in lower):
            mine = self._tls.get("ssl_certfile")
            return ("; TLS: Redis closed the handshake: does it require a client certificate "
                    "(tls-auth-clients)? " + (f"[redis] client_cert_file {mine}" if mine else
                                              "[redis] client_cert_file is unset"))
        return ""

    def memory_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (CONFIG GET; INFO where CONFIG is disabled, as on
        managed Redis), kept in :attr:`eviction_policy`; None when Redis does not answer or
        refuses both."""
        try:
            policy = self.server_config("maxmemory-policy")
        except OUTAGE_ERRORS:
            return None  # not there now: asked again at first use
        except (redis.RedisError, RedisClusterException):
            try:
                info = self._node_client().info("memory")
            except (redis.RedisError, RedisClusterException):
                return None
            policy = info.get("maxmemory_policy")
            policy = None if policy is None else str(policy)
        if policy is not None:
            self.eviction_policy = policy
        return policy

    def server_config(self, name: str) -> str | None:
        """``CONFIG GET name`` of the primary (of ms1's slot); raises redis-py's errors."""
        reply = self._node_client().config_get(name)
        value = reply.get(name)
        return None if value is None else str(value)

    # --- heartbeat ---------------------------------------------------------------------

    def on_heartbeat(self, refresher: Callable[[], None], interval: float) -> None:
        """Call ``refresher`` every ``interval`` s (keeps held entries from looking idle)."""
        with self._lock:
            self._refreshers.append(refresher)
            self._interval = min(self._interval, interval)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="redis-heartbeat",
                                                   daemon=True)
                self._heartbeat.start()

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

    def vanished(self, stream: str) -> None:
        """``stream`` existed (ms1's group was on it) and no longer does: Redis evicted it
        (``maxmemory-policy``), or someone deleted or flushed it. Its entries are lost: one
        CRITICAL line, and the loss goes into :attr:`losses` (the queue's counts carry it
        to ``/readyz``, the metrics and the stop summary). A stream last counted empty lost
        nothing: one WARNING."""
        count = self.last_lengths.pop(stream, None)
        why = ("evicted by Redis (maxmemory-policy " + self.eviction_policy + "), deleted or "
               "flushed" if self.eviction_policy not in (None, "noeviction")
               else "deleted or flushed (or evicted)")
        if count == 0:
            log.warning("Redis stream %s vanished (%s); it was empty at the last count: ms1 "
                        "makes it again", stream, why)
            return
        held = (f"the {count} entries it held at the last count are LOST" if count
                else "every entry it held is LOST (not counted)")
        text = (f"Redis lost the stream {stream}: it no longer exists ({why}); {held}; ms1 "
                f"makes it again")
        with self._lock:
            self.losses.append(text)
            self.lost_counts[stream] = self.lost_counts.get(stream, 0) + (count or 0)
        log.critical("%s", text)

    def recently_failed(self) -> bool:
        """True within one heartbeat period (+2 s) of a failed call: while Redis was away
        no instance could refresh what it holds, so nobody's idle entries mean anything
        until every live instance has had a heartbeat to refresh them."""
        return self.failed_at > 0 and time.monotonic() - self.failed_at < self._interval + 2


def evicts_any(policy: str) -> bool:
    """Whether ``maxmemory-policy`` may evict keys without a TTL (ms1's streams): the
    ``allkeys-*`` policies. ``volatile-*`` evict only keys with a TTL (the rate limiter's,
    the fleet's: nothing durable)."""
    return policy.startswith("allkeys-")


def eviction_refusal(link: RedisLink, policy: str) -> str:
    return (f"Redis at {link.url} evicts any key under memory pressure (maxmemory-policy "
            f"{policy}): queued batches and unread e-mails would vanish; set maxmemory-policy "
            "noeviction (or a volatile-* policy: ms1's streams carry no TTL), or "
            "allow_eviction = yes to run anyway with every vanished stream reported as loss")


def lasting(exc: BaseException) -> bool:
    """True if ``exc`` (or an error it was raised from) is Redis refusing for a reason no
    wait clears (:data:`LASTING_CODES`, :data:`LASTING_TEXTS`): retrying it is no use
    until an operator fixes the key or the ACL. Outages, ``READONLY``, ``LOADING``,
    ``OOM`` and the like are passing."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.exceptions.NoPermissionError):
            return True
        if isinstance(seen, redis.ResponseError) and not isinstance(seen, OUTAGE_ERRORS):
            # a pipeline's: "Command # 1 (...) of pipeline caused error: WRONGTYPE ..."
            text = str(seen).rpartition("caused error: ")[2]
            return text.startswith(LASTING_CODES) or any(t in text for t in LASTING_TEXTS)
        seen = seen.__cause__
    return False


@contextlib.contextmanager
def translated(error: type[Ms1Error], what: str, link: RedisLink) -> Iterator[None]:
    """Turn redis-py's exceptions into ms1's, naming the operation and the (redacted) URL."""
    try:
        yield
    except (redis.RedisError, RedisClusterException) as exc:
        if isinstance(exc, OUTAGE_ERRORS):
            link.failed_at = time.monotonic()
        elif isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc) \
                and link.groups:
            # a consumer group is gone: a failover lost its creation (make it again), or
            # its stream is gone (evicted, deleted: a loss, .leases.ensure_group says which)
            log.warning("%s: Redis has no such consumer group (NOGROUP): ms1 checks its "
                        "streams and creates its groups again, from the first entry of "
                        "each stream", what)
            link.lost_groups |= link.groups
            link.groups.clear()
        raise error(f"{what}: {type(exc).__name__}: {exc} (Redis at {link.url})"
                    + link.tls_hint(exc)) from exc
    link.succeeded()


# --- one link per config ---------------------------------------------------------------

_links: weakref.WeakKeyDictionary[Config, dict[str, RedisLink]] = weakref.WeakKeyDictionary()


def key_tag(config: Config) -> str:
    """The hash tag every key carries: ``[redis] key_tag``; with ``cluster = yes`` and no
    tag set, ``ms1``."""
    tag = config.get_str(SECTION, "key_tag").strip("{}")
    if not tag and config.get_bool(SECTION, "cluster"):
        return CLUSTER_KEY_TAG
    return tag


def key_names(config: Config) -> dict[str, str]:
    """The key of each key option (:data:`KEY_OPTIONS`) under the config's hash tag
    (:func:`tagged`): the one place a key ms1 uses is named. Without a tag (one server,
    Sentinel) the names are as configured."""
    tag = key_tag(config)
    names = {}
    for option in KEY_OPTIONS:
        try:
            names[option] = tagged(config.get_str(SECTION, option), tag)
        except ValueError as exc:
            raise config.error(SECTION, option, str(exc)) from None
    return names


def topology_of(config: Config) -> Topology:
    """``[redis] sentinels`` / ``cluster`` as a :class:`Topology` (checked together)."""
    sentinels = parse_addresses(config.get_str(SECTION, "sentinels"))
    cluster = config.get_bool(SECTION, "cluster")
    if sentinels and cluster:
        raise config.error(SECTION, "cluster", "a Redis Cluster has no Sentinels: set either "
                           "sentinels or cluster = yes")
    nodes = parse_addresses(config.get_str(SECTION, "cluster_nodes"))
    if nodes and not cluster:
        raise config.error(SECTION, "cluster_nodes", "only with cluster = yes")
    password = None
    env = config.get_str(SECTION, "sentinel_password_env")
    if env and sentinels:
        value = os.environ.get(env, "")
        if not value:
            raise config.error(SECTION, "sentinel_password_env", f"${env} is not set or empty")
        password = Secret(value, f"${env}")
    service = config.get_str(SECTION, "service_name")
    if sentinels and not service:
        raise config.error(SECTION, "service_name", "the Sentinels' name of the primary is "
                           "needed with sentinels")
    return Topology(sentinels=sentinels, service_name=service, sentinel_password=password,
                    cluster=cluster, cluster_nodes=nodes)


def consumer_name(config: Config) -> str:
    """This instance's consumer name in ms1's groups (``[redis] consumer``, else the host
    name): also its label in the fleet."""
    return config.get_str(SECTION, "consumer") or socket.gethostname()


#: ``[redis]`` TLS options and the redis-py connection argument each becomes
TLS_OPTIONS = {"ca_file": "ssl_ca_certs", "client_cert_file": "ssl_certfile",
               "client_key_file": "ssl_keyfile"}


def tls_files(config: Config, url: str) -> dict[str, str]:
    """redis-py's TLS arguments from ``[redis] ca_file``, ``client_cert_file``,
    ``client_key_file``, each file loaded once here so that a missing or broken one is a
    configuration error naming it (not an outage at the first connection)."""
    given = {key: config.get_str(SECTION, key) for key in TLS_OPTIONS}
    given = {key: path for key, path in given.items() if path}
    if not given:
        return {}
    if urlsplit(url).scheme != "rediss":
        raise config.error(SECTION, next(iter(given)), "is set, but url is not rediss://: "
                           "TLS to Redis needs a rediss:// URL")
    try:
        context = ssl.create_default_context(cafile=given.get("ca_file"))
    except (OSError, ssl.SSLError) as exc:
        raise config.error(SECTION, "ca_file", f"cannot load {given['ca_file']!r}: {exc}") \
            from None
    if "client_key_file" in given and "client_cert_file" not in given:
        raise config.error(SECTION, "client_key_file", "is set without client_cert_file")
    if "client_cert_file" in given:
        try:
            context.load_cert_chain(given["client_cert_file"], given.get("client_key_file"))
        except (OSError, ssl.SSLError) as exc:
            raise config.error(SECTION, "client_cert_file",
                               f"cannot load {given['client_cert_file']!r}"
                               + (f" with {given['client_key_file']!r}"
                                  if "client_key_file" in given else "") + f": {exc}") from None
    return {TLS_OPTIONS[key]: path for key, path in given.items()}


def link_for(config: Config) -> RedisLink:
    """The shared client of this config (created on first use, never at import); each
    component takes its own use of it (:meth:`RedisLink.use`) and releases it on close."""
    url = config.get_str(SECTION, "url")
    topology = topology_of(config)
    where = f"{url} {topology.kind} {topology.sentinels} {topology.cluster_nodes}"
    by_url = _links.setdefault(config, {})
    link = by_url.get(where)
    if link is None or link.closed:
        password = None
        env = config.get_str(SECTION, "password_env")
        if env:
            value = os.environ.get(env, "")
            if not value:
                raise config.error(SECTION, "password_env", f"${env} is not set or empty")
            password = Secret(value, f"${env}")
        if config.get_float(SECTION, "block_timeout") >= config.get_float(SECTION,
                                                                           "socket_timeout"):
            raise config.error(SECTION, "block_timeout", "must be shorter than socket_timeout "
                               "(a blocked read would otherwise time out as an error)")
        if config.get_int(SECTION, "min_replicas_acked") > 0 and config.get_float(
                SECTION, "replica_ack_timeout") >= config.get_float(SECTION, "socket_timeout"):
            raise config.error(SECTION, "replica_ack_timeout", "must be shorter than "
                               "socket_timeout (a WAIT would otherwise time out as an error)")
        key_names(config)  # every key name valid under the tag
        tls = tls_files(config, url)
        try:
            link = RedisLink(url, password=password, tls=tls,
                             socket_timeout=config.get_float(SECTION, "socket_timeout"),
                             connect_timeout=config.get_float(SECTION, "connect_timeout"),
                             max_connections=pool_size(sender_threads(config)),
                             topology=topology, key_tag=key_tag(config),
                             min_replicas=config.get_int(SECTION, "min_replicas_acked"),
                             replica_timeout=config.get_float(SECTION, "replica_ack_timeout"))
        except Ms1Error as exc:
            raise config.error(SECTION, "url", str(exc)) from None
        by_url[where] = link
    return link.use()
