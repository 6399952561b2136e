"""The fleet-wide overview: one plain, JSON-able structure that the web console and
``ms1-service top`` both render, so they always show the same numbers.

:func:`collect` is pure: it adds up the instances' snapshots (:mod:`ms1.ops.fleet`), reads the
streams' descriptions (``Source.describe()``, ``QueueBackend.describe()``, as ``status``
prints them) and a dead-letter summary (:func:`letter_summary`), and works out the
backlog per stream and how long it takes to drain at MS4's ceiling (:class:`Ceiling`: one
request per batch of ``max_items``, the rule ``status`` has always used). :func:`gather`
does the reading (I/O, each part's error kept in ``errors``) and calls it.

More: docs/internals.md, ``ms1.ops.overview``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ms1.errors import Ms1Error
from ms1.pipeline.sending.pacer import HELD_CAUSES
from ms1.redaction import redact

if TYPE_CHECKING:
    from ms1.model import DeadLetter
    from ms1.ops.fleet import Fleet
    from ms1.pipeline.deadletters import DeadLetterStore
    from ms1.pipeline.outbound import QueueBackend
    from ms1.pipeline.source import Source

OVERVIEW_SCHEMA = 1
#: dead letters :func:`summarize_dead_letters` reads at most for its counts by stage/reason
SUMMARY_SCAN = 10_000
#: letters :class:`LetterCounts` reads at a time when it reads the new ones
NEW_LETTERS_PAGE = 500
#: dead-letter stages, in the order they are shown
STAGES = ("processor", "batching", "ms4", "source", "queue")
#: what each held-back cause is called on screen
CAUSE_NAMES = {
    "rate_budget": "rate budget", "429_pause": "429 pause", "401_spell": "401/403 spell",
    "stop": "stopped (configuration)", "breaker_open": "breaker open",
    "limiter_down": "rate limiter down", "empty_queue": "nothing to send",
}


@dataclass(frozen=True)
class Ceiling:
    """MS4's ceiling as ms1 is configured for it: ``requests_per_minute`` requests in any
    ``rate_window`` seconds (every instance together), one batch of up to ``max_items``
    invoices per request."""

    requests_per_minute: int = 120
    rate_window: float = 60.0
    max_items: int = 50

    @property
    def requests_per_s(self) -> float:
        return self.requests_per_minute / self.rate_window

    @property
    def invoices_per_s(self) -> float:
        """In full batches."""
        return self.requests_per_s * self.max_items

    @property
    def text(self) -> str:
        return f"{self.requests_per_minute} requests per {self.rate_window:g} s"

    def drain_seconds(self, batches: int) -> float:
        """Seconds ``batches`` requests take at the ceiling."""
        return batches * self.rate_window / self.requests_per_minute

    def batches_for(self, invoices: int) -> int:
        """Requests ``invoices`` not yet batched take, in full batches."""
        return math.ceil(invoices / self.max_items) if invoices > 0 else 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests_per_minute": self.requests_per_minute,
                "rate_window_s": self.rate_window, "max_items": self.max_items,
                "requests_per_s": round(self.requests_per_s, 4),
                "invoices_per_s": round(self.invoices_per_s, 2), "text": self.text}


def queued_batches(queue: Mapping[str, Any]) -> int | None:
    """Batches an outbound queue's ``describe()`` says it holds: its stream ``length``, or
    ``ready + in_flight``; None when it says neither (an error)."""
    batches = queue.get("length")
    if isinstance(batches, int):
        return batches
    if isinstance(queue.get("ready"), int):
        return int(queue["ready"]) + int(queue.get("in_flight") or 0)
    return None


def inbound_backlog(source: Mapping[str, Any]) -> int | None:
    """E-mails an inbound stream's ``describe()`` says are not done yet: ``lag + pending``
    when Redis can count the lag, else the stream's ``length`` (ms1 deletes what it has
    finished with); None when the source says nothing (files, memory) or failed."""
    lag, pending = source.get("lag"), source.get("pending")
    if isinstance(lag, int) and isinstance(pending, int):
        return lag + pending
    length = source.get("length")
    return length if isinstance(length, int) else None


def sending(ceiling: Ceiling, queue: Mapping[str, Any]) -> dict[str, Any]:
    """What ``status`` says of sending without a running instance: MS4's ceiling, and when
    the outbound queue's backlog will have drained at it (one request per batch)."""
    info: dict[str, Any] = {
        "ceiling": ceiling.text,
        "ceiling_invoices_per_minute": round(ceiling.invoices_per_s * 60),
    }
    batches = queued_batches(queue)
    if batches is not None:
        info["backlog_batches"] = batches
        invoices = queue.get("invoices")
        info["backlog_invoices"] = invoices if isinstance(invoices, int) \
            else f"at most {batches * ceiling.max_items}"
        info["drained_in_s"] = round(ceiling.drain_seconds(batches), 1)
    return info


