"""INI configuration: a schema of options, strict loading, typed access.

Every key ms1 understands is an :class:`Option`. The core declares its own in
:data:`CORE_OPTIONS`; plugins add theirs through the ``ms1_config_options``
hook. Loading rejects a missing file, an unknown section or key, a value of the
wrong type or out of range with a :class:`~ms1.errors.ConfigError` whose text is
one line naming file, section and key.

The MS4 API key is never read from the INI: it comes from the environment
variable named by ``[ms4] api_key_env`` or from the file named by
``[ms4] api_key_file``, and is held in a :class:`Secret` that never shows its
value in ``repr``/``str``.
"""

from __future__ import annotations

import configparser
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ms1.errors import ConfigError

#: which option names the component of each kind (for "no plugin provides ..." errors)
COMPONENT_KEYS: dict[str, tuple[str, str]] = {
    "source": ("source", "name"),
    "batch_policy": ("batch", "policy"),
    "queue": ("queue", "backend"),
    "dead_letters": ("dead_letters", "backend"),
    "transport": ("ms4", "transport"),
    "rate_limiter": ("send", "rate_limiter"),
}


class Secret:
    """A secret string: ``repr``/``str`` never show it; ``reveal()`` does."""

    __slots__ = ("_origin", "_value")

    def __init__(self, value: str, origin: str = "") -> None:
        self._value = value
        self._origin = origin

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

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``choice``, ``path``.
    ``path`` values are strings; an empty path means "not set".
    """

    section: str
    key: str
    kind: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()

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


_PARSERS: dict[str, Callable[[Option, str], Any]] = {
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "choice": _parse_choice,
    "str": _parse_str,
    "path": _parse_str,
}

CORE_OPTIONS: tuple[Option, ...] = (
    Option("ms1", "log_level", "choice", "INFO", "log level on stderr",
           choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    Option("ms1", "log_format", "choice", "text",
           "log lines on stderr: text, kv (key=value) or json; one line per record",
           choices=("text", "kv", "json")),
    Option("ms1", "shutdown_timeout", "float", 10.0,
           "seconds to flush the partial batch and finish in-flight sends on SIGTERM/SIGINT",
           min=0.1, max=3600),
    Option("ms1", "once_timeout", "float", 300.0,
           "with --once: seconds to wait for every batch to be delivered or dead-lettered",
           min=0.1, max=86400),
    Option("metrics", "address", "str", "",
           "host:port for /metrics (Prometheus), /healthz and /readyz; empty: off. Keep it "
           "on loopback unless a firewall protects it"),
    Option("source", "name", "str", "files",
           "where e-mails come from: a source plugin name (built in: files, memory)"),
    Option("source", "read_chunk", "int", 500, "most e-mails taken from the source per read",
           min=1, max=5_000),
    Option("batch", "policy", "str", "batch",
           "batch policy plugin: batch (JSON arrays on /batch-metadata) or unit (one object "
           "per request on /metadata, the old behaviour)"),
    Option("batch", "max_items", "int", 50, "close a batch at this many objects (at most "
           "1,000: what one Redis script call carries with its inbound refs; MS4 takes 50)",
           min=1, max=1_000),
    Option("batch", "max_bytes", "int", 1_048_576,
           "close a batch before its request body would exceed this many bytes; a single "
           "object larger than this is dead-lettered", min=64, max=100 * 1024 * 1024),
    Option("batch", "max_wait", "float", 1.0,
           "seconds a partial batch may wait for more objects before it is sent (linger)",
           min=0.0, max=3600),
    Option("queue", "backend", "str", "memory",
           "outbound queue plugin holding batches until MS4 accepted them (built in: memory)"),
    Option("dead_letters", "backend", "str", "memory",
           "where rejected objects go, with the reason (built in: memory, jsonl)"),
    Option("dead_letters", "max_payload_bytes", "int", 65536,
           "bytes of its payload (e-mail, object or raw entry) a dead letter keeps; a longer "
           "one is clipped and keeps the original's length and SHA-256", min=1024,
           max=64 * 1024 * 1024),
    Option("send", "threads", "int", 4, "sender threads", min=1, max=256),
    Option("send", "retry_initial", "float", 0.5,
           "first retry delay in seconds after a failed send (exponential backoff, jitter)",
           min=0.0, max=600),
    Option("send", "retry_max", "float", 30.0, "longest retry delay in seconds",
           min=0.0, max=3600),
    Option("send", "requests_per_minute", "int", 120,
           "most requests to MS4 in any sliding window of rate_window seconds, for all sender "
           "threads together (MS4 allows 120 per minute)", min=1, max=1_000_000),
    Option("send", "rate_window", "float", 60.0,
           "length in seconds of the rate-limit window (60: per minute; tests shorten it to "
           "compress time)", min=0.001, max=86400),
    Option("send", "retry_after_default", "float", 5.0,
           "seconds every sender pauses after a 429 whose Retry-After is missing or unreadable",
           min=0.0, max=86400),
    Option("send", "retry_after_max", "float", 300.0,
           "longest pause in seconds a 429's Retry-After can impose", min=0.0, max=86400),
    Option("send", "breaker_failures", "int", 5,
           "consecutive failures (5xx, timeouts, connection errors) that open the circuit "
           "breaker", min=1, max=1_000_000),
    Option("send", "breaker_reset", "float", 30.0,
           "seconds the open breaker waits before letting one probe request through",
           min=0.01, max=86400),
    Option("send", "auth_probe_interval", "float", 60.0,
           "during a 401 spell, seconds between probe requests (a reload ends it at once)",
           min=0.01, max=86400),
    Option("send", "max_deliveries", "int", 0,
           "dead-letter a batch handed out more often than this (a batch that keeps crashing "
           "senders); 0: no maximum, keep trying", min=0, max=1_000_000),
    Option("send", "rate_limiter", "str", "memory",
           "rate limiter plugin: memory (this process) or redis (shared by every instance on "
           "the Redis)"),
    Option("ms4", "transport", "str", "memory",
           "transport plugin that talks to MS4 (built in: memory, an in-process fake MS4)"),
    Option("ms4", "api_key_env", "str", "MS1_MS4_API_KEY",
           "environment variable holding the MS4 API key"),
    Option("ms4", "api_key_file", "path", "",
           "file holding the MS4 API key (takes precedence over the environment variable); "
           "re-read on reload"),
)

#: keys that must never be in the INI (secrets) and where they belong instead
_FORBIDDEN_KEYS = {("ms4", "api_key"), ("ms4", "key"), ("ms4", "x_api_key")}


class Config:
    """Validated settings: ``config.get(section, key)`` returns the typed value.

    ``explicit`` holds the ``(section, key)`` pairs the file set; everything else
    is the option's default.
    """

    def __init__(
        self, path: str, options: Mapping[tuple[str, str], Option],
        values: Mapping[tuple[str, str], Any], explicit: Iterable[tuple[str, str]],
        api_key: Secret | None,
    ) -> None:
        self.path = path
        self.options = dict(options)
        self._values = dict(values)
        self.explicit = frozenset(explicit)
        self.api_key = api_key

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

    def error(self, section: str, key: str, problem: str) -> ConfigError:
        """A ConfigError about one key of this config (for plugins validating their options)."""
        return ConfigError(problem, path=self.path, section=section, key=key)

    def with_values(self, changes: Mapping[tuple[str, str], Any]) -> Config:
        """A copy with some values replaced (tests, CLI overrides)."""
        values = {**self._values, **changes}
        return Config(self.path, self.options, values, self.explicit | set(changes),
                      self.api_key)

    def render(self) -> str:
        """The effective configuration as INI text, API key redacted, defaults marked."""
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
            origin = "" if (sec, key) in self.explicit else "  ; default"
            lines.append(f"{key} = {text}{origin}")
            lines.append(f"#   {opt.help}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"Config(path={self.path!r}, api_key={self.api_key!r})"


def index_options(options: Iterable[Option]) -> dict[tuple[str, str], Option]:
    """Options by ``(section, key)``; a key declared twice is a programming error."""
    table: dict[tuple[str, str], Option] = {}
    for opt in options:
        where = (opt.section, opt.key)
        if where in table:
            raise ValueError(f"option [{opt.section}] {opt.key} is declared twice")
        table[where] = opt
    return table


def load_config(
    path: str, options: Iterable[Option] = CORE_OPTIONS,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate ``path`` against ``options``. Raise ConfigError on any problem."""
    table = index_options(options)
    environ = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="\x00no-default")
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
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"line {exc.lineno}: key outside any [section]: {exc.line.strip()!r}",
                          path=path) from exc
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"not a valid INI file: {first}", path=path) from exc

    sections = sorted({sec for sec, _ in table})
    values: dict[tuple[str, str], Any] = {k: o.default for k, o in table.items()}
    explicit: list[tuple[str, str]] = []
    for sec in parser.sections():
        if sec not in sections:
            raise ConfigError(f"unknown section (known sections: {', '.join(sections)})",
                              path=path, section=sec)
        known = sorted(k for s, k in table if s == sec)
        for key, raw in parser.items(sec):
            if (sec, key) in _FORBIDDEN_KEYS:
                env_name = parser.get("ms4", "api_key_env", fallback="MS1_MS4_API_KEY")
                raise ConfigError(
                    f"the API key is never read from the INI file: set ${env_name.strip()} "
                    "or name a key file with api_key_file",
                    path=path, section=sec, key=key)
            opt = table.get((sec, key))
            if opt is None:
                raise ConfigError(f"unknown key (known keys: {', '.join(known)})",
                                  path=path, section=sec, key=key)
            try:
                values[(sec, key)] = opt.parse(raw)
            except ValueError as exc:
                raise ConfigError(str(exc), path=path, section=sec, key=key) from None
            explicit.append((sec, key))

    api_key = None
    if ("ms4", "api_key_env") in table:
        api_key = read_api_key(path, str(values[("ms4", "api_key_env")]),
                               str(values[("ms4", "api_key_file")]), environ)
    return Config(path, table, values, explicit, api_key)


def read_api_key(
    config_path: str, env_name: str, key_file: str, environ: Mapping[str, str],
) -> Secret | None:
    """The API key from ``key_file`` if set, else from ``$env_name``; None if neither is set."""
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {key_file!r}: {exc.strerror}",
                              path=config_path, section="ms4", key="api_key_file") from None
        if not value:
            raise ConfigError(f"API key file {key_file!r} is empty",
                              path=config_path, section="ms4", key="api_key_file")
        return Secret(value, origin=key_file)
    value = environ.get(env_name, "").strip()
    return Secret(value, origin=f"${env_name}") if value else None
