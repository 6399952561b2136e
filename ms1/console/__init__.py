"""The web console (``[console] address``): a live overview of every instance on the same
Redis, a dead-letter browser with replay, and a search over the invoice ledger.

* :mod:`.app` — the Flask application: pages, the admin token and same-origin checks;
* :mod:`.browse` — the dead-letter filter and its pages;
* :mod:`.timeline` — the search: one invoice's or e-mail's timeline from the ledger;
* :mod:`.server` — waitress, bounded by connections, idle time and file descriptors;
* :mod:`.run` — :class:`~.run.Console`, which the service starts in a thread of its own
  when ``[console] address`` is set;
* this module — :class:`ConsoleSettings` (the admin token read by
  :func:`ms1.runtime.settings.read_admin_token`, never from the INI: a Secret) and the
  Host names answered; light: importing it imports no Flask.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ms1.config import Secret

log = logging.getLogger("ms1.console")

#: shortest admin token accepted
MIN_TOKEN_LENGTH = 16
#: descriptors the pipeline may need besides the console, per sender thread (one MS4
#: connection, one Redis connection) and in all (Redis readers, logs, files)
FDS_PER_SENDER, FDS_BASE = 2, 40
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


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


@dataclass(frozen=True)
class ConsoleSettings:
    """What the console reads of the configuration (built by
    :func:`ms1.runtime.settings.console`): where it listens, its admin token (None:
    read-only), the origins and the Host names it answers, its connection limits, and the
    batch limits replayed letters are batched by."""

    host: str
    port: int
    token: Secret | None
    origins: tuple[str, ...]
    trusted_hosts: list[str]
    max_connections: int = 8
    idle_timeout: float = 30.0
    max_items: int = 50
    max_bytes: int = 1_048_576


__all__ = ["FDS_BASE", "FDS_PER_SENDER", "MIN_TOKEN_LENGTH", "ConsoleSettings", "trusted_hosts"]