def reason_prefix(reason: str) -> str:
    """What groups dead letters by reason: the text before the first colon (a processor
    reason's field path, ``MS4 answered 400``...), at most 60 characters."""
    return reason.split(":", 1)[0].strip()[:60] or "?"


@dataclass
class _Tally:
    """Counts of dead letters by stage and by reason prefix, in the store's order."""

    stages: Counter[str]
    reasons: Counter[str]
    scanned: int = 0
    last_id: str | None = None  # the last letter counted

    @classmethod
    def of(cls, letters: Iterable[DeadLetter]) -> _Tally:
        tally = cls(Counter(), Counter())
        tally.add(letters)
        return tally

    def add(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            self.scanned += 1
            self.stages[letter.stage] += 1
            self.reasons[reason_prefix(letter.reason)] += 1
            self.last_id = letter.id

    def summary(self, count: int | None) -> dict[str, Any]:
        total = self.scanned if count is None else count
        ordered = {stage: self.stages[stage] for stage in STAGES if self.stages[stage]}
        ordered.update({s: n for s, n in sorted(self.stages.items()) if s not in ordered})
        return {"count": total, "by_stage": ordered,
                "by_reason": [[reason, n] for reason, n in self.reasons.most_common(12)],
                "scanned": self.scanned, "complete": self.scanned >= total}


def letter_summary(letters: Iterable[DeadLetter], count: int | None = None) -> dict[str, Any]:
    """Counts by stage and by reason prefix of ``letters``; ``count`` is how many the store
    holds (``complete`` says whether ``letters`` were all of them)."""
    return _Tally.of(letters).summary(count)


def summarize_dead_letters(store: DeadLetterStore, limit: int = SUMMARY_SCAN
                           ) -> dict[str, Any]:
    """:func:`letter_summary` of the oldest ``limit`` letters of ``store`` (paged with
    ``scan``) and its count. Raises the store's Ms1Error."""
    count = store.count()
    return letter_summary(store.iterate(limit=limit), count)


class LetterCounts:
    """:func:`summarize_dead_letters` of ``store`` for callers that ask every second (the
    console, ``top``), without reading up to ``limit`` letters with their payloads each
    time letters come in. The count (``XLEN``: one cheap call) is read at every call;
    the letters only

    * when the count grew and the summary held every letter: only the new ones, read
      after the last one counted (``scan(after)``) — and all again if they are not
      exactly the letters the count gained (some were removed meanwhile);
    * when the count grew and the summary held the oldest ``limit`` letters only: all
      again once the summary is ``settle`` seconds old (the new letters are not in it:
      it is the oldest ones' summary, ``complete`` false, with the count as it is now);
    * when the count fell (a replay, a purge), or ``max_age`` seconds after the last full
      read: all again.

    Thread-safe (two callers may read at once; the later result is kept)."""

    def __init__(self, store: DeadLetterStore, *, limit: int = SUMMARY_SCAN,
                 max_age: float = 60.0, settle: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.limit = limit
        self.max_age = max_age
        self.settle = settle
        self._clock = clock
        self._lock = threading.Lock()
        self._tally: _Tally | None = None
        self._count = 0  # the count the tally was taken at
        self._at = 0.0  # when the letters were last read whole

    def read(self) -> dict[str, Any]:
        """The summary (raises the store's Ms1Error)."""
        count = self.store.count()
        with self._lock:
            tally, counted, at = self._tally, self._count, self._at
        age = self._clock() - at
        if tally is not None and age < self.max_age and count >= counted:
            if count == counted:
                return tally.summary(count)
            if tally.scanned < counted:  # the oldest ``limit`` only: they stay the same
                if age < self.settle:
                    return tally.summary(count)
            else:
                grown = self._with_new(tally, count - counted)
                if grown is not None:
                    with self._lock:
                        if self._tally is tally:  # (else another caller read meanwhile)
                            self._tally, self._count = grown, count
                    return grown.summary(count)
        fresh = _Tally.of(self.store.iterate(limit=self.limit))
        with self._lock:
            self._tally, self._count, self._at = fresh, count, self._clock()
        return fresh.summary(count)

    def _with_new(self, tally: _Tally, gained: int) -> _Tally | None:
        """``tally`` and the letters after its last one, read page by page, if they are
        exactly the ``gained`` letters the count gained and the summary stays within
        ``limit``; else None (read them all again)."""
        if tally.scanned + gained > self.limit:
            return None
        grown = _Tally(tally.stages.copy(), tally.reasons.copy(), tally.scanned,
                       tally.last_id)
        read = 0  # (one more than gained is asked for: a letter beyond says "not only new")
        while read <= gained:
            want = min(NEW_LETTERS_PAGE, gained + 1 - read)
            page = self.store.scan(grown.last_id, want)
            grown.add(page)
            read += len(page)
            if len(page) < want:
                break
        return grown if read == gained else None


def _number(value: object) -> float:
    """A figure from a snapshot (read from Redis): 0 unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:  # an int JSON allows and no float holds
        return 0.0
    return number if math.isfinite(number) else 0.0


def _maybe_number(value: object) -> float | None:
    """A figure a snapshot may leave out: None unless it is a finite number."""
    number = _number(value)
    return number if number or value == 0 else None


def _part(snapshot: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A part of a snapshot (read from Redis): empty unless it is a mapping."""
    value = snapshot.get(name)
    return value if isinstance(value, Mapping) else {}


def _holding(snapshot: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What holds this instance's senders back now, as ``(cause, detail)``."""
    held = _part(snapshot, "held")
    found = []
    stop = held.get("stop")
    if stop:
        cause = "401_spell" if held.get("auth_blocked") else "stop"
        found.append((cause, str(stop)))
    if held.get("breaker") == "open":
        found.append(("breaker_open", str(held.get("reason") or "circuit breaker open")))
    pause = _number(held.get("pause_429_s"))
    if pause > 0:
        found.append(("429_pause", f"paused by a 429 ({pause:.0f} s left)"))
    return found


def _pace_text(pace: Mapping[str, Any]) -> str | None:
    """``burst 12, 3.1 % spacing; MS4 announces 120 per 60 s, 37 left (draft)`` from a
    snapshot's ``pace`` (any field missing or of the wrong type is left out)."""
    parts = []
    burst, spacing, announced = pace.get("burst"), pace.get("spacing"), pace.get("announced")
    if isinstance(burst, int | float) and not isinstance(burst, bool):
        parts.append(f"burst {burst:.0f}")
    if isinstance(spacing, int | float) and not isinstance(spacing, bool):
        parts.append(f"{spacing:.1%} spacing")
    text = ", ".join(parts)
    if isinstance(announced, str) and announced:
        text = f"{text}; MS4 announces {announced}" if text else f"MS4 announces {announced}"
    return text or None


def collect(snapshots: Sequence[Mapping[str, Any]], *, ceiling: Ceiling,
            inbound: Mapping[str, Any] | None = None,
            outbound: Mapping[str, Any] | None = None,
            dead_letters: Mapping[str, Any] | None = None,
            errors: Mapping[str, str] | None = None, now: float | None = None
            ) -> dict[str, Any]:
    """The overview (see the module text) of these snapshots and readings. Pure: the same
    inputs always give the same structure (``now`` defaults to ``time.time()``)."""
    now = time.time() if now is None else now
    rows = []
    statuses: Counter[str] = Counter()
    recent = dict.fromkeys(HELD_CAUSES, 0.0)
    seconds = dict.fromkeys(HELD_CAUSES, 0.0)
    holding: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    totals: dict[str, Any] = {"instances": 0, "healthy": 0, "emails_in_per_s": 0.0,
              "invoices_delivered_per_s": 0.0, "in_flight": 0, "concurrency_target": 0,
              "emails_read": 0, "invoices_delivered": 0, "dead_lettered": 0, "requests": 0}
    for snap in sorted(snapshots, key=lambda s: str(s.get("id", ""))):
        counters = _part(snap, "counters")
        rates = _part(snap, "rates")
        health = _part(snap, "health")
        own: Counter[str] = Counter()
        for key, value in counters.items():
            if key.startswith("responses_") and isinstance(value, int):
                own[key.removeprefix("responses_")] += value
        statuses.update(own)
        for cause in HELD_CAUSES:
            recent[cause] += _number(_part(snap, "held_recent").get(cause))
            seconds[cause] += _number(_part(snap, "held_seconds").get(cause))
        held_now = _holding(snap)
        for cause, detail in held_now:
            holding.setdefault(cause, []).append(str(snap.get("id", "?")))
            details.setdefault(cause, detail)
        row: dict[str, Any] = {
            "id": str(snap.get("id", "?")), "label": snap.get("label") or "",
            "host": snap.get("host"), "pid": snap.get("pid"),
            "version": snap.get("version"),
            "age_s": round(max(0.0, now - _number(snap.get("updated"))), 1),
            "uptime_s": round(max(0.0, now - _number(snap.get("started"))), 1),
            "emails_in_per_s": _number(rates.get("emails_in_per_s")),
            "invoices_delivered_per_s": _number(rates.get("invoices_delivered_per_s")),
            "in_flight": int(_number(snap.get("in_flight"))),
            "concurrency_target": _maybe_number(snap.get("concurrency_target")),
            "latency_s": _maybe_number(snap.get("latency_s")),
            "emails_read": int(_number(counters.get("emails_read"))),
            "invoices_delivered": int(_number(counters.get("invoices_delivered"))),
            "dead_lettered": int(_number(counters.get("dead_lettered"))),
            "requests": sum(own.values()),
            "holding": "; ".join(detail for _, detail in held_now) or None,
            "breaker": _part(snap, "held").get("breaker"),
            "pace": _pace_text(_part(snap, "pace")),
            "healthy": bool(health.get("ok", False)),
            "problem": health.get("problem"),
        }
        rows.append(row)
        totals["instances"] += 1
        totals["healthy"] += 1 if row["healthy"] else 0
        for key in ("emails_in_per_s", "invoices_delivered_per_s", "in_flight",
                    "emails_read", "invoices_delivered", "dead_lettered", "requests"):
            totals[key] += row[key]
        totals["concurrency_target"] += int(_number(row["concurrency_target"]))
    totals["emails_in_per_s"] = round(totals["emails_in_per_s"], 2)
    totals["invoices_delivered_per_s"] = round(totals["invoices_delivered_per_s"], 2)
    totals["requests_by_status"] = dict(sorted(statuses.items()))

    streams = []
    drain_total = 0.0
    drain_known = False
    if inbound is not None and "error" not in inbound:
        backlog = inbound_backlog(inbound)
        if backlog is not None:
            batches = ceiling.batches_for(backlog)
            drain = ceiling.drain_seconds(batches)
            streams.append({"name": "inbound", "unit": "e-mails", "backlog": backlog,
                            "batches": batches, "drain_s": round(drain, 1),
                            "detail": _plain(inbound)})
            drain_total += drain
            drain_known = True
    if outbound is not None and "error" not in outbound:
        batches_out = queued_batches(outbound)
        if batches_out is not None:
            drain = ceiling.drain_seconds(batches_out)
            invoices = outbound.get("invoices")
            streams.append({"name": "outbound", "unit": "batches", "backlog": batches_out,
                            "batches": batches_out,
                            "invoices": invoices if isinstance(invoices, int) else None,
                            "drain_s": round(drain, 1), "detail": _plain(outbound)})
            drain_total += drain
            drain_known = True
    found_errors = {key: redact(str(text)) for key, text in (errors or {}).items()}
    for key, part in (("inbound", inbound), ("outbound", outbound),
                      ("dead_letters", dead_letters)):
        if part is not None and "error" in part:
            found_errors.setdefault(key, redact(str(part["error"])))
    return {
        "schema": OVERVIEW_SCHEMA, "at": now, "ceiling": ceiling.as_dict(), "totals": totals,
        "streams": streams, "drain_s": round(drain_total, 1) if drain_known else None,
        "held": {"now": [{"cause": cause, "name": CAUSE_NAMES.get(cause, cause),
                          "instances": ids, "detail": details[cause]}
                         for cause, ids in sorted(holding.items())],
                 "recent": {cause: round(value, 3) for cause, value in recent.items()},
                 "seconds": {cause: round(value, 3) for cause, value in seconds.items()}},
        "dead_letters": None if dead_letters is None or "error" in dead_letters
        else dict(dead_letters),
        "instances": rows,
        "errors": found_errors,
    }


def _plain(info: Mapping[str, Any]) -> dict[str, Any]:
    """A describe() dict as JSON-able values (consumers kept as they are)."""
    return {str(k): v if isinstance(v, str | int | float | bool | list | type(None))
            else str(v) for k, v in info.items()}


def _read(what: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return what()
    except Ms1Error as exc:
        return {"error": str(exc)}


def gather(fleet: Fleet | None, *, ceiling: Ceiling, source: Source | None = None,
           queue: QueueBackend | None = None,
           dead_letters: DeadLetterStore | LetterCounts | None = None,
           letters_scan: int = SUMMARY_SCAN, now: float | None = None) -> dict[str, Any]:
    """Read the fleet and the parts given (each failure goes to ``errors``, the rest is
    shown) and :func:`collect` them. ``dead_letters``: a store (summarised at each call),
    or a :class:`LetterCounts` (summarised when its count changed: for callers that
    gather every second). Does I/O (Redis): call it off any request path that must not
    wait, or bound it (the console caches it)."""
    errors: dict[str, str] = {}
    snapshots: list[dict[str, Any]] = []
    if fleet is not None:
        try:
            snapshots = fleet.snapshots()
        except Ms1Error as exc:
            errors["fleet"] = str(exc)
    inbound = _read(source.describe) if source is not None else None
    outbound = _read(queue.describe) if queue is not None else None
    letters = None
    if isinstance(dead_letters, LetterCounts):
        letters = _read(dead_letters.read)
    elif dead_letters is not None:
        store = dead_letters
        letters = _read(lambda: summarize_dead_letters(store, letters_scan))
    return collect(snapshots, ceiling=ceiling, inbound=inbound, outbound=outbound,
                   dead_letters=letters, errors=errors, now=now)


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 or seconds == 0 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_rate(value: float) -> str:
    """A per-second rate: ``0``, ``0.35``, ``12.4``, ``1,250``."""
    if value == 0:
        return "0"
    if value < 1:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


__all__ = ["CAUSE_NAMES", "OVERVIEW_SCHEMA", "STAGES", "SUMMARY_SCAN", "Ceiling", "LetterCounts",
           "collect",
           "format_rate", "format_seconds", "gather", "inbound_backlog", "letter_summary",
           "queued_batches", "reason_prefix", "sending", "summarize_dead_letters"]
