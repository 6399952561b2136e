"""Structured logs on stderr, with secrets redacted.

:func:`setup_logging` gives the root logger one handler with one of three formats:

More: docs/internals.md, ``ms1.ops.logs``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from typing import TextIO

from ms1.redaction import KNOWN, MASK, MIN_SECRET_LENGTH, Redactor, remember

__all__ = [
    "CONTINUATION",
    "FORMATS",
    "MASK",
    "MIN_SECRET_LENGTH",
    "JsonFormatter",
    "KeyValueFormatter",
    "RedactingFilter",
    "TextFormatter",
    "add_secret",
    "apply_log_settings",
    "escape_controls",
    "extras",
    "setup_logging",
]

#: the values ``setup_logging(fmt=...)`` accepts
FORMATS = ("text", "kv", "json")
#: loggers too chatty below WARNING (they log request lines and headers)
QUIET_LOGGERS = ("httpx", "httpcore")

#: attributes every LogRecord has; anything else on a record came from ``extra={...}``
STANDARD_ATTRS = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}

#: the fixed keys of the kv and json formats; an extra of that name gets a prefix
_FIXED_KEYS = frozenset({"ts", "level", "logger", "thread", "msg", "exc", "stack"})
_EXTRA_PREFIX = "extra_"


def extras(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of ``record``: its attributes that are not standard ones."""
    return {key: value for key, value in record.__dict__.items() if key not in STANDARD_ATTRS}


class RedactingFilter(logging.Filter):
    """Passes every text of a record through :mod:`ms1.redaction`; always passes it.

    Covers the formatted message (``msg % args``; the record keeps the redacted text
    with ``args = ()``), the exception (formatted into ``exc_text``; ``exc_info`` is
    cleared), ``stack_info`` and the extras (strings; other values whose ``str()``
    holds a secret become the redacted string). Masked: the secrets given here and every
    secret the process knows (:data:`ms1.redaction.KNOWN`), in all their forms (plain,
    ``repr``, bytes repr, JSON, percent-encoded), URL passwords and password-like query
    values. Secrets shorter than four characters are ignored. Thread-safe; never raises.

    Put it on a *handler*: a filter on a logger does not see records of its children.
    """

    def __init__(self, secrets: Iterable[str] = (), name: str = "") -> None:
        super().__init__(name)
        self._own = Redactor(secrets)

    def add(self, *secrets: str) -> None:
        """Start redacting ``secrets`` here (short or empty strings are skipped)."""
        self._own.add(*secrets)

    def redact(self, text: str) -> str:
        """``text`` with every secret and URL credential replaced by ``***``."""
        if not text:
            return text
        return KNOWN.redact(self._own.redact_known(text))

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always True (the record is never dropped)."""
        try:
            self._redact_record(record)
        except Exception:
            # never let a secret through because redaction broke: drop the content
            record.msg = f"<log record redaction failed; logged at {record.pathname}:" \
                         f"{record.lineno}>"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
            for key in extras(record):
                record.__dict__[key] = MASK
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # msg % args failed: keep both, readable, instead of an error
            message = f"{record.msg!s} (args: {record.args!r})"
        record.msg = self.redact(message)
        record.args = ()
        if record.exc_info:
            if record.exc_info[0] is not None and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in extras(record).items():
            if isinstance(value, str):
                record.__dict__[key] = self.redact(value)
            elif value is None or isinstance(value, bool | int | float):
                continue
            else:
                text = str(value)
                redacted = self.redact(text)
                if redacted != text:
                    record.__dict__[key] = redacted


def setup_logging(level: str, fmt: str = "text", secrets: Iterable[str] = (),
                  stream: TextIO | None = None) -> None:
    """Configure the root logger: one handler on ``stream`` (stderr), format ``fmt``.

    ``level`` is a level name (``"INFO"``, case-insensitive); ``fmt`` one of
    :data:`FORMATS`. Existing root handlers are removed and closed. A
    :class:`RedactingFilter` goes on the handler; ``secrets`` become known to the
    redaction process-wide (:func:`ms1.redaction.remember`: errors are redacted too).
    ``httpx`` and ``httpcore`` log at WARNING.
    Raises ValueError for an unknown level or format.
    """
    global _handler
    number = _level(level)
    formatter = _formatter(fmt)

    remember(*secrets)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())

    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    _handler = handler
    root.setLevel(number)
    for quiet in QUIET_LOGGERS:
        logging.getLogger(quiet).setLevel(logging.WARNING)


#: the handler :func:`setup_logging` installed (None: logging was set up by someone else)
_handler: logging.Handler | None = None


def apply_log_settings(level: str, fmt: str) -> None:
    """A reload: the root logger's level, and the format of the handler
    :func:`setup_logging` installed, from the next record on.

    The handler stays (no record is lost or written unredacted while it changes): only
    its formatter is replaced, its :class:`RedactingFilter` is kept. Without such a
    handler (ms1 embedded, tests) only the level is set. Raises ValueError for an
    unknown level or format, changing nothing.
    """
    number = _level(level)
    formatter = _formatter(fmt)
    handler = _handler
    if handler is not None and handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    logging.getLogger().setLevel(number)


def _level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    return levels[name]


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "text":
        return TextFormatter()
    if fmt == "kv":
        return KeyValueFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")


def add_secret(value: str) -> None:
    """Redact ``value`` from now on, in logs and errors (e.g. a reloaded API key);
    thread-safe, before or after :func:`setup_logging` (:func:`ms1.redaction.remember`)."""
    remember(value)


# --- formatting ---------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[^\x21-\x7e]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: escaped inside quotes: backslash, quote and every control or line-separator character
_ESCAPE_RE = re.compile('[\\\\"\x00-\x1f\x7f\x85\u2028\u2029]')
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _format_float(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _kv_text(value: object) -> str:
    """A value as logfmt text: bare when it can be, else double-quoted and escaped."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    text = value if isinstance(value, str) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _ESCAPE_RE.sub(_escape, text) + '"'


