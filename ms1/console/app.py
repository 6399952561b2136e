"""The console's web application (Flask, Jinja2 templates in ``templates/``).

Pages (server-rendered; ``static/console.js`` only refreshes the overview):

More: docs/internals.md, ``ms1.console.app``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, jsonify, render_template, request

from ms1.config import Secret
from ms1.console.throttle import Throttle
from ms1.errors import Ms1Error
from ms1.model import DeadLetter
from ms1.ops import overview as ov
from ms1.ops.fleet import RATE_WINDOW, SNAPSHOT_TTL
from ms1.ops.logs import escape_controls
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.replay import ReplayResult, replay

from . import timeline
from .browse import PAGE, FilterError, LetterFilter, find, matching_ids

log = logging.getLogger("ms1.console")

#: header carrying the admin token (instead of the form field ``token``)
TOKEN_HEADER = "X-Admin-Token"
#: ids replayed per call to :func:`ms1.pipeline.replay.replay`
REPLAY_CHUNK = 1000
#: paths whose requests are logged at DEBUG (the overview's refreshes, static files)
_QUIET = ("/overview.part", "/api/overview", "/static/")
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class OverviewCache:
    """The overview, built at most once per ``max_age`` seconds, by one thread at a time;
    a request waits at most ``wait`` seconds for a fresh one, else gets the last (marked
    ``stale_s``). Building reads Redis: a frozen Redis holds one builder, not every page."""

    def __init__(self, build: Callable[[], dict[str, Any]], *, max_age: float = 1.0,
                 wait: float = 2.0) -> None:
        self._build = build
        self.max_age = max_age
        self.wait = wait
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._building = False

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is not None and time.monotonic() - self._at < self.max_age:
                return self._value
            if not self._building:
                self._building = True
                threading.Thread(target=self._refresh, name="console-overview",
                                 daemon=True).start()
            self._done.wait_for(lambda: not self._building, self.wait)
            if self._value is None:
                return {"errors": {"overview": f"not read within {self.wait:g} s"},
                        "totals": {}, "streams": [], "instances": [], "held": {"now": []},
                        "dead_letters": None, "drain_s": None, "ceiling": {}}
            value = self._value
            age = time.monotonic() - self._at
        return value if age < self.max_age + self.wait else {**value, "stale_s": round(age)}

    def _refresh(self) -> None:
        try:
            value = self._build()
        except Exception:
            log.exception("console: building the overview failed")
            value = None
        with self._lock:
            if value is not None:
                self._value, self._at = value, time.monotonic()
            self._building = False
            self._done.notify_all()


@dataclass
class ConsoleContext:
    """What the console reads and changes: the overview, the dead letters, the queue a
    replay puts batches on, the batch limits, the admin token (None: read-only), the
    hosts and origins it answers for, and the invoice ledger (None: off)."""

    overview: Callable[[], dict[str, Any]]
    store: DeadLetterStore
    queue: QueueBackend
    max_items: int
    max_bytes: int
    token: Secret | None
    trusted_hosts: Sequence[str] | None
    origins: Sequence[str] = ()
    refresh_s: float = 2.0
    replays: list[ReplayResult] = field(default_factory=list)
    ledger: Ledger | None = None


def _fmt_time(at: float | None) -> str:
    if not at:
        return "-"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _payload_text(letter: DeadLetter) -> tuple[str, str]:
    """``(kind, text)`` of a letter's payload: pretty JSON, text, or base64."""
    try:
        text = letter.payload.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(letter.payload).decode("ascii")
    try:
        return "json", json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return "text", text


