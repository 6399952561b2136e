"""INI configuration: a schema of options, strict loading, typed access.

Every key ms1 understands is an :class:`Option`. The core declares its own in
:data:`CORE_OPTIONS`; plugins add theirs through the ``ms1_config_options``
hook. Loading rejects a missing file, an unknown section or key, a value of the
wrong type or out of range with a :class:`~ms1.errors.ConfigError` whose text is
one line naming file, section and key.

More: docs/internals.md, ``ms1.config``.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ms1.errors import ConfigError
from ms1.model import DEFAULT_MAX_PAYLOAD_BYTES
from ms1.redaction import redact, remember, url_secrets

#: which option names the component of each kind (for "no plugin provides ..." errors)
COMPONENT_KEYS: dict[str, tuple[str, str]] = {
    "source": ("source", "name"),
    "batch_policy": ("batch", "policy"),
    "queue": ("queue", "backend"),
    "dead_letters": ("dead_letters", "backend"),
    "transport": ("ms4", "transport"),
    "rate_limiter": ("send", "rate_limiter"),
}

#: sources that acknowledge what they hand over: once acked, an entry is gone from them



class Secret:
    """A secret string: ``repr``/``str`` never show it; ``reveal()`` does."""

    __slots__ = ("_origin", "_value")

    def __init__(self, value: str, origin: str = "") -> None:
        self._value = value
        self._origin = origin
        remember(value)

    def reveal(self) -> str:
        return self._value

    @property
    def origin(self) -> str:
        """Where the secret came from (``$MS1_MS4_API_KEY``, a file path), for messages."""
        return self._origin

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Option:
    """One INI key: its section, type, default, bounds and the help text shown by ``check``.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``choice``, ``path``,
    ``url``, ``address``. ``path`` values are strings; an empty path means "not set".
    ``url`` values are strings that parse as a URL with a scheme (one of ``schemes`` if
    given) and a valid port; the credentials they hold are redacted from then on.
    ``address`` values are ``host:port`` strings (``[v6]:port``; an empty host means
    127.0.0.1; empty: not set), read typed with :meth:`Config.get_address`.
    ``check``, if given, is called with the parsed value and raises ``ValueError``
    saying what is wrong (one line; it is shown redacted).
    ``reloadable``: a reload (SIGHUP) applies a new value to the running service — the
    core for its own options, the declaring plugin in its ``ms1_config_reloaded`` hook
    for its options. False (the default): a change needs a restart; a reload keeps the
    running value and names the key in its "need a restart" log line.
    """

    section: str
    key: str
    kind: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    reloadable: bool = False
    #: what leaving the key out means, when that is not its default (``[send] threads``:
    #: set, a fixed concurrency; not set, adaptive): ``conf defaults`` then writes the key
    #: commented out, and the references show this instead of the default
    unset: str = ""

    def parse(self, raw: str) -> Any:
        """Turn the INI text into a typed value; raise ``ValueError`` saying what is wrong."""
        text = raw.strip()
        parser = _PARSERS[self.kind]
        value = parser(self, text)
        if self.kind in ("int", "float"):
            if self.min is not None and value < self.min:
                raise ValueError(f"must be {self._range()}, got {text}")
            if self.max is not None and value > self.max:
                raise ValueError(f"must be {self._range()}, got {text}")
        if self.check is not None:
            self.check(value)
        return value

    def _range(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {_fmt(self.min)} and {_fmt(self.max)}"
        if self.min is not None:
            return f">= {_fmt(self.min)}"
        return f"<= {_fmt(self.max)}"


def _fmt(number: float | None) -> str:
    if number is None:
        return "?"
    return str(int(number)) if float(number).is_integer() else str(number)


def _parse_int(opt: Option, text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_float(opt: Option, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


_BOOLS = {"1": True, "yes": True, "true": True, "on": True,
          "0": False, "no": False, "false": False, "off": False}


def _parse_bool(opt: Option, text: str) -> bool:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise ValueError(f"expected yes/no/true/false/on/off/1/0, got {text!r}") from None


def _parse_choice(opt: Option, text: str) -> str:
    for choice in opt.choices:
        if text.lower() == choice.lower():
            return choice
    raise ValueError(f"expected one of {', '.join(opt.choices)}, got {text!r}")


def _parse_str(opt: Option, text: str) -> str:
    return text


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aehio" else "a"


def _parse_url(opt: Option, text: str) -> str:
    if not text:
        raise ValueError("expected a URL, got nothing")
    remember(*url_secrets(text))  # before any message can show the URL
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {text!r}") from None
    scheme = parts.scheme.lower()
    if opt.schemes and (scheme not in opt.schemes or "://" not in text):
        wanted = [f"{name}://" for name in opt.schemes]
        listed = " or ".join(wanted) if len(wanted) < 3 else \
            ", ".join(wanted[:-1]) + " or " + wanted[-1]
        raise ValueError(f"expected {_article(listed)} {listed} URL, got {text!r}")
    if not scheme or "://" not in text:
        raise ValueError(f"expected a URL (scheme://...), got {text!r}")
    return text


_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


#: the default of ``[send] refusal_index_pattern``: ``item 3: bad currency``
DEFAULT_INDEX_PATTERN = r"(?i)\bitem (?P<index>[0-9]+):"


def check_index_pattern(value: str) -> None:
    """The ``check`` of ``[send] refusal_index_pattern``: a regex with a group ``index``
    (or empty: off); raises ``ValueError`` in one line."""
    if not value:
        return
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
    if "index" not in compiled.groupindex:
        raise ValueError(f"the regular expression needs a named group 'index' "
                         f"((?P<index>[0-9]+)): {value!r}")


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; an empty host is 127.0.0.1) as ``(host, port)``;
    raise ``ValueError`` saying what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464), got {text!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"the port must be between 1 and 65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    if ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9464), got {text!r}")
    if not host:
        return "127.0.0.1", int(port)
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return host, int(port)


def _parse_address(opt: Option, text: str) -> str:
    if text:
        split_address(text)
    return text


_PARSERS: dict[str, Callable[[Option, str], Any]] = {
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "choice": _parse_choice,
    "str": _parse_str,
    "path": _parse_str,
    "url": _parse_url,
    "address": _parse_address,
}

CORE_OPTIONS: tuple[Option, ...] = (
    Option("ms1", "log_level", "choice", "INFO", "log level on stderr",
           choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), reloadable=True),
    Option("ms1", "log_format", "choice", "text",
           "log lines on stderr: text, kv (key=value) or json; one line per record",
           choices=("text", "kv", "json"), reloadable=True),
    Option("ms1", "shutdown_timeout", "float", 10.0,
           "seconds to flush the partial batch and finish in-flight sends on SIGTERM/SIGINT",
           min=0.1, max=3600, reloadable=True),
    Option("ms1", "once_timeout", "float", 300.0,
           "with --once: seconds to wait for every batch to be delivered or dead-lettered "
           "(a stop of every sender only a restart ends, a TLS error on ms1's side, ends "
           "the run at once)",
           min=0.1, max=86400),
    Option("ms1", "watchdog_timeout", "float", 120.0,
           "seconds a pipeline thread may go without progress (a loop turn, a finished call) "
           "outside a bounded wait before WATCHDOG=1 stops and /healthz is 503; keep it above "
           "[transport.http] request_timeout and [redis] socket_timeout + connect_timeout",
           min=0.1, max=86400),
    Option("metrics", "address", "address", "",
           "host:port for /metrics (Prometheus), /healthz and /readyz (port 1-65535; "
           "[v6]:port; an empty host is 127.0.0.1); empty: off. Keep it on loopback unless "
           "a firewall protects it"),
    Option("source", "name", "str", "files",
           "where e-mails come from: a source plugin name (built in: files, memory)"),
    Option("source", "allow_volatile", "bool", False,
           "a source that acknowledges what it hands over (redis) needs a durable [queue] "
           "backend and [dead_letters] backend (not memory or auto): yes lets it ack into "
           "memory anyway (e-mails are lost when ms1 stops; tests and demos only)"),
    Option("source", "read_chunk", "int", 500, "most e-mails taken from the source per read",
           min=1, max=5_000, reloadable=True),
    Option("batch", "policy", "str", "batch",
           "batch policy plugin: batch (JSON arrays on /batch-metadata) or unit (one object "
           "per request on /metadata, the old behaviour)"),
    Option("batch", "max_items", "int", 50, "close a batch at this many objects (at most "
           "1,000: what one Redis script call carries with its inbound refs; MS4 takes 50)",
           min=1, max=1_000, reloadable=True),
    Option("batch", "max_bytes", "int", 1_048_576,
           "close a batch before its request body would exceed this many bytes; a single "
           "object larger than this is dead-lettered", min=64, max=100 * 1024 * 1024,
           reloadable=True),
    Option("batch", "max_wait", "float", 1.0,
           "seconds a partial batch may wait for more objects before it is sent (linger)",
           min=0.0, max=3600, reloadable=True),
    Option("queue", "backend", "str", "memory",
           "outbound queue plugin holding batches until MS4 accepted them (built in: memory)"),
    Option("dead_letters", "backend", "str", "memory",
           "where rejected objects go, with the reason (built in: memory, jsonl)"),
    Option("dead_letters", "max_payload_bytes", "int", DEFAULT_MAX_PAYLOAD_BYTES,
           "bytes of its payload (e-mail, object or raw entry) a dead letter keeps; a longer "
           "one is clipped and keeps the original's length and SHA-256", min=1024,
           max=64 * 1024 * 1024, reloadable=True),
    Option("send", "threads", "int", 4,
           "set: fixed concurrency, that many sender threads and requests in flight (the "
           "manual override); not set: adaptive between min_concurrency and "
           "max_concurrency", min=1, max=256, reloadable=True,
           unset="adaptive concurrency"),
    Option("send", "min_concurrency", "int", 1,
           "adaptive concurrency (threads not set): fewest requests in flight the "
           "controller goes down to", min=1, max=256, reloadable=True),
    Option("send", "max_concurrency", "int", 64,
           "adaptive concurrency (threads not set): most requests in flight, and the "
           "sender threads started; setting threads fixes the concurrency instead",
           min=1, max=256, reloadable=True),
    Option("send", "retry_initial", "float", 0.5,
           "first retry delay in seconds after a failed send (exponential backoff, jitter)",
           min=0.0, max=600, reloadable=True),
    Option("send", "retry_max", "float", 30.0, "longest retry delay in seconds",
           min=0.0, max=3600, reloadable=True),
    Option("send", "requests_per_minute", "int", 120,
           "most requests to MS4 in any sliding window of rate_window seconds, for all sender "
           "threads together (MS4 allows 120 per minute)", min=1, max=1_000_000,
           reloadable=True),
    Option("send", "rate_window", "float", 60.0,
           "length in seconds of the rate-limit window (60: per minute; tests shorten it to "
           "compress time)", min=0.001, max=86400, reloadable=True),
    Option("send", "ms4_counts_at", "choice", "arrival",
           "when MS4 counts a request against its limit: arrival (a rate limiter in front of "
           "MS4: the slot is stamped when the request was out, plus count_margin) or answer "
           "(the slot is stamped when the answer came: safe whatever MS4 does, but a slot "
           "is then held for MS4's latency too)", choices=("arrival", "answer"),
           reloadable=True),
    Option("send", "count_margin", "float", 0.1,
           "seconds added to a slot's stamp with ms4_counts_at = arrival: the most a "
           "request can take from leaving ms1 to being counted by MS4 (never stamped later "
           "than its answer); doubled by a 429 the limiter did not foresee, until a restart",
           min=0.0, max=60,
           reloadable=True),
    Option("send", "rate_shape", "choice", "learn",
           "learn: pace requests evenly (GCRA) with a burst allowance learned from MS4's "
           "429s, as TCP learns its window, so any limiter in front of MS4 (nginx limit_req, "
           "HAProxy, a token bucket) is met without 429 storms; window: only the sliding "
           "window (an MS4 known to count a sliding log)", choices=("learn", "window")),
    Option("send", "retry_after_default", "float", 0.0,
           "seconds every sender pauses after a 429 whose Retry-After is missing or "
           "unreadable (nginx and HAProxy send none); 0: one emission interval "
           "(rate_window / requests_per_minute) plus up to half of one more, at random",
           min=0.0, max=86400, reloadable=True),
    Option("send", "retry_after_max", "float", 300.0,
           "longest pause in seconds a 429's Retry-After can impose", min=0.0, max=86400,
           reloadable=True),
    Option("send", "breaker_failures", "int", 5,
           "consecutive failures (5xx, timeouts, connection errors) that open the circuit "
           "breaker", min=1, max=1_000_000, reloadable=True),
    Option("send", "breaker_reset", "float", 30.0,
           "seconds the open breaker waits before letting one probe request through",
           min=0.01, max=86400, reloadable=True),
    Option("send", "auth_probe_interval", "float", 60.0,
           "during a 401 spell, seconds between probe requests (a reload ends it at once)",
           min=0.01, max=86400, reloadable=True),
    Option("send", "max_deliveries", "int", 0,
           "dead-letter a batch handed out more often than this (a batch that keeps crashing "
           "senders); 0: no maximum, keep trying", min=0, max=1_000_000, reloadable=True),
    Option("send", "refusal_json_details", "bool", True,
           "on a refused batch (400/422), read a JSON answer's details[].index (0-based in the "
           "batch as sent, as ms4-sim answers): dead-letter exactly the objects named, send "
           "the rest in one request; no: only refusal_index_pattern names objects",
           reloadable=True),
    Option("send", "refusal_index_pattern", "str", DEFAULT_INDEX_PATTERN,
           "regular expression with a named group 'index' (0-based in the batch as sent) "
           "finding the objects a refusal (400/422) names in its text, or in each string of a "
           "JSON answer; empty: off. An answer naming nothing, an index out of range or twice "
           "splits the batch in halves", check=check_index_pattern, reloadable=True),
    Option("send", "rate_limiter", "str", "memory",
           "rate limiter plugin: memory (this process) or redis (shared by every instance on "
           "the Redis)"),
    Option("ms4", "transport", "str", "memory",
           "transport plugin that talks to MS4 (built in: memory, an in-process fake MS4)"),
    Option("ms4", "api_key_env", "str", "MS1_MS4_API_KEY",
           "environment variable holding the MS4 API key", reloadable=True),
    Option("ms4", "api_key_file", "path", "",
           "file holding the MS4 API key (takes precedence over the environment variable); "
           "re-read on reload", reloadable=True),
    Option("fleet", "backend", "str", "auto",
           "where every running instance publishes its state (about once a second, gone 10 s "
           "after it stops) for the web console and top: auto (redis when [queue] backend "
           "is redis or auto and a Redis queue was built, else memory), redis (every "
           "instance on the Redis), memory (this process only)"),
    Option("ledger", "backend", "str", "auto",
           "where the invoice ledger is kept (what became of every e-mail and invoice, for "
           "ms1-service trace): auto (the store the outbound queue's plugin shares, redis "
           "for a Redis queue, else memory), redis, memory (this process only), off"),
    Option("ledger", "retention_days", "float", 30.0,
           "days a ledger record is kept", min=0.01, max=3650),
    Option("ledger", "reconcile_interval", "float", 300.0,
           "seconds between the service's reconciliations of the last reconcile_window "
           "(ms1_ledger_unreconciled_emails); 0: none", min=0, max=86400),
    Option("ledger", "reconcile_window", "float", 86400.0,
           "seconds of reading the service reconciles each time", min=60, max=86400 * 31),
    Option("console", "address", "address", "",
           "host:port of the web console (overview of every instance, dead-letter browser, "
           "replay); empty: off. Keep it on loopback (reach it through an SSH tunnel or a "
           "proxy listed in origins)"),
    Option("console", "admin_token_env", "str", "MS1_CONSOLE_TOKEN",
           "environment variable holding the console's admin token (at least 16 "
           "characters), which replaying dead letters requires; unset or empty (and no "
           "admin_token_file): the console is read-only"),
    Option("console", "admin_token_file", "path", "",
           "file holding the console's admin token (takes precedence over the environment "
           "variable); the token is never read from this file's INI"),
    Option("console", "origins", "str", "",
           "more origins the console is reached under, comma-separated scheme://host:port "
           "(a proxy, an SSH tunnel's local port); requests naming another host, and "
           "state-changing requests from another origin, are refused",
           check=lambda text: check_origins(text)),
    Option("console", "max_connections", "int", 100,
           "most connections the console holds open at once (more wait in the listen "
           "backlog); it never takes the file descriptors kept for Redis and MS4",
           min=1, max=10_000),
    Option("console", "idle_timeout", "float", 30.0,
           "seconds an idle console connection is kept open", min=1, max=3600),
)

#: keys that must never be in the INI (secrets) and where they belong instead
_FORBIDDEN_KEYS = {("ms4", "api_key"), ("ms4", "key"), ("ms4", "x_api_key")}
#: the console's admin token is never in the INI either
_FORBIDDEN_CONSOLE_KEYS = {("console", "admin_token"), ("console", "token"),
                           ("console", "password"), ("console", "admin_password")}


def check_origins(text: str) -> None:
    """``[console] origins``' check at load (:func:`parse_origins`)."""
    parse_origins(text)


