"""Built-in plugin ``redis``: every Redis call ms1 makes lives in this package.

Components (all on Redis Streams with one consumer group, ``[redis] group``):

More: docs/internals.md, ``ms1_plugins.redis``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from ms1.config import Config, Option, sender_threads
from ms1.errors import Ms1Error
from ms1.hookspecs import hookimpl
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger
from ms1.pipeline.outbound import MemoryQueue, QueueBackend
from ms1.pipeline.sending.limiter import RateLimiter
from ms1.pipeline.source import Source

from .deadletters import RedisDeadLetters
from .fleet import fleet_components as fleet_components  # the fleet hooks: plugin "redis"
from .fleet import ms1_make_fleet as ms1_make_fleet
from .ledger import RedisLedger
from .limiter import RedisRateLimiter
from .link import (
    SECTION,
    RedisLink,
    check_addresses,
    check_key_tag,
    check_url,
    consumer_name,
    eviction_refusal,
    evicts_any,
    key_names,
    link_for,
    redact_url,
    translated,
)
from .outbound import RedisQueue
from .source import RedisSource

__all__ = ["RedisDeadLetters", "RedisLink", "RedisQueue", "RedisRateLimiter", "RedisSource",
           "check_url", "consumer_name", "key_names", "link_for", "redact_url", "translated"]

log = logging.getLogger(__name__)


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option(SECTION, "url", "url", "redis://127.0.0.1:6379/0",
               "Redis URL: redis://host:port/db, rediss:// for TLS, or unix:///path?db=0; a "
               "password in the URL (user:password@ or ?password=) is redacted in every "
               "output (better: password_env)", schemes=("redis", "rediss", "unix"),
               check=check_url),
        Option(SECTION, "password_env", "str", "",
               "environment variable holding the Redis password (overrides the URL's)"),
        Option(SECTION, "inbound_stream", "str", "ms1:emails",
               "stream the ingestor writes e-mails to (field 'email'); an entry without "
               "one becomes a dead letter with its raw fields"),
        Option(SECTION, "outbound_stream", "str", "ms1:outbound", "stream of batches for MS4"),
        Option(SECTION, "dead_letter_stream", "str", "ms1:dead-letters",
               "stream of dead letters (also where an outbound entry that is no ms1 batch "
               "is set aside)"),
        Option(SECTION, "rate_limit_key", "str", "ms1:rate-limit",
               "sorted set of the shared rate limiter"),
        Option(SECTION, "ledger_key", "str", "ms1:ledger",
               "prefix of the invoice ledger's keys ([ledger] backend = redis): one list "
               "per batch, per-day index hashes"),
        Option(SECTION, "group", "str", "ms1", "consumer group on both streams"),
        Option(SECTION, "consumer", "str", "",
               "this instance's consumer name; empty: the host name. Give each instance on "
               "one host its own, and keep it across restarts (its pending entries are "
               "re-read first)"),
        Option(SECTION, "visibility_timeout", "float", 60.0,
               "seconds an entry may sit unrefreshed in a consumer's pending list before "
               "another instance takes it over (XAUTOCLAIM)", min=1, max=86400),
        Option(SECTION, "block_timeout", "float", 2.0,
               "seconds an XREADGROUP waits for new entries (keep below socket_timeout)",
               min=0.01, max=60),
        Option(SECTION, "socket_timeout", "float", 10.0,
               "seconds to wait for any Redis reply before the connection counts as broken",
               min=0.1, max=600),
        Option(SECTION, "connect_timeout", "float", 3.0, "seconds to connect to Redis",
               min=0.1, max=600),
        Option(SECTION, "ca_file", "str", "",
               "with a rediss:// URL: PEM file of the CA(s) Redis's certificate must chain "
               "to (a private CA); empty: the system's"),
        Option(SECTION, "client_cert_file", "str", "",
               "with a rediss:// URL: PEM file of this client's certificate (and key, unless "
               "client_key_file), for a Redis with tls-auth-clients"),
        Option(SECTION, "client_key_file", "str", "",
               "with a rediss:// URL: PEM file of the client certificate's private key"),
        Option(SECTION, "allow_eviction", "bool", False,
               "run on a Redis whose maxmemory-policy evicts any key (allkeys-*); without "
               "it ms1 refuses to start there (queued batches and unread e-mails would "
               "vanish). With it, every stream ms1 finds gone is reported as lost work: "
               "CRITICAL, /readyz 503, ms1_lost_batches_total, the stop summary"),
        Option(SECTION, "delete_acked_inbound", "bool", True,
               "delete inbound entries once safe (XDEL); say no if other consumer groups "
               "also read the inbound stream"),
        Option(SECTION, "sentinels", "str", "",
               "Redis Sentinel: host:port, host:port, ... of the Sentinels; set, ms1 asks them "
               "for the primary of service_name and follows it through failovers (url then "
               "gives only the database, TLS and credentials); empty: url is the server",
               check=check_addresses),
        Option(SECTION, "service_name", "str", "mymaster",
               "with sentinels: the name the Sentinels monitor the primary under"),
        Option(SECTION, "sentinel_password_env", "str", "",
               "with sentinels: environment variable holding the Sentinels' own password "
               "(when they have requirepass); the primary's is password_env"),
        Option(SECTION, "cluster", "bool", False,
               "Redis Cluster: url (and cluster_nodes) are startup nodes, the database is 0, "
               "and every key carries the hash tag key_tag, so ms1's keys share one slot"),
        Option(SECTION, "cluster_nodes", "str", "",
               "with cluster: more startup nodes, host:port, host:port, ... (in case the "
               "url's node is down when ms1 starts)", check=check_addresses),
        Option(SECTION, "key_tag", "str", "",
               "hash tag every key ms1 uses carries (without braces): ms1 makes ms1:emails "
               "{ms1}:emails, any other name gets {tag}: in front; empty: names as they are "
               "(with cluster = yes, empty means ms1)", check=check_key_tag),
        Option(SECTION, "min_replicas_acked", "int", 0,
               "replicas that must acknowledge a write (WAIT; WAITAOF on Redis 7.2+) before "
               "'enqueue' and ms1.runtime.ingest report e-mails added (else they fail: "
               "retry); ms1's own writes wait too, best effort; 0: no waiting (a failover can lose "
               "e-mails the ingestor was told were added)", min=0, max=100),
        Option(SECTION, "replica_ack_timeout", "float", 1.0,
               "seconds a write waits for min_replicas_acked replicas", min=0.001, max=60),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("source", "redis"), ("queue", "redis"), ("queue", "auto"),
            ("dead_letters", "redis"), ("rate_limiter", "redis"), ("ledger", "redis")]


@hookimpl
def ms1_component_traits() -> Sequence[tuple[str, str, str]]:
    """The Redis source acks what it hands over; the ``auto`` queue may fall back to
    memory; Redis queues share the Redis fleet."""
    return [("source", "redis", "acks"), ("queue", "auto", "volatile"),
            ("queue", "redis", "fleet:redis"), ("queue", "auto", "fleet:redis"),
            ("queue", "redis", "ledger:redis"), ("queue", "auto", "ledger:redis")]


def _check_linger(config: Config) -> None:
    visibility = config.get_float(SECTION, "visibility_timeout")
    if config.get_float("batch", "max_wait") * 2 + 5 > visibility:
        raise config.error(SECTION, "visibility_timeout",
                           f"must exceed 2 x [batch] max_wait + 5 s ({visibility} s is too "
                           "short: e-mails waiting in an open batch would be taken over)")


def _refuse_eviction(config: Config, link: RedisLink) -> None:
    """Refuse (a ConfigError naming ``allow_eviction``) a Redis that evicts any key, when
    it answers now; one that does not is checked at first use (:class:`RedisQueue`)."""
    link.allow_eviction = config.get_bool(SECTION, "allow_eviction")
    policy = link.memory_policy()
    if policy is not None and evicts_any(policy) and not link.allow_eviction:
        raise config.error(SECTION, "allow_eviction", eviction_refusal(link, policy))


def _queue(config: Config, link: RedisLink) -> RedisQueue:
    _refuse_eviction(config, link)
    keys = key_names(config)
    return RedisQueue(link, stream=keys["outbound_stream"],
                      group=config.get_str(SECTION, "group"), consumer=consumer_name(config),
                      visibility_timeout=config.get_float(SECTION, "visibility_timeout"),
                      block_timeout=config.get_float(SECTION, "block_timeout"),
                      prefetch=min(8, sender_threads(config)),
                      dead_letter_stream=keys["dead_letter_stream"])


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
    return RedisSource(link_for(config), stream=key_names(config)["inbound_stream"],
                       group=config.get_str(SECTION, "group"), consumer=consumer_name(config),
                       visibility_timeout=config.get_float(SECTION, "visibility_timeout"),
                       delete_acked=config.get_bool(SECTION, "delete_acked_inbound"),
                       max_email_bytes=config.get_int("batch", "max_bytes"),
                       block_timeout=config.get_float(SECTION, "block_timeout"))


@hookimpl
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    if name != "redis":
        return None
    return RedisDeadLetters(link_for(config), stream=key_names(config)["dead_letter_stream"])


@hookimpl
def ms1_make_ledger(name: str, config: Config) -> Ledger | None:
    if name != "redis":
        return None
    return RedisLedger(link_for(config), key=key_names(config)["ledger_key"],
                       retention_days=config.get_float("ledger", "retention_days"))


@hookimpl
def ms1_make_rate_limiter(name: str, config: Config) -> RateLimiter | None:
    if name != "redis":
        return None
    lease = 60.0  # the longest a request can take, unless the http transport says
    with contextlib.suppress(Ms1Error):
        lease = config.get_float("transport.http", "request_timeout") + 5.0
    return RedisRateLimiter(link_for(config), key=key_names(config)["rate_limit_key"],
                            limit=config.get_int("send", "requests_per_minute"),
                            window=config.get_float("send", "rate_window"), lease=lease,
                            shaping=config.get_str("send", "rate_shape") == "learn")
