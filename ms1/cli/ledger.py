"""The ledger's commands: ``trace ID`` (what became of an invoice or e-mail) and
``reconcile`` (every e-mail read in a period accounted for)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
import sys
import time

import pluggy

from ms1.config import Config
from ms1.errors import ConfigError
from ms1.ops.logs import escape_controls
from ms1.pipeline.ledger import Ledger, LedgerEvent
from ms1.pipeline.reconcile import Reconciliation, reconcile
from ms1.runtime import pluginmanager

EXIT_OK, EXIT_FAILED = 0, 1
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str, now: float) -> float:
    """A time given on the command line, as ``time.time()``: ``now``; a span ago
    (``90s``, ``30m``, ``24h``, ``7d``); or ISO 8601 (``2026-12-06``,
    ``2026-12-06T08:00``, with ``Z`` or an offset; none: UTC)."""
    text = text.strip()
    if text == "now":
        return now
    refused = ConfigError(f"{text[:60]!r} is not a time: give now, a span ago (90s, 30m, "
                          "24h, 7d) or ISO 8601 (2026-12-06, 2026-12-06T08:00Z)")
    ago = _AGO.match(text)
    try:
        if ago:
            at = now - float(ago.group(1)) * _UNITS[ago.group(2)]
        else:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            at = parsed.timestamp()
        time.gmtime(at)  # one the timeline can show
    except (ValueError, OverflowError, OSError):
        raise refused from None
    if not math.isfinite(at):
        raise refused
    return at


def _ledger(pm: pluggy.PluginManager, config: Config, what: str) -> Ledger:
    ledger = pluginmanager.build_ledger(pm, config)
    if ledger is None:
        raise ConfigError(f"the ledger is off ([ledger] backend = off): nothing to {what}",
                          path=config.path, section="ledger", key="backend")
    return ledger


def trace(config: Config, pm: pluggy.PluginManager, id: str, *, as_json: bool) -> int:
    """``trace ID``: what the ledger knows of an invoice or e-mail (exit 1: nothing)."""
    ledger = _ledger(pm, config, "trace")
    try:
        found = ledger.trace(id)
    finally:
        ledger.close()
    days = ledger.retention_days
    if found is None:
        if as_json:
            print(json.dumps({"id": id, "found": False, "retention_days": days}))
        else:
            print(escape_controls(f"{id}: not found (retention {days:g} days)"))
        return EXIT_FAILED
    if as_json:
        print(json.dumps({"id": id, "found": True, "outcome": found.outcome,
                          "events": [e.as_dict() for e in found.events]}))
        return EXIT_OK
    print(escape_controls(f"{id}: {found.outcome}"))
    for event in found.events:
        print(escape_controls(_event_line(event)))
    return EXIT_OK


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def _event_line(event: LedgerEvent) -> str:
    head = f"  {_when(event.at)}  {event.kind:<13}"
    if event.kind == "rejected":
        return f"{head} e-mail {', '.join(event.refs) or '-'}: {event.detail[:300]}"
    line = f"{head} batch {event.batch_id} (Idempotency-Key), {len(event.invoice_ids)} invoices"
    if event.parts:
        line += f"; {'into' if event.kind == 'split' else 'of'} {', '.join(event.parts)}"
    for n, attempt in enumerate(event.attempts, 1):
        answer = "no answer" if attempt.status is None else str(attempt.status)
        line += (f"\n      attempt {n} at {_when(attempt.at)}: {answer} in "
                 f"{attempt.latency:.3f} s ({attempt.traceparent})")
    if event.detail:
        line += f"\n      {event.detail[:300]}"
    return line


def reconcile_command(config: Config, pm: pluggy.PluginManager, *, since: str,
                      until: str | None, form: str) -> int:
    """``reconcile --since T [--until T]``: exit 0 when every e-mail read is accounted
    for, 1 when one is not (listed by id)."""
    now = time.time()
    start, end = when(since, now), when(until, now) if until else now
    if end <= start:
        raise ConfigError(f"reconcile: --until ({_when(end)}) is not after --since "
                          f"({_when(start)})")
    ledger = _ledger(pm, config, "reconcile")
    if not ledger.shared:
        ledger.close()
        raise ConfigError(f"reconcile needs a ledger every instance writes to; [ledger] "
                          f"backend {ledger.name!r} lives in one process (this command's "
                          f"would be empty)", path=config.path, section="ledger",
                          key="backend")
    queue = pluginmanager.build_queue(pm, config)
    try:
        result = reconcile(ledger, queue if queue.durable else None, start, end, now=now,
                           listed=form == "csv")  # only --csv prints each e-mail
    finally:
        queue.close()
        ledger.close()
    if form == "json":
        print(json.dumps({**result.summary(), "unexplained_emails": [
            {"email": s.email, "invoice_id": s.invoice_id, "read_at": s.read_at}
            for s in result.unexplained]}))
    elif form == "csv":
        _csv(result)
    else:
        _text(result)
    return EXIT_OK if result.balanced else EXIT_FAILED


def _csv(result: Reconciliation) -> None:
    """One row per e-mail read: what became of it (``unexplained``: held nowhere)."""
    lost = {state.email for state in result.unexplained}
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["email", "invoice_id", "read_at", "outcome"])
    for state in result.emails:
        out.writerow([state.email, state.invoice_id, _when(state.read_at),
                      "unexplained" if state.email in lost else state.outcome])


def _text(result: Reconciliation) -> None:
    summary = result.summary()
    print(f"e-mails read {_when(result.since)} .. {_when(result.until)}: {result.read}")
    for name in ("rejected", "accepted", "dead_lettered"):
        print(f"  {name.replace('_', '-'):<14}{summary[name]:>10}")
    pending = f"  {'pending':<14}{summary['pending']:>10}"
    print(pending + ("" if result.checked else
                     "  (not checked: the queue cannot list what it holds)"))
    if result.balanced:
        print("balanced: read = rejected + accepted + dead-lettered + pending")
        return
    print(f"NOT balanced: {len(result.unexplained)} e-mails pending by the ledger are in "
          "no queue (ms1-service trace ID shows each one's history):")
    for state in result.unexplained[:1000]:
        print(escape_controls(f"  {state.email}  invoice {state.invoice_id or '-'}  read "
                              f"{_when(state.read_at)}"))
    if len(result.unexplained) > 1000:
        print(f"  ... and {len(result.unexplained) - 1000} more (--csv lists every one)")


__all__ = ["reconcile_command", "trace", "when"]