def _kv_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key) or "_"


def _utc_timestamp(record: logging.LogRecord) -> str:
    """``2026-11-23T09:30:00.123Z`` for the record's creation time."""
    when = dt.datetime.fromtimestamp(int(record.created), tz=dt.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{min(int(record.msecs), 999):03d}Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    return {(_EXTRA_PREFIX + key if key in _FIXED_KEYS else key): value
            for key, value in extras(record).items()}


class _StructuredFormatter(logging.Formatter):
    """Shared part of the kv and json formats: the ordered fields of a record."""

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        """ts, level, logger, thread, msg, the extras, then exc and stack if any."""
        record.message = record.getMessage()
        out: dict[str, object] = {
            "ts": _utc_timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.message,
        }
        out.update(_extra_fields(record))
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out


class KeyValueFormatter(_StructuredFormatter):
    """logfmt, one line per record: ``ts=... level=INFO logger=... thread=... msg="..."``
    then ``key=value`` per extra, then ``exc="..."`` (the traceback, newlines escaped).

    A value with whitespace, quotes, ``=``, backslashes or non-ASCII is double-quoted
    with ``\\``, ``"``, newlines and tabs escaped; floats get at most 3 decimals.
    An extra named like a fixed key (``ts``, ``msg``...) is written ``extra_<name>``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one logfmt line (no trailing newline)."""
        return " ".join(f"{_kv_key(key)}={_kv_text(value)}"
                        for key, value in self.fields(record).items())


class JsonFormatter(_StructuredFormatter):
    """One JSON object per record, on one line, with the keys of :class:`KeyValueFormatter`.

    Values JSON cannot hold (objects, NaN) are written as their ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object (no trailing newline)."""
        fields = self.fields(record)
        for key, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                fields[key] = str(value)
        try:
            return json.dumps(fields, ensure_ascii=False, default=str, allow_nan=False)
        except (TypeError, ValueError):  # e.g. a circular or NaN-holding container
            return json.dumps({key: value if isinstance(value, str | int | float | bool)
                               or value is None else str(value)
                               for key, value in fields.items()}, ensure_ascii=False)


#: every character that could end a line or rewrite it on a terminal (tab is kept)
_TEXT_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
#: what starts each line of a traceback or stack in the text format
CONTINUATION = " | "


def escape_controls(text: str) -> str:
    """``text`` on one line: newlines, CR and every other control character escaped
    (``\\n``, ``\\r``, ``\\u001b``); tabs are kept."""
    return _TEXT_CONTROL_RE.sub(_escape, text) if text else text


class TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s`` followed by
    `` key=value`` per extra (quoted as in :class:`KeyValueFormatter`), on one line:
    control characters are escaped. A traceback or stack follows, every line of it
    prefixed with :data:`CONTINUATION` (its own control characters escaped), so no line
    after the first can be taken for a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The header line, with the extras appended, control characters escaped."""
        line = super().formatMessage(record)
        pairs = "".join(f" {_kv_key(key)}={_kv_text(value)}"
                        for key, value in extras(record).items())
        return escape_controls(line + pairs)

    def format(self, record: logging.LogRecord) -> str:
        """The header line, then the traceback and stack as prefixed continuation lines."""
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += _continuation(record.exc_text)
        if record.stack_info:
            text += _continuation(self.formatStack(record.stack_info))
        return text


def _continuation(block: str) -> str:
    """``block`` as continuation lines: each line prefixed, CR and controls escaped."""
    return "".join(f"\n{CONTINUATION}{escape_controls(line)}" for line in block.split("\n"))
