"""The web console (``[console] address``): a live overview of every instance on the same
Redis, and a dead-letter browser with replay.

* :mod:`.app` — the Flask application: pages, the admin token and same-origin checks;
* :mod:`.browse` — the dead-letter filter and its pages;
* :mod:`.server` — waitress, bounded by connections, idle time and file descriptors;
* this module — :class:`Console`, which the service starts in a thread of its own when
  ``[console] address`` is set, and :func:`read_admin_token`.

The admin token comes from the file named by ``[console] admin_token_file`` or the
environment variable named by ``[console] admin_token_env``, never from the INI; without
one the console is read-only. It is a :class:`~ms1.config.Secret`, redacted everywhere.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ms1.config import Config, Secret, key_problem, parse_origins
from ms1.ops.fleet import Fleet
from ms1.ops.overview import Ceiling, LetterCounts, gather
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.source import Source

from .app import ConsoleContext, OverviewCache, create_app
from .server import Server

log = logging.getLogger("ms1.console")

#: shortest admin token accepted
MIN_TOKEN_LENGTH = 16
#: descriptors the pipeline may need besides the console, per sender thread (one MS4
#: connection, one Redis connection) and in all (Redis readers, logs, files)
FDS_PER_SENDER, FDS_BASE = 2, 40
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def read_admin_token(config: Config, environ: Mapping[str, str] | None = None
                     ) -> Secret | None:
    """The console's admin token: ``[console] admin_token_file`` if set, else
    ``$<admin_token_env>``; None when neither is set (the console is then read-only). A
    token shorter than :data:`MIN_TOKEN_LENGTH`, of more than one line, with anything but
    visible ASCII, or a file that cannot be read is a ConfigError naming the key, never
    the content."""
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


def trusted_hosts(host: str, origins: Sequence[str]) -> list[str] | None:
    """The host names a request may name (Flask's ``TRUSTED_HOSTS``): the listening
    address, the loopback names when it listens on loopback, the hosts of ``origins``.
    None (any) when it listens on every interface and no origin is configured."""
    extra = []
    for origin in origins:  # checked by [console] allowed_origins' parser: scheme://host
        name = urlsplit(origin).hostname or ""
        extra.append(name)
        if ":" in name:  # IPv6: as a Host header writes it, too
            extra.append(f"[{name}]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        return [*_LOOPBACK_NAMES, *extra] if extra else None
    names = [host] + ([f"[{host}]"] if address is not None and address.version == 6 else [])
    if host == "localhost" or (address is not None and address.is_loopback):
        names += _LOOPBACK_NAMES
    return list(dict.fromkeys([*names, *extra]))


class Console:
    """The console of one service: its app and its server (started by :meth:`start`).
    The socket is bound at construction, so a wrong address fails the start."""

    def __init__(self, config: Config, *, fleet: Fleet | None, source: Source | None,
                 queue: QueueBackend, dead_letters: DeadLetterStore,
                 ceiling: Callable[[], Ceiling] | None = None, sender_threads: int = 4,
                 environ: Mapping[str, str] | None = None) -> None:
        address = config.get_address("console", "address")
        if address is None:
            raise config.error("console", "address", "not set")
        host, port = address
        self.token = read_admin_token(config, environ)
        origins = parse_origins(config.get_str("console", "origins"))
        hosts = trusted_hosts(host, origins)
        if hosts is None:  # any Host answered: a page on any name resolving here (rebinding)
            raise config.error("console", "address",
                               f"{host} listens on every interface, and with no [console] "
                               "origins a request naming any host would be answered (DNS "
                               "rebinding): list in origins the names the console is reached "
                               "under, or listen on one address")
        get_ceiling = ceiling or (lambda: Ceiling.from_config(config))
        letter_counts = LetterCounts(dead_letters)

        def build() -> dict[str, Any]:
            return gather(fleet, ceiling=get_ceiling(), source=source, queue=queue,
                          dead_letters=letter_counts)

        self.context = ConsoleContext(
            overview=OverviewCache(build).get, store=dead_letters, queue=queue,
            max_items=config.get_int("batch", "max_items"),
            max_bytes=config.get_int("batch", "max_bytes"), token=self.token,
            trusted_hosts=hosts, origins=origins)
        self.app = create_app(self.context)
        try:
            self.server = Server(self.app, host, port,
                                 max_connections=config.get_int("console", "max_connections"),
                                 idle_timeout=config.get_float("console", "idle_timeout"),
                                 pipeline_fds=FDS_BASE + FDS_PER_SENDER * sender_threads)
        except (OSError, ValueError) as exc:
            raise config.error("console", "address",
                               f"cannot listen on {host}:{port}: {exc}") from None

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> None:
        self.server.start()
        log.info("console on http://%s/ (replay %s)", self.address,
                 "needs the admin token" if self.token is not None else
                 "off: no admin token configured")

    #: seconds running requests get when the console closes (at most)
    close_timeout = 3.0

    def close(self, timeout: float | None = None) -> None:
        """Stop serving; running requests get at most ``timeout`` s (default
        :attr:`close_timeout`)."""
        self.server.close(self.close_timeout if timeout is None else timeout)


__all__ = ["FDS_BASE", "FDS_PER_SENDER", "MIN_TOKEN_LENGTH", "Console", "ConsoleContext",
           "OverviewCache", "create_app", "read_admin_token", "trusted_hosts"]