def parse_origins(text: str) -> tuple[str, ...]:
    """``[console] origins``: comma-separated ``scheme://host[:port]`` (http or https, no
    path), normalised to lower case; raise ValueError naming the bad one."""
    found = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        parts = urllib.parse.urlsplit(part)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"not an origin (bad port): {part!r}") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
                or parts.path not in ("", "/") or parts.query or parts.fragment \
                or parts.username or parts.password:
            raise ValueError(f"expected an origin, scheme://host:port (http or https, no "
                             f"path), got {part!r}")
        host = parts.hostname.lower()
        host = f"[{host}]" if ":" in host else host
        found.append(f"{parts.scheme.lower()}://{host}" + (f":{port}" if port else ""))
    return tuple(found)


class Config:
    """Validated settings: ``config.get(section, key)`` returns the typed value.

    ``explicit`` holds the ``(section, key)`` pairs the file set; everything else
    is the option's default.
    """

    def __init__(
        self, path: str, options: Mapping[tuple[str, str], Option],
        values: Mapping[tuple[str, str], Any], explicit: Iterable[tuple[str, str]],
        api_key: Secret | None, from_env: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self.path = path
        self.options = dict(options)
        self._values = dict(values)
        self.explicit = frozenset(explicit)
        self.api_key = api_key
        #: the keys set from the environment, with the variable that set them
        self.from_env = dict(from_env or {})

    def get(self, section: str, key: str) -> Any:
        try:
            return self._values[(section, key)]
        except KeyError:
            raise ConfigError("no such option (not declared by ms1 or any plugin)",
                              path=self.path, section=section, key=key) from None

    def get_int(self, section: str, key: str) -> int:
        value = self.get(section, key)
        assert isinstance(value, int)
        return value

    def get_float(self, section: str, key: str) -> float:
        return float(self.get(section, key))

    def get_str(self, section: str, key: str) -> str:
        return str(self.get(section, key))

    def get_bool(self, section: str, key: str) -> bool:
        return bool(self.get(section, key))

    def get_address(self, section: str, key: str) -> tuple[str, int] | None:
        """An ``address`` option as ``(host, port)`` (validated at load; an empty host is
        127.0.0.1, an IPv6 host comes without brackets); None when it is empty (off)."""
        text = self.get_str(section, key)
        if not text:
            return None
        try:
            return split_address(text)
        except ValueError as exc:  # only a value set past load (with_values) gets here
            raise self.error(section, key, str(exc)) from None

    def error(self, section: str, key: str, problem: str) -> ConfigError:
        """A ConfigError about one key of this config (for plugins validating their options)."""
        return ConfigError(problem, path=self.path, section=section, key=key)

    def with_values(self, changes: Mapping[tuple[str, str], Any]) -> Config:
        """A copy with some values replaced (tests, CLI overrides)."""
        values = {**self._values, **changes}
        return Config(self.path, self.options, values, self.explicit | set(changes),
                      self.api_key, {k: v for k, v in self.from_env.items()
                                     if k not in changes})

    def changed(self, other: Config) -> list[tuple[str, str]]:
        """The ``(section, key)`` pairs whose value differs in ``other``, sorted (keys only
        one of the two declares count as changed)."""
        keys = set(self._values) | set(other._values)
        missing = object()
        return sorted(k for k in keys
                      if self._values.get(k, missing) != other._values.get(k, missing))

    def keeping(self, old: Config, keys: Iterable[tuple[str, str]]) -> Config:
        """A copy with ``old``'s values for ``keys`` (a reload keeps the running value of
        a key that needs a restart); set in the file as they were in ``old``."""
        kept = [k for k in keys if k in old._values]
        values = {**self._values, **{k: old._values[k] for k in kept}}
        explicit = (self.explicit - set(kept)) | (old.explicit & set(kept))
        from_env = {k: v for k, v in self.from_env.items() if k not in kept}
        from_env.update({k: v for k, v in old.from_env.items() if k in kept})
        return Config(self.path, self.options, values, explicit, self.api_key, from_env)

    def render(self) -> str:
        """The effective configuration as INI text (loadable), each value's origin marked
        (``; default``, ``; from $MS1_...``; none: the file); every line passes through
        :func:`ms1.redaction.redact` (API key, passwords, URL credentials)."""
        lines: list[str] = [f"# effective configuration from {self.path}"]
        if self.api_key is None:
            lines.append("# MS4 API key: not set")
        else:
            lines.append(f"# MS4 API key: set from {self.api_key.origin} (value redacted)")
        section = None
        for (sec, key), opt in sorted(self.options.items()):
            if sec != section:
                lines.append(f"\n[{sec}]")
                section = sec
            value = self._values[(sec, key)]
            text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
            origin = "  ; default" if (sec, key) not in self.explicit else \
                f"  ; from ${self.from_env[(sec, key)]}" if (sec, key) in self.from_env else ""
            if opt.unset and (sec, key) not in self.explicit:  # left out: so it stays
                lines.append(redact(f";{key} = {text}") + f"  ; not set: {opt.unset}")
            else:
                lines.append(redact(f"{key} = {text}") + origin)
            lines.append(f"#   {opt.help}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"Config(path={self.path!r}, api_key={self.api_key!r})"


#: the prefix of every option's environment variable (:func:`env_name`)
ENV_PREFIX = "MS1_"


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``[section] key``: ``MS1_``, then the
    section and the key upper-cased, joined by ``_``, each ``.`` or ``-`` an ``_``
    (``[send] requests_per_minute``: ``MS1_SEND_REQUESTS_PER_MINUTE``; ``[transport.http]
    base_url``: ``MS1_TRANSPORT_HTTP_BASE_URL``)."""
    return ENV_PREFIX + f"{section}_{key}".upper().replace(".", "_").replace("-", "_")


def fixed_concurrency(config: Config) -> int | None:
    """``[send] threads`` when the config sets it (fixed concurrency, the manual
    override), else None (adaptive)."""
    if ("send", "threads") in config.explicit:
        return config.get_int("send", "threads")
    return None


def sender_threads(config: Config) -> int:
    """How many sender threads a service with this config runs (what pools sized for
    "one per sender" must hold): ``[send] threads`` when it is set (fixed concurrency),
    else ``max_concurrency`` (adaptive)."""
    fixed = fixed_concurrency(config)
    return fixed if fixed is not None else config.get_int("send", "max_concurrency")


def render_defaults(options: Iterable[Option]) -> str:
    """Every option at its default as INI text that loads (``conf defaults``): each
    with its help and its environment variable (:func:`env_name`) in comments."""
    lines = ["# every option at its default (ms1-service conf defaults); a key left out of",
             "# a config file has this value. Each can be set from the environment too."]
    section = None
    for (sec, key), opt in sorted(index_options(options).items()):
        if sec != section:
            lines.append(f"\n[{sec}]")
            section = sec
        value = opt.default
        text = ("yes" if value else "no") if isinstance(value, bool) else _fmt_default(value)
        lines.append(f"#   {opt.help}")
        lines.append(f"#   environment: ${env_name(sec, key)}")
        if opt.unset:  # its default applies only when set: left out, as by default
            lines.append(f"#   not set: {opt.unset}")
            lines.append(f";{key} = {text}")
        else:
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _fmt_default(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def index_options(options: Iterable[Option]) -> dict[tuple[str, str], Option]:
    """Options by ``(section, key)``; a key declared twice, or two keys with one
    environment variable, is a programming error."""
    table: dict[tuple[str, str], Option] = {}
    names: dict[str, tuple[str, str]] = {}
    for opt in options:
        where = (opt.section, opt.key)
        if where in table:
            raise ValueError(f"option [{opt.section}] {opt.key} is declared twice")
        name = env_name(*where)
        if name in names:
            other = names[name]
            raise ValueError(f"options [{other[0]}] {other[1]} and [{opt.section}] {opt.key} "
                             f"would share the environment variable {name}")
        table[where], names[name] = opt, where
    return table


def load_config(
    path: str, options: Iterable[Option] = CORE_OPTIONS,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate ``path`` against ``options``. Raise ConfigError on any problem."""
    table = index_options(options)
    environ = os.environ if environ is None else environ
    # one rule for comments: a line starting with ; or #, or ; after whitespace at the end
    # of a value (`cluster_nodes = a:1, b:2   ; more nodes`): a value cannot hold " ;"
    # (a # inside a value stays: a pattern, a URL's fragment)
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="\x00no-default",
                                       inline_comment_prefixes=(";",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh, source=path)
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", path=path) from exc
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"line {exc.lineno}: section appears twice",
                          path=path, section=exc.section) from exc
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(f"line {exc.lineno}: key appears twice",
                          path=path, section=exc.section, key=exc.option) from exc
    # the file's content is never shown (a pasted key would be echoed): line numbers only
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"line {exc.lineno}: key outside any [section] (file content "
                          "before the first section header is not shown)", path=path) from None
    except configparser.ParsingError as exc:
        numbers = [str(lineno) for lineno, _ in exc.errors]
        raise ConfigError(f"line{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}: not "
                          "a 'key = value' line (content not shown)", path=path) from None
    except configparser.Error as exc:
        raise ConfigError(f"not a valid INI file ({type(exc).__name__}; content not shown)",
                          path=path) from None

    sections = sorted({sec for sec, _ in table})
    values: dict[tuple[str, str], Any] = {k: o.default for k, o in table.items()}
    explicit: list[tuple[str, str]] = []
    for sec in parser.sections():
        if sec not in sections:
            raise ConfigError(f"unknown section (known sections: {', '.join(sections)})",
                              path=path, section=sec)
        known = sorted(k for s, k in table if s == sec)
        for key, raw in parser.items(sec):
            if (sec, key) in _FORBIDDEN_CONSOLE_KEYS:
                variable = parser.get("console", "admin_token_env",
                                      fallback="MS1_CONSOLE_TOKEN")
                raise ConfigError(
                    f"the console's admin token is never read from the INI file: set "
                    f"${variable.strip()} or name a token file with admin_token_file",
                    path=path, section=sec, key=key)
            if (sec, key) in _FORBIDDEN_KEYS:
                variable = parser.get("ms4", "api_key_env", fallback="MS1_MS4_API_KEY")
                raise ConfigError(
                    f"the API key is never read from the INI file: set ${variable.strip()} "
                    "or name a key file with api_key_file",
                    path=path, section=sec, key=key)
            opt = table.get((sec, key))
            if opt is None:
                raise ConfigError(f"unknown key (known keys: {', '.join(known)})",
                                  path=path, section=sec, key=key)
            try:
                values[(sec, key)] = opt.parse(raw)
            except ValueError as exc:
                raise ConfigError(str(exc) + _comment_hint(raw), path=path, section=sec,
                                  key=key) from None
            explicit.append((sec, key))

    # the environment overrides the file, one variable per option (env_name)
    from_env: dict[tuple[str, str], str] = {}
    for (sec, key), opt in table.items():
        name = env_name(sec, key)
        given = environ.get(name)
        if given is None:
            continue
        try:
            values[(sec, key)] = opt.parse(given)
        except ValueError as exc:
            raise ConfigError(f"{exc} (from ${name})", path=path, section=sec,
                              key=key) from None
        explicit.append((sec, key))
        from_env[(sec, key)] = name

    api_key = None
    if ("ms4", "api_key_env") in table:
        api_key = read_api_key(path, str(values[("ms4", "api_key_env")]),
                               str(values[("ms4", "api_key_file")]), environ)
    return Config(path, table, values, explicit, api_key, from_env)


