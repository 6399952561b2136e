"""The settings layer: the one place the core reads a loaded configuration. Each stage
gets typed settings built here (:class:`~ms1.pipeline.sending.pacer.PacerSettings`,
:class:`~ms1.pipeline.sending.sender.SendSettings`, :class:`ServiceSettings`,
:class:`~ms1.console.ConsoleSettings` …), never the :class:`~ms1.config.Config`
itself; a reload builds them again. Plugins read their own sections in their hooks."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ms1.config import (
    COMPONENT_KEYS,
    Config,
    Secret,
    fixed_concurrency,
    key_problem,
    parse_origins,
)
from ms1.console import MIN_TOKEN_LENGTH, ConsoleSettings, trusted_hosts
from ms1.ops.overview import Ceiling
from ms1.pipeline.sending.pacer import PacerSettings
from ms1.pipeline.sending.refusals import RefusalReader
from ms1.pipeline.sending.sender import SendSettings
from ms1.pipeline.source import MAX_EMAIL_BYTES

#: the ``[batch]`` limits a reload sets on the running policy
BATCH_LIMITS = ("max_items", "max_bytes", "max_wait")


@dataclass(frozen=True)
class ServiceSettings:
    """What the service itself reads: ``[ms1]``, ``[metrics]``, ``[console] address``,
    ``[source] read_chunk``, ``[dead_letters] max_payload_bytes``, ``[batch]`` limits."""

    log_level: str
    log_format: str
    shutdown_timeout: float
    once_timeout: float
    watchdog_timeout: float
    metrics_address: str
    console: bool
    read_chunk: int
    max_payload_bytes: int
    batch_limits: Mapping[str, float]
    #: ``[send] rate_shape = learn``: the in-process limiter learns the limiter's shape
    shaping: bool


def service(config: Config) -> ServiceSettings:
    return ServiceSettings(
        log_level=config.get_str("ms1", "log_level"),
        log_format=config.get_str("ms1", "log_format"),
        shutdown_timeout=config.get_float("ms1", "shutdown_timeout"),
        once_timeout=config.get_float("ms1", "once_timeout"),
        watchdog_timeout=config.get_float("ms1", "watchdog_timeout"),
        metrics_address=config.get_str("metrics", "address"),
        console=bool(config.get_str("console", "address")),
        read_chunk=config.get_int("source", "read_chunk"),
        max_payload_bytes=config.get_int("dead_letters", "max_payload_bytes"),
        batch_limits={key: config.get_float("batch", key) if key == "max_wait"
                      else config.get_int("batch", key) for key in BATCH_LIMITS},
        shaping=config.get_str("send", "rate_shape") == "learn")


def pacer(config: Config) -> PacerSettings:
    return PacerSettings(
        limit=config.get_int("send", "requests_per_minute"),
        window=config.get_float("send", "rate_window"),
        retry_after_default=config.get_float("send", "retry_after_default"),
        retry_after_cap=config.get_float("send", "retry_after_max"),
        auth_probe_interval=config.get_float("send", "auth_probe_interval"),
        breaker_failures=config.get_int("send", "breaker_failures"),
        breaker_reset=config.get_float("send", "breaker_reset"),
        counts_at=config.get_str("send", "ms4_counts_at"),
        count_margin=config.get_float("send", "count_margin"))


def send(config: Config) -> SendSettings:
    pattern = config.get_str("send", "refusal_index_pattern")
    return SendSettings(
        retry_initial=config.get_float("send", "retry_initial"),
        retry_max=config.get_float("send", "retry_max"),
        max_deliveries=config.get_int("send", "max_deliveries"),
        refusals=RefusalReader(json_details=config.get_bool("send", "refusal_json_details"),
                               index_pattern=re.compile(pattern) if pattern else None))


def concurrency(config: Config) -> dict[str, Any]:
    """The concurrency controller's bounds: ``[send] threads`` set fixes it (the manual
    override); else it adapts between ``min_concurrency`` and ``max_concurrency``."""
    top = config.get_int("send", "max_concurrency")
    return {"min_concurrency": min(config.get_int("send", "min_concurrency"), top),
            "max_concurrency": top, "fixed": fixed_concurrency(config)}


def ceiling(config: Config) -> Ceiling:
    """MS4's ceiling as the config states it."""
    return Ceiling(config.get_int("send", "requests_per_minute"),
                   config.get_float("send", "rate_window"), config.get_int("batch", "max_items"))


