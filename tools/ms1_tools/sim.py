"""ms4-sim: a contract-faithful MS4 simulator on loopback (standard library only).

Endpoints (MS4 contract):

More: docs/internals.md, ``ms1_tools.sim``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import email.utils
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, cast

from ms1_tools.sim_limits import SHAPES, Limiter, Verdict

__all__ = [
    "BATCH_PATH",
    "CONTROLLABLE",
    "DEFAULT_MAX_BODY_BYTES",
    "REJECT_EVERY_REASON",
    "SINGLE_PATH",
    "AcceptedRequest",
    "Ms4Sim",
    "SimConfig",
    "is_rejected_by_sim",
    "main",
    "validate_metadata",
]

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
BATCH_PATH = "/batch-metadata"
SINGLE_PATH = "/metadata"
STATS_PATH = "/stats"
RESET_PATH = "/reset"
ACCEPTED_PATH = "/accepted"
CONTROL_PATH = "/_control"
#: settings ``POST /_control`` may change while the sim runs
CONTROLLABLE = ("api_key", "latency", "fail_500", "fail_429", "fail_401", "drop", "reset",
                "retry_after", "retry_after_form", "rate_limit", "window", "count_at",
                "limiter", "burst", "count_denied", "ratelimit_headers",
                "count_late", "count_late_spell", "reject_every",
                "answer_status", "refuse_status")
RETRY_AFTER_FORMS = ("seconds", "http-date", "none")  # none: 429s carry no Retry-After
RATELIMIT_HEADERS = ("none", "draft", "x-ratelimit")
#: where the rate limiter counts a request: as it arrives (before the work, like a rate
#: limiter in front of a service: over the limit, 429 at once) or as it is answered
COUNT_AT = ("arrival", "answer")
REFUSE_STATUSES = (400, 422)
API_PATHS = (BATCH_PATH, SINGLE_PATH)
REJECT_EVERY_REASON = "rejected by sim (reject_every)"

# Bodies over max_body_bytes but under this size are read and discarded so that the
# 413 reliably reaches the client and the connection stays usable; above it we close.
_DRAIN_LIMIT = 64 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_MAX_LINE = 65536

_REQUIRED_FIELDS = (
    "invoice_id",
    "vendor_name",
    "invoice_date",
    "total_amount",
    "currency",
    "line_items",
)
_LINE_ITEM_FIELDS = ("description", "quantity", "unit_price")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_DIGITS_RE = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------- config


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    api_key: str = "sim-key"
    rate_limit: int = 120  # requests per sliding window; 0 = unlimited
    window: float = 60.0  # seconds, sliding window
    # the limiter's shape (ms1_tools.sim_limits.SHAPES): how the limit is counted
    limiter: str = "sliding-log"
    burst: int = -1  # token-bucket capacity / leaky-bucket burst; -1: limit / 0
    count_denied: bool = False  # a refused request is counted too (HAProxy's tracking)
    # the RateLimit header fields on every API answer: "none", "draft" (RateLimit-Policy
    # and RateLimit, draft-ietf-httpapi-ratelimit-headers) or "x-ratelimit" (X-RateLimit-*)
    ratelimit_headers: str = "none"
    count_at: str = "arrival"  # when the limiter counts a request: "arrival" or "answer"
    # arrival: in every other spell of count_late_spell seconds (the first from the start),
    # each request is counted count_late seconds after it arrived: an MS4 whose rate
    # limiter reads requests late while it is loaded, on time between; 0 = always at once
    count_late: float = 0.0
    count_late_spell: float = 1.0
    latency: float = 0.0  # seconds slept before every API answer
    fail_500: float = 0.0  # probability of an injected 500
    fail_429: float = 0.0  # probability of an injected 429 (Retry-After: retry_after)
    fail_401: float = 0.0  # probability of an injected 401
    drop: float = 0.0  # probability an ACCEPTED request gets no response (socket closed)
    reset: float = 0.0  # probability an ACCEPTED request's answer is cut by a TCP reset
    retry_after: float = 1.0  # seconds an injected 429 asks for
    retry_after_form: str = "seconds"  # "seconds" or "http-date" (IMF-fixdate)
    reject_every: int = 0  # > 0: reject objects with crc32(invoice_id) % N == 0
    seed: int | None = None  # RNG seed for fault injection
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    answer_status: int = 0  # 200..599 but 202: answer every API request so; 0 = off
    refuse_status: int = 400  # the status of a refused object (400 or 422)

    def __post_init__(self) -> None:
        for name in ("fail_500", "fail_429", "fail_401", "drop", "reset"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0")
        if not self.window > 0:
            raise ValueError("window must be > 0")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")
        if not 0 <= self.count_late <= 60:
            raise ValueError("count_late must be in [0, 60] seconds")
        if not self.count_late_spell > 0:
            raise ValueError("count_late_spell must be > 0")
        if self.reject_every < 0:
            raise ValueError("reject_every must be >= 0")
        if not 0 <= self.retry_after <= 86_400:
            raise ValueError("retry_after must be in [0, 86400] seconds")
        if self.count_at not in COUNT_AT:
            raise ValueError(f"count_at must be one of {COUNT_AT}, got {self.count_at!r}")
        if self.retry_after_form not in RETRY_AFTER_FORMS:
            raise ValueError(f"retry_after_form must be one of {RETRY_AFTER_FORMS}, "
                             f"got {self.retry_after_form!r}")
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.limiter not in SHAPES:
            raise ValueError(f"limiter must be one of {SHAPES}, got {self.limiter!r}")
        if self.burst < -1:
            raise ValueError("burst must be >= 0 (or -1: the shape's default)")
        if self.ratelimit_headers not in RATELIMIT_HEADERS:
            raise ValueError(f"ratelimit_headers must be one of {RATELIMIT_HEADERS}, "
                             f"got {self.ratelimit_headers!r}")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in [0, 65535]")
        if self.answer_status != 0 and (not 200 <= self.answer_status <= 599
                                        or self.answer_status == 202):
            raise ValueError("answer_status must be 0 (off) or a status in 200..599 but 202, "
                             f"got {self.answer_status!r}")
        if self.refuse_status not in REFUSE_STATUSES:
            raise ValueError(f"refuse_status must be one of {REFUSE_STATUSES}, "
                             f"got {self.refuse_status!r}")


# ------------------------------------------------------------------------ validation


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _number_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {_json_type(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


def is_rejected_by_sim(invoice_id: str, reject_every: int) -> bool:
    """The deterministic ``reject_every`` verdict for one invoice_id."""
    return reject_every > 0 and zlib.crc32(invoice_id.encode("utf-8")) % reject_every == 0


def _line_item_problem(index: int, item: object) -> tuple[str, str] | None:
    prefix = f"line_items[{index}]"
    if not isinstance(item, dict):
        return prefix, f"must be an object, got {_json_type(item)}"
    for key in _LINE_ITEM_FIELDS:
        if key not in item:
            return f"{prefix}.{key}", "missing required field"
    extra = sorted(set(item) - set(_LINE_ITEM_FIELDS))
    if extra:
        return f"{prefix}.{extra[0]}", "unknown field"
    if not isinstance(item["description"], str):
        return f"{prefix}.description", f"must be a string, got {_json_type(item['description'])}"
    for key in ("quantity", "unit_price"):
        problem = _number_problem(item[key])
        if problem is not None:
            return f"{prefix}.{key}", problem
    return None


def validate_metadata(obj: object, reject_every: int = 0) -> tuple[str | None, str] | None:
    """Strictly validate one metadata object against the MS4 contract.

    Returns ``None`` if valid, else ``(field, message)`` for the first problem found
    (``field`` is ``None`` when the value is not an object at all).  Nothing is normalised.
    """
    if not isinstance(obj, dict):
        return None, f"must be a JSON object, got {_json_type(obj)}"
    for key in _REQUIRED_FIELDS:
        if key not in obj:
            return key, "missing required field"
    extra = sorted(set(obj) - set(_REQUIRED_FIELDS))
    if extra:
        return extra[0], "unknown field"
    for key in ("invoice_id", "vendor_name"):
        value = obj[key]
        if not isinstance(value, str):
            return key, f"must be a non-empty string, got {_json_type(value)}"
        if not value:
            return key, "must be a non-empty string"
    invoice_date = obj["invoice_date"]
    if not isinstance(invoice_date, str):
        return "invoice_date", f"must be a string YYYY-MM-DD, got {_json_type(invoice_date)}"
    if not _DATE_RE.fullmatch(invoice_date):
        return "invoice_date", f"must have format YYYY-MM-DD, got {invoice_date!r}"
    try:
        date.fromisoformat(invoice_date)
    except ValueError:
        return "invoice_date", f"not a real calendar date: {invoice_date!r}"
    problem = _number_problem(obj["total_amount"])
    if problem is not None:
        return "total_amount", problem
    currency = obj["currency"]
    if not isinstance(currency, str):
        return "currency", f"must be a string, got {_json_type(currency)}"
    if not _CURRENCY_RE.fullmatch(currency):
        return "currency", f"must be 3 upper-case letters A-Z, got {currency!r}"
    line_items = obj["line_items"]
    if not isinstance(line_items, list):
        return "line_items", f"must be an array, got {_json_type(line_items)}"
    for index, item in enumerate(line_items):
        item_problem = _line_item_problem(index, item)
        if item_problem is not None:
            return item_problem
    if is_rejected_by_sim(obj["invoice_id"], reject_every):
        return "invoice_id", REJECT_EVERY_REASON
    return None


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class AcceptedRequest:
    """One accepted API request (answered 202, or its answer lost after acceptance).

    ``dropped``: the client never got the 202 -- the connection was closed unanswered or
    (``reset`` too) reset after part of the answer.
    """

    path: str
    idempotency_key: str | None
    invoice_ids: tuple[str, ...]
    dropped: bool
    at: float  # time.monotonic()
    reset: bool = False
    #: the request's W3C ``traceparent`` header, as sent (None if absent)
    traceparent: str | None = None

    @property
    def answer(self) -> str:
        return "reset" if self.reset else "dropped" if self.dropped else "202"


def _max_in_window(timestamps: Sequence[float], window: float) -> int:
    """Max number of timestamps in any half-open window ``(t - window, t]``."""
    best = 0
    left = 0
    for right, now in enumerate(timestamps):
        while timestamps[left] <= now - window:
            left += 1
        best = max(best, right - left + 1)
    return best


class _SimState:
    """All mutable sim state; every access goes through ``self.lock`` (held briefly)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.rng = random.Random(config.seed)
        self.started = time.monotonic()
        self.requests_total = 0
        self.by_status: dict[str, int] = {}
        self.connections_opened = 0
        self.invoices_accepted = 0
        self.duplicate_invoices = 0
        self.duplicate_batches = 0
        self.accepted_ids: set[str] = set()
        self.accepted_keys: set[str] = set()
        self.accepted: list[AcceptedRequest] = []
        self.passed: list[float] = []  # monotonic times of requests that passed the limiter
        self.limiter = self._new_limiter()

    def _new_limiter(self) -> Limiter:
        cfg = self.config
        return Limiter(cfg.limiter, cfg.rate_limit, cfg.window,
                       burst=None if cfg.burst < 0 else cfg.burst,
                       count_denied=cfg.count_denied)

    def reset(self) -> None:
        with self.lock:
            self.requests_total = 0
            self.by_status.clear()
            self.connections_opened = 0
            self.invoices_accepted = 0
            self.duplicate_invoices = 0
            self.duplicate_batches = 0
            self.accepted_ids.clear()
            self.accepted_keys.clear()
            self.accepted.clear()
            self.passed.clear()
            self.limiter = self._new_limiter()

    def count(self, status: str) -> None:
        with self.lock:
            self.requests_total += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def connection_opened(self) -> None:
        with self.lock:
            self.connections_opened += 1

    def admit(self, arrived: float | None = None) -> Verdict:
        """Count one request against the configured limiter, as of ``arrived`` (its
        headers were read: where a limiter in front of a server counts it; None: now)."""
        with self.lock:
            now = time.monotonic() if arrived is None else arrived
            verdict = self.limiter.admit(now)
            if verdict.ok:
                self.passed.append(now)
            return verdict

    def ratelimit_fields(self, verdict: Verdict | None) -> tuple[tuple[str, str], ...]:
        """The RateLimit header fields of an answer (``ratelimit_headers``), from the
        verdict of its request (None: not counted; the limiter's state is then read
        without counting — with no limit, nothing is said)."""
        cfg = self.config
        if cfg.ratelimit_headers == "none" or cfg.rate_limit <= 0 or verdict is None:
            return ()
        reset = str(math.ceil(verdict.reset))
        if cfg.ratelimit_headers == "draft":
            return (("RateLimit-Policy", f'"default";q={cfg.rate_limit};w={cfg.window:g}'),
                    ("RateLimit", f'"default";r={verdict.remaining};t={reset}'))
        return (("X-RateLimit-Limit", str(cfg.rate_limit)),
                ("X-RateLimit-Remaining", str(verdict.remaining)),
                ("X-RateLimit-Reset", reset))

    def count_delay(self) -> float:
        """How late a request arriving now is counted: ``count_late`` in the late spells
        (every other ``count_late_spell`` seconds since the sim started), else 0."""
        late, spell = self.config.count_late, self.config.count_late_spell
        if late <= 0:
            return 0.0
        return late if int((time.monotonic() - self.started) // spell) % 2 == 0 else 0.0

    def draw_fault(self) -> int | None:
        cfg = self.config
        with self.lock:
            faults = ((500, cfg.fail_500), (429, cfg.fail_429), (401, cfg.fail_401))
            for status, probability in faults:
                if probability > 0 and self.rng.random() < probability:
                    return status
        return None

    def accept(self, path: str, idempotency_key: str | None, invoice_ids: list[str],
               traceparent: str | None = None) -> str | None:
        """Record an accepted request; returns how its answer is lost (``"dropped"``: close
        the connection unanswered, ``"reset"``: reset it mid-answer) or None (answer 202)."""
        drop_p, reset_p = self.config.drop, self.config.reset
        with self.lock:
            lost: str | None = None
            if drop_p > 0 and self.rng.random() < drop_p:
                lost = "dropped"
            elif reset_p > 0 and self.rng.random() < reset_p:
                lost = "reset"
            self.requests_total += 1
            status = lost or "202"
            self.by_status[status] = self.by_status.get(status, 0) + 1
            self.invoices_accepted += len(invoice_ids)
            for invoice_id in invoice_ids:
                if invoice_id in self.accepted_ids:
                    self.duplicate_invoices += 1
                else:
                    self.accepted_ids.add(invoice_id)
            if idempotency_key is not None:
                if idempotency_key in self.accepted_keys:
                    self.duplicate_batches += 1
                else:
                    self.accepted_keys.add(idempotency_key)
            self.accepted.append(
                AcceptedRequest(
                    path=path,
                    idempotency_key=idempotency_key,
                    invoice_ids=tuple(invoice_ids),
                    dropped=lost is not None,
                    at=time.monotonic(),
                    reset=lost == "reset",
                    traceparent=traceparent,
                )
            )
            return lost

    def accepted_list(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"path": req.path, "idempotency_key": req.idempotency_key,
                     "invoice_ids": list(req.invoice_ids), "answer": req.answer,
                     "traceparent": req.traceparent}
                    for req in self.accepted]

    def settings(self) -> dict[str, Any]:
        with self.lock:
            return {name: getattr(self.config, name) for name in CONTROLLABLE
                    if name != "api_key"}

    def control(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply ``changes`` (names from :data:`CONTROLLABLE`) all at once, or raise
        ValueError naming the first bad one and change nothing."""
        unknown = sorted(set(changes) - set(CONTROLLABLE))
        if unknown:
            raise ValueError(f"not a runtime setting: {unknown[0]!r} (settings: "
                             f"{', '.join(CONTROLLABLE)})")
        fields = {f.name: f for f in dataclasses.fields(SimConfig)}
        for name, value in changes.items():
            kind = fields[name].type
            if kind == "str":
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"{name} must be of type {kind}, got {_json_type(value)}")
        with self.lock:
            dataclasses.replace(self.config, **changes)  # validates the combination
            for name, value in changes.items():
                setattr(self.config, name, float(value) if fields[name].type == "float"
                        else value)
            if {"window", "rate_limit", "limiter", "burst", "count_denied"} & set(changes):
                self.limiter = self._new_limiter()
        return self.settings()

    def max_in_window(self, window: float) -> int:
        with self.lock:
            timestamps = list(self.passed)
        return _max_in_window(timestamps, window)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            timestamps = list(self.passed)
            data: dict[str, Any] = {
                "requests_total": self.requests_total,
                "requests_by_status": dict(sorted(self.by_status.items())),
                "accepted_requests": len(self.accepted),
                "invoices_accepted": self.invoices_accepted,
                "unique_invoices_accepted": len(self.accepted_ids),
                "duplicate_invoices": self.duplicate_invoices,
                "duplicate_batches": self.duplicate_batches,
                "connections_opened": self.connections_opened,
                "rate_limit": self.config.rate_limit,
                "window": self.config.window,
            }
        data["max_in_window"] = _max_in_window(timestamps, self.config.window)
        return data


# ---------------------------------------------------------------------------- server


class _ClientGone(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


class _BadBody(Exception):
    pass


@dataclass
class _Outcome:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    reset: bool = False


def _retry_after_fields(config: SimConfig, seconds: float) -> tuple[tuple[str, str], ...]:
    """A 429's ``Retry-After`` asking for ``seconds``, in the configured form (none with
    ``retry_after_form = "none"``, as nginx and HAProxy send it)."""
    if config.retry_after_form == "none":
        return ()
    if config.retry_after_form == "http-date":
        return (("Retry-After", email.utils.formatdate(time.time() + seconds, usegmt=True)),)
    return (("Retry-After", str(math.ceil(seconds))),)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Outcome:
    return _Outcome(status, json.dumps({"error": message}).encode(), headers)


def _rate_limited(config: SimConfig, verdict: Verdict) -> _Outcome:
    """The limiter's 429: ``Retry-After`` when a request would pass (whole seconds, at
    least 1)."""
    return _error(429, "rate limit exceeded",
                  _retry_after_fields(config, max(1, math.ceil(verdict.retry_after))))


def _forced(status: int, host: str, path: str) -> _Outcome:
    """The answer of ``answer_status``: what such a status looks like from a real server."""
    if status in (204, 304):
        return _Outcome(status)  # no body allowed
    headers: tuple[tuple[str, str], ...] = ()
    if 300 <= status < 400:
        headers = (("Location", f"http://{host}/v2{path}"),)
    elif status == 405:
        headers = (("Allow", "GET"),)
    elif status in (429, 503):
        headers = (("Retry-After", "1"),)
    if 200 <= status < 300:
        return _Outcome(status, json.dumps({"status": "ok"}).encode(), headers)
    return _error(status, f"answer_status {status} (set by the sim's control)", headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


class _SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: listen backlog: socketserver's 5 resets a burst of new connections (a client
    #: opening dozens at once, as MS4's window allows); a web server's usual is 128+
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: _SimState) -> None:
        self.state = state
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn() (reverse DNS can be slow).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | _ClientGone):
            return  # client went away / socket closed under us: not worth a word
        sys.stderr.write(f"ms4-sim: unexpected error handling a request: {exc!r}\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ms4-sim/1.0"
    sys_version = ""
    timeout = 120.0  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stalls on small answers

    @property
    def _sim_server(self) -> _SimHTTPServer:
        return cast(_SimHTTPServer, self.server)

    @property
    def _state(self) -> _SimState:
        return self._sim_server.state

    def setup(self) -> None:
        super().setup()
        self._sim_server.track(self.connection)
        self._state.connection_opened()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._sim_server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: nothing per request, and never anything with headers in it

    # -- routing ---------------------------------------------------------------------

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def do_GET(self) -> None:
        path = self._path()
        if path == STATS_PATH:
            body = json.dumps(self._state.snapshot()).encode()
            self._send(_Outcome(200, body), count=False)
        elif path == ACCEPTED_PATH:
            self._send(_Outcome(200, json.dumps(self._state.accepted_list()).encode()),
                       count=False)
        elif path == CONTROL_PATH:
            self._send(_Outcome(200, json.dumps(self._state.settings()).encode()),
                       count=False)
        elif path in API_PATHS:
            self._finish_api(_error(405, "method not allowed", (("Allow", "POST"),)))
        else:
            self._finish_api(_error(404, "not found"))

    def do_POST(self) -> None:
        self._arrived = time.monotonic()
        path = self._path()
        if path == RESET_PATH:
            try:
                self._read_body(_DRAIN_LIMIT)
            except (_ClientGone, _BodyTooLarge, _BadBody):
                self.close_connection = True
                return
            self._state.reset()
            self._send(_Outcome(204), count=False)
            return
        if path == CONTROL_PATH:
            self._control()
            return
        outcome = self._read_and_process(path)
        if outcome is not None:
            self._finish_api(outcome)

    def _control(self) -> None:
        try:
            body = self._read_body(_MAX_LINE)
        except (_ClientGone, _BodyTooLarge, _BadBody):
            self.close_connection = True
            return
        try:
            changes = json.loads(body.decode("utf-8") or "null")
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of settings")
            settings = self._state.control(changes)
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            self._send(_error(400, str(exc)), count=False)
            return
        self._send(_Outcome(200, json.dumps(settings).encode()), count=False)

    # -- body ------------------------------------------------------------------------

    def _discard(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise _ClientGone
            remaining -= len(chunk)

    def _read_line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE)
        if not line:
            raise _ClientGone
        return line

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_field = self._read_line().split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]+", size_field):
                raise _BadBody("invalid chunk size")
            size = int(size_field, 16)
            if size == 0:
                break
            total += size
            if total > _DRAIN_LIMIT:
                self.close_connection = True
                raise _BodyTooLarge
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise _ClientGone
            if total <= limit:
                parts.append(chunk)
            else:
                parts.clear()
            self._read_line()  # CRLF after the chunk data
        while self._read_line() not in (b"\r\n", b"\n"):
            pass  # trailers
        if total > limit:
            raise _BodyTooLarge
        return b"".join(parts)

    def _read_body(self, limit: int) -> bytes:
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise _BadBody("unsupported Transfer-Encoding")
            return self._read_chunked(limit)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        if not _DIGITS_RE.fullmatch(raw_length.strip()):
            raise _BadBody("invalid Content-Length")
        length = int(raw_length.strip())
        if length > limit:
            if length <= _DRAIN_LIMIT:
                self._discard(length)
            else:
                self.close_connection = True
            raise _BodyTooLarge
        data = self.rfile.read(length)
        if len(data) < length:
            raise _ClientGone
        return data

    # -- API -------------------------------------------------------------------------

    #: the rate limiter's verdict on the request being answered (its RateLimit fields)
    _verdict: Verdict | None = None
    #: when the request being answered had its headers read
    _arrived: float | None = None

    def _read_and_process(self, path: str) -> _Outcome | None:
        limit = self._state.config.max_body_bytes
        try:
            body = self._read_body(limit)
        except _ClientGone:
            self.close_connection = True
            return None
        except _BodyTooLarge:
            return _error(413, f"request body exceeds {limit} bytes")
        except _BadBody as exc:
            self.close_connection = True
            return _error(400, str(exc))
        counted = (self._state.config.count_at == "arrival" and path in API_PATHS
                   and self._key_ok() and not self._state.config.answer_status)
        if counted:  # a rate limiter in front of the work: over the limit, 429 at once
            delay = self._state.count_delay()
            arrived = self._arrived
            if delay > 0:  # a loaded MS4 reading the request late
                time.sleep(delay)
                arrived = None
            self._verdict = self._state.admit(arrived)
            if not self._verdict.ok:
                return _rate_limited(self._state.config, self._verdict)
        latency = self._state.config.latency
        if latency > 0:  # the server's work: then it decides and answers at once
            time.sleep(latency)
        if path not in API_PATHS:
            return _error(404, "not found")
        forced = self._state.config.answer_status
        if forced:
            return _forced(forced, self.headers.get("Host") or "ms4.invalid", path)
        return self._process(path, body, counted)

    def _key_ok(self) -> bool:
        key = self.headers.get("X-API-Key")
        expected = self._state.config.api_key
        return key is not None and hmac.compare_digest(key.encode(), expected.encode())

    def _process(self, path: str, body: bytes, counted: bool) -> _Outcome:
        state = self._state
        cfg = state.config
        if not self._key_ok():
            return _error(401, "invalid API key")
        if not counted:
            self._verdict = state.admit()
            if not self._verdict.ok:
                return _rate_limited(cfg, self._verdict)
        fault = state.draw_fault()
        if fault == 500:
            return _error(500, "internal server error (injected by sim)")
        if fault == 429:
            return _error(429, "rate limit exceeded (injected by sim)",
                          _retry_after_fields(cfg, cfg.retry_after))
        if fault == 401:
            return _error(401, "invalid API key")
        try:
            payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _error(400, "body is not valid JSON")
        if path == BATCH_PATH:
            if not isinstance(payload, list):
                return _error(400, "body must be a JSON array of metadata objects")
            if not payload:
                return _error(400, "body must be a non-empty JSON array")
            objects: list[Any] = payload
        else:
            if not isinstance(payload, dict):
                return _error(400, "body must be one JSON metadata object")
            objects = [payload]
        details: list[dict[str, Any]] = []
        for index, obj in enumerate(objects):
            problem = validate_metadata(obj, cfg.reject_every)
            if problem is not None:
                invoice_id = obj.get("invoice_id") if isinstance(obj, dict) else None
                details.append(
                    {
                        "index": index,
                        "invoice_id": invoice_id if isinstance(invoice_id, str) else None,
                        "field": problem[0],
                        "message": problem[1],
                    }
                )
        if details:
            body_out = json.dumps({"error": "invalid object(s)", "details": details}).encode()
            return _Outcome(cfg.refuse_status, body_out)
        invoice_ids = [str(obj["invoice_id"]) for obj in objects]
        lost = state.accept(path, self.headers.get("Idempotency-Key"), invoice_ids,
                            self.headers.get("traceparent"))
        return _Outcome(202, drop=lost == "dropped", reset=lost == "reset")

    def _finish_api(self, outcome: _Outcome) -> None:
        verdict, self._verdict = self._verdict, None
        fields = self._state.ratelimit_fields(verdict)
        if fields:
            outcome = dataclasses.replace(outcome, headers=outcome.headers + fields)
        if outcome.drop:  # already counted as accepted/"dropped"
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if outcome.reset:  # already counted as accepted/"reset": part of the answer, RST
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 202 Accepted\r\nContent-Le")
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.rfile.close()  # the socket closes only once its files are closed
                self.wfile.close()
                self.connection.close()  # with linger 0: a TCP reset, not a FIN
            return
        self._send(outcome, count=outcome.status != 202)  # 202s are counted in accept()

    def _send(self, outcome: _Outcome, *, count: bool) -> None:
        if count:
            self._state.count(str(outcome.status))
        try:
            self.send_response(outcome.status)
            for name, value in outcome.headers:
                self.send_header(name, value)
            if outcome.body:
                self.send_header("Content-Type", "application/json")
            if outcome.status not in (204, 304):  # neither may carry a Content-Length
                self.send_header("Content-Length", str(len(outcome.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if outcome.body:
                self.wfile.write(outcome.body)
        except OSError:
            self.close_connection = True


# ------------------------------------------------------------------------ public API


class Ms4Sim:
    """A running (after :meth:`start`) MS4 simulator. Use as a context manager."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self._state = _SimState(self.config)
        self._server: _SimHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Ms4Sim:
        if self._server is not None:
            raise RuntimeError("ms4-sim already started")
        server = _SimHTTPServer((self.config.host, self.config.port), self._state)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ms4-sim:{server.server_port}",
            daemon=True,
        )
        self._server = server
        self._thread = thread
        thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("ms4-sim not started")
        return self._server.server_port

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Same JSON as ``GET /stats``."""
        return self._state.snapshot()

    def accepted_ids(self) -> set[str]:
        with self._state.lock:
            return set(self._state.accepted_ids)

    def accepted_requests(self) -> list[AcceptedRequest]:
        with self._state.lock:
            return list(self._state.accepted)

    def accepted_idempotency_keys(self) -> list[str | None]:
        """Idempotency-Key of each accepted request, in acceptance order (None if absent)."""
        with self._state.lock:
            return [req.idempotency_key for req in self._state.accepted]

    def max_in_window(self, window: float | None = None) -> int:
        """Max number of requests that passed the rate limiter in any sliding window."""
        return self._state.max_in_window(self.config.window if window is None else window)

    def accepted_list(self) -> list[dict[str, Any]]:
        """Same JSON as ``GET /accepted``."""
        return self._state.accepted_list()

    def control(self, **changes: Any) -> dict[str, Any]:
        """Same as ``POST /_control``: change runtime settings at once (ValueError if bad)."""
        return self._state.control(changes)

    def reset(self) -> None:
        self._state.reset()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = None
        self._thread = None
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Ms4Sim:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------------------------- CLI


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="ms4-sim", usage="%(prog)s [options] [-- COMMAND ...]",
        description="Contract-faithful MS4 simulator. With '-- COMMAND ...' it serves while "
                    "COMMAND runs (with $MS4_SIM_URL set, and $MS1_MS4_API_KEY defaulting to "
                    "the sim's key), then stops and exits with COMMAND's status.")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 = pick a free port")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MS4_SIM_API_KEY", d.api_key),
        help="expected X-API-Key (default: $MS4_SIM_API_KEY or 'sim-key')",
    )
    p.add_argument("--rate-limit", type=int, default=d.rate_limit, help="0 = unlimited")
    p.add_argument("--window", type=float, default=d.window,
                   help="the limit's window, seconds")
    p.add_argument("--limiter", choices=SHAPES, default=d.limiter,
                   help="how the limit is counted: an exact sliding log (default), HAProxy's "
                        "sliding counter, a fixed window, a token bucket or nginx's leaky "
                        "bucket (limit_req)")
    p.add_argument("--burst", type=int, default=d.burst,
                   help="token-bucket capacity (default: --rate-limit) or leaky-bucket burst "
                        "(default: 0, as limit_req without burst)")
    p.add_argument("--count-denied", action="store_true",
                   help="count refused requests too (HAProxy tracks before it denies)")
    p.add_argument("--ratelimit-headers", choices=RATELIMIT_HEADERS,
                   default=d.ratelimit_headers,
                   help="RateLimit header fields on every answer: none, draft "
                        "(RateLimit-Policy + RateLimit) or x-ratelimit (X-RateLimit-*)")
    p.add_argument("--count-at", choices=COUNT_AT, default=d.count_at,
                   help="when the rate limit counts a request: as it arrives (default; over "
                        "the limit: 429 at once) or as it is answered (after --latency)")
    p.add_argument("--count-late", type=float, default=d.count_late,
                   help="with --count-at arrival: in every other spell of --count-late-spell "
                        "seconds, count each request this many seconds after it arrived (an "
                        "MS4 reading requests late while loaded); 0 = off")
    p.add_argument("--count-late-spell", type=float, default=d.count_late_spell,
                   help="seconds of each spell of --count-late (late, on time, late, ...)")
    p.add_argument("--latency", type=float, default=d.latency, help="seconds per request")
    p.add_argument("--fail-500", type=_probability, default=d.fail_500)
    p.add_argument("--fail-429", type=_probability, default=d.fail_429)
    p.add_argument("--fail-401", type=_probability, default=d.fail_401)
    p.add_argument("--drop", type=_probability, default=d.drop,
                   help="probability an accepted request's connection is closed unanswered")
    p.add_argument("--reset", type=_probability, default=d.reset,
                   help="probability an accepted request's answer is cut by a TCP reset")
    p.add_argument("--retry-after", type=float, default=d.retry_after,
                   help="seconds an injected 429 asks to wait")
    p.add_argument("--retry-after-form", choices=RETRY_AFTER_FORMS, default=d.retry_after_form,
                   help="Retry-After of 429s: delay-seconds, an HTTP-date, or none (as "
                        "nginx and HAProxy send them)")
    p.add_argument("--reject-every", type=int, default=d.reject_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--answer-status", type=int, default=d.answer_status,
                   help="answer every API request with this status (200..599 but 202; "
                        "0 = off); POST /_control {\"answer_status\": 0} ends it")
    p.add_argument("--refuse-status", type=int, choices=REFUSE_STATUSES,
                   default=d.refuse_status, help="status of an answer refusing objects")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, command = arguments[:cut], arguments[cut + 1:]
    args = parser.parse_args(arguments)
    try:
        config = SimConfig(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(SimConfig)})
    except ValueError as exc:
        parser.error(str(exc))
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    sim = Ms4Sim(config)
    try:
        try:
            sim.start()
        except OSError as exc:
            print(f"ms4-sim: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
            return 1
        print(f"ms4-sim listening on {sim.url}", flush=True)
        if command:
            status = _run_command(command, sim, stop_requested)
        else:
            while not stop_requested.wait(0.2):
                pass
            status = 0
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"ms4-sim stats: {json.dumps(sim.stats(), sort_keys=True)}", flush=True)
    return status


def _run_command(command: list[str], sim: Ms4Sim, stop_requested: threading.Event) -> int:
    """Run ``command`` against the sim (``$MS4_SIM_URL``; ``$MS1_MS4_API_KEY`` defaults to the
    sim's key), stop when it ends, and return its exit status."""
    env = dict(os.environ)
    env["MS4_SIM_URL"] = sim.url
    env.setdefault("MS1_MS4_API_KEY", sim.config.api_key)
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"ms4-sim: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    while child.poll() is None:
        if stop_requested.wait(0.1):
            child.send_signal(signal.SIGTERM)
            stop_requested.clear()
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