def _comment_hint(raw: str) -> str:
    """What to add to a refused value that holds `` #``: a comment is only a line
    starting with ``#`` or ``;``, or `` ;`` after a value."""
    if re.search(r"\s#", raw):
        return " (an inline comment? after a value only ' ;' starts one; '#' only at a " \
               "line's start)"
    return ""


def key_problem(value: str) -> str | None:
    """What makes ``value`` (stripped) unusable as the API key, or None. The key is sent as
    an HTTP header: one line of visible ASCII (``!`` to ``~``). Never names the content."""
    if "\n" in value or "\r" in value:
        return "holds more than one line"
    if not all("!" <= char <= "~" for char in value):
        return "holds a character that is not visible ASCII"
    return None


def read_api_key(
    config_path: str, env_name: str, key_file: str, environ: Mapping[str, str],
) -> Secret | None:
    """The API key from ``key_file`` if set, else from ``$env_name``; None if neither is set.

    Surrounding whitespace (a trailing newline) is stripped; a key of more than one line,
    or with anything but visible ASCII, is a ConfigError naming the file or the variable,
    never the content."""
    if key_file:
        try:
            with open(key_file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {key_file!r}: {exc.strerror}",
                              path=config_path, section="ms4", key="api_key_file") from None
        try:
            value = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            problem: str | None = "is not UTF-8 text"
        else:
            problem = key_problem(value) if value else "is empty"
        if problem is not None:
            shown = "" if problem == "is empty" else " (content not shown)"
            raise ConfigError(f"API key file {key_file!r} {problem}{shown}",
                              path=config_path, section="ms4", key="api_key_file")
        return Secret(value, origin=key_file)
    value = environ.get(env_name, "").strip()
    if not value:
        return None
    problem = key_problem(value)
    if problem is not None:
        raise ConfigError(f"${env_name} {problem} (content not shown)",
                          path=config_path, section="ms4", key="api_key_env")
    return Secret(value, origin=f"${env_name}")


def check_durability(config: Config, traits: set[tuple[str, str, str]]) -> None:
    """A source that acknowledges what it hands over (trait ``acks``) needs a durable
    queue and durable dead letters (no trait ``volatile``), else an inbound entry is acked
    into memory; ``[source] allow_volatile = yes`` accepts that. Decided by the plugins'
    declarations (``ms1_component_traits``), so nothing is built."""
    source = config.get_str("source", "name")
    if ("source", source, "acks") not in traits or config.get_bool("source", "allow_volatile"):
        return
    volatile = []
    for kind in ("queue", "dead_letters"):
        section, key = COMPONENT_KEYS[kind]
        name = config.get_str(section, key)
        if (kind, name, "volatile") in traits:
            volatile.append(f"[{section}] {key} = {name}")
    if volatile:
        raise config.error(
            "source", "name",
            f"source {source!r} acknowledges inbound entries, but {' and '.join(volatile)} "
            "would hold them in memory only (lost when ms1 stops): use durable backends, or "
            "set [source] allow_volatile = yes")