def component(config: Config, kind: str) -> str:
    """The name of the component of ``kind`` the config chooses (``[queue] backend`` …)."""
    section, key = COMPONENT_KEYS[kind]
    return config.get_str(section, key)


@dataclass(frozen=True)
class LedgerSettings:
    """``[ledger]``: where the ledger is kept and for how long."""

    backend: str
    retention_days: float
    #: seconds between the service's reconciliations (0: none), and what each covers
    reconcile_interval: float
    reconcile_window: float


def ledger(config: Config) -> LedgerSettings:
    return LedgerSettings(config.get_str("ledger", "backend"),
                          config.get_float("ledger", "retention_days"),
                          config.get_float("ledger", "reconcile_interval"),
                          config.get_float("ledger", "reconcile_window"))


def fleet_backend(config: Config) -> str:
    return config.get_str("fleet", "backend")


def plugin_option(config: Config, section: str, key: str, default: float) -> float:
    """A plugin's option as a number, or ``default`` when that plugin is not installed
    (or blocked): for the cross-checks the service makes at start."""
    return config.get_float(section, key) if (section, key) in config.options else default


def max_email_bytes(config: Config) -> int:
    """``[source.files] max_email_bytes`` (how ``enqueue`` reads files); its default when
    the files plugin is blocked."""
    return int(plugin_option(config, "source.files", "max_email_bytes", MAX_EMAIL_BYTES))


def source_name(config: Config) -> str:
    return config.get_str("source", "name")


def read_admin_token(config: Config, environ: Mapping[str, str] | None = None
                     ) -> Secret | None:
    """The console's admin token: ``[console] admin_token_file`` if set, else
    ``$<admin_token_env>``; None when neither is set (the console is then read-only). A
    token shorter than :data:`~ms1.console.MIN_TOKEN_LENGTH`, of more than one line,
    with anything but visible ASCII, or a file that cannot be read is a ConfigError
    naming the key, never the content."""
    environ = os.environ if environ is None else environ
    path = config.get_str("console", "admin_token_file")
    if path:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise config.error("console", "admin_token_file",
                               f"cannot read admin token file {path!r}: {exc.strerror}") \
                from None
        try:
            value = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise config.error("console", "admin_token_file",
                               f"admin token file {path!r} is not UTF-8 text") from None
        where, key = f"admin token file {path!r}", "admin_token_file"
    else:
        name = config.get_str("console", "admin_token_env")
        value = environ.get(name, "").strip() if name else ""
        if not value:
            return None
        where, key = f"${name}", "admin_token_env"
    problem = key_problem(value) if value else "is empty"
    if problem is None and len(value) < MIN_TOKEN_LENGTH:
        problem = f"is shorter than {MIN_TOKEN_LENGTH} characters"
    if problem is not None:
        raise config.error("console", key, f"{where} {problem} (content not shown)")
    return Secret(value, where)


def console(config: Config, environ: Mapping[str, str] | None = None) -> ConsoleSettings:
    """The console's settings; a ConfigError naming the key for an address that is not
    set, a token that is not usable, or every interface with no origins (DNS rebinding)."""
    address = config.get_address("console", "address")
    if address is None:
        raise config.error("console", "address", "not set")
    host, port = address
    origins = parse_origins(config.get_str("console", "origins"))
    hosts = trusted_hosts(host, origins)
    if hosts is None:  # any Host answered: a page on any name resolving here (rebinding)
        raise config.error("console", "address",
                           f"{host} listens on every interface, and with no [console] "
                           "origins a request naming any host would be answered (DNS "
                           "rebinding): list in origins the names the console is reached "
                           "under, or listen on one address")
    return ConsoleSettings(
        host=host, port=port, token=read_admin_token(config, environ), origins=origins,
        trusted_hosts=hosts, max_connections=config.get_int("console", "max_connections"),
        idle_timeout=config.get_float("console", "idle_timeout"),
        max_items=config.get_int("batch", "max_items"),
        max_bytes=config.get_int("batch", "max_bytes"))


__all__ = ["BATCH_LIMITS", "ServiceSettings", "ceiling", "component",
           "concurrency", "console", "fleet_backend", "max_email_bytes", "pacer",
           "plugin_option", "read_admin_token", "send", "service", "source_name"]