def _answer_text(answer: str | None) -> str:
    """MS4's answer as kept (``400 {...}``: the status, then the body), its JSON body
    pretty-printed."""
    if not answer:
        return ""
    status, _, body = answer.partition(" ")
    head, text = (f"{status}\n", body) if status.isdigit() and len(status) == 3 \
        else ("", answer)
    try:
        return head + json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return answer


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def create_app(ctx: ConsoleContext) -> Flask:
    """The console's Flask application over ``ctx``."""
    app = Flask(__name__)
    app.config.update(TRUSTED_HOSTS=list(ctx.trusted_hosts) if ctx.trusted_hosts else None,
                      MAX_CONTENT_LENGTH=1024 * 1024, MAX_FORM_PARTS=20_000,
                      JSON_SORT_KEYS=False)
    app.jinja_env.filters.update(
        seconds=ov.format_seconds, rate=ov.format_rate, when=_fmt_time,
        cause=lambda cause: ov.CAUSE_NAMES.get(cause, cause), controls=escape_controls,
        iso=timeline.iso, days=timeline.days)
    app.jinja_env.globals.update(STAGES=ov.STAGES, CAUSE_NAMES=ov.CAUSE_NAMES,
                                 RATE_WINDOW=RATE_WINDOW, SNAPSHOT_TTL=SNAPSHOT_TTL,
                                 MAX_ID=timeline.MAX_ID, SHOWN_IDS=timeline.SHOWN_IDS,
                                 OUTCOME_TEXT=timeline.OUTCOME_TEXT)
    origins = {origin.lower() for origin in ctx.origins}
    throttle = Throttle()

    @app.before_request
    def started() -> None:
        g.started = time.monotonic()

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        path = request.path
        took = (time.monotonic() - g.get("started", time.monotonic())) * 1000
        level = logging.DEBUG if (path.startswith(_QUIET) and response.status_code < 400) \
            or g.get("quiet") else logging.INFO
        log.log(level, "console: %s %s %s %d %s B %.0f ms", request.remote_addr or "-",
                request.method, path[:200], response.status_code,
                response.calculate_content_length() or "-", took)
        return response

    def refused(why: str) -> Response:
        log.warning("console: %s %s refused from %s: %s", request.method, request.path[:200],
                    request.remote_addr or "-", why)
        return Response(render_template("refused.html", why=why), status=403)

    def same_origin() -> str | None:
        """None if the request comes from the console's own origin (or a configured one),
        else why not."""
        own = f"{request.scheme}://{request.host}".lower()
        sent = request.headers.get("Origin")
        if sent is not None:
            origin = sent.strip().lower()
            if origin == own or origin in origins:
                return None
            return f"cross-origin request (Origin {sent[:100]!r})"
        referer = request.headers.get("Referer")
        if referer:
            origin = _origin_of(referer) or ""
            if origin == own or origin in origins:
                return None
            return "cross-origin request (Referer from another origin)"
        return "no Origin or Referer header: the request's origin cannot be checked"

    def token_ok() -> str | None:
        """None if the admin token came with the request, else why not."""
        if ctx.token is None:
            return ("replaying is off: no admin token is configured ([console] "
                    "admin_token_env / admin_token_file)")
        given = request.headers.get(TOKEN_HEADER) or request.form.get("token", "")
        if not given:
            return "no admin token given"
        if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                   ctx.token.reveal().encode("utf-8")):
            return "wrong admin token"
        return None

    @app.get("/")
    def overview_page() -> str:
        return render_template("overview.html", o=ctx.overview(), refresh=ctx.refresh_s)

    @app.get("/overview.part")
    def overview_part() -> str:
        return render_template("_overview.html", o=ctx.overview())

    @app.get("/api/overview")
    def overview_json() -> Response:
        return jsonify(ctx.overview())

    @app.get("/dead-letters")
    def letters_page() -> tuple[str, int]:
        try:
            flt = LetterFilter.from_args(request.args)
        except FilterError as exc:
            return render_template("dead_letters.html", flt=LetterFilter(), error=str(exc),
                                   page=None, count=None, after=None,
                                   replay_on=ctx.token is not None), 400
        after = request.args.get("after") or None
        try:
            page = find(ctx.store, flt, after, PAGE)
            count = ctx.store.count()
        except Ms1Error as exc:
            return render_template("dead_letters.html", flt=flt, error=str(exc), page=None,
                                   count=None, after=after,
                                   replay_on=ctx.token is not None), 503
        return render_template("dead_letters.html", flt=flt, error=None, page=page,
                               count=count, after=after, replay_on=ctx.token is not None), 200

    @app.get("/dead-letters/<letter_id>")
    def letter_page(letter_id: str) -> str:
        try:
            found = ctx.store.list(limit=1, ids=[letter_id])
        except Ms1Error:
            found = []
        if not found:
            abort(404)
        letter = found[0]
        kind, text = _payload_text(letter)
        return render_template("letter.html", letter=letter, payload_kind=kind,
                               payload=text, answer=_answer_text(letter.ms4_answer),
                               replay_on=ctx.token is not None)

    @app.post("/dead-letters/replay")
    def replay_letters() -> Response | tuple[str, int]:
        client = request.remote_addr or "-"
        wait = throttle.wait(client)
        if wait > 0:  # a guesser: not even looked at (logged at DEBUG, not per guess)
            g.quiet = True
            return Response(render_template("refused.html", why="too many wrong admin "
                                            f"tokens: try again in {wait:.0f} s"),
                            status=429, headers={"Retry-After": str(max(1, round(wait)))})
        why = same_origin()
        if why is None:
            why = token_ok()
            if why == "wrong admin token":
                throttle.failed(client)
            elif why is None:
                throttle.succeeded(client)
        if why is not None:
            return refused(why)
        ids: list[str] = []
        flt: LetterFilter | None = None
        replayed, batches, kept = 0, 0, []
        try:
            if request.form.get("all") == "1":
                flt = LetterFilter.from_args(request.form)
                ids = matching_ids(ctx.store, flt)
            else:
                ids = list(dict.fromkeys(request.form.getlist("id")))
            for start in range(0, len(ids), REPLAY_CHUNK):
                result = replay(ctx.store, ctx.queue, ids=ids[start:start + REPLAY_CHUNK],
                                max_items=ctx.max_items, max_bytes=ctx.max_bytes,
                                ledger=ctx.ledger)
                replayed += result.replayed
                batches += result.batches
                kept.extend(result.still_invalid)
        except FilterError as exc:
            return render_template("result.html", error=str(exc), asked=0, replayed=0,
                                   batches=0, kept=[], flt=None), 400
        except Ms1Error as exc:  # what went before is replayed: said, not hidden
            log.error("console: replay failed after %d of %d dead letters in %d batches: %s",
                      replayed, len(ids), batches, exc)
            return render_template("result.html", error=str(exc), asked=len(ids),
                                   replayed=replayed, batches=batches, kept=kept,
                                   flt=flt), 503
        log.warning("console: %s replayed %d dead letters in %d batches (%d asked, %d kept)",
                    request.remote_addr or "-", replayed, batches, len(ids), len(kept))
        return render_template("result.html", error=None, asked=len(ids), replayed=replayed,
                               batches=batches, kept=kept, flt=flt), 200

    @app.get("/trace")
    def trace_page() -> tuple[str, int]:
        found = timeline.look_up(ctx.ledger, request.args.get("id", ""))
        return render_template("trace.html", found=found), found.status

    @app.get("/api/trace")
    def trace_json() -> tuple[Response, int]:
        found = timeline.look_up(ctx.ledger, request.args.get("id", ""))
        if found.status == 200 and found.trace is None:
            return jsonify(error="give an invoice id or a message id: /api/trace?id=..."), 400
        return jsonify(timeline.as_json(found)), found.status

    @app.errorhandler(404)
    def not_found(_: Exception) -> tuple[str, int]:
        return render_template("refused.html", why="not found", title="Not found"), 404

    return app


__all__ = ["REPLAY_CHUNK", "TOKEN_HEADER", "ConsoleContext", "OverviewCache", "create_app"]
