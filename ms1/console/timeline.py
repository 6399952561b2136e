"""The console's search and timeline: one invoice's or e-mail's history, read from the
invoice ledger (:class:`ms1.pipeline.ledger.Ledger`), as the page and ``/api/trace`` show it."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from ms1.errors import Ms1Error
from ms1.pipeline.ledger import Ledger, Trace

log = logging.getLogger("ms1.console")

#: longest id searched (longer: 400, nothing read)
MAX_ID = 512
#: ids of an event listed on the page (the rest are counted)
SHOWN_IDS = 200
#: the ledger switched off
LEDGER_OFF = "the ledger is off ([ledger] backend = off): nothing to trace"
#: what each outcome (:attr:`ms1.pipeline.ledger.Trace.outcome`) means
OUTCOME_TEXT = {
    "accepted": "MS4 accepted it (202).",
    "dead_lettered": "MS4 refused it (or it was delivered too many times): a dead letter.",
    "rejected": "The processor refused the e-mail: a dead letter, never sent to MS4.",
    "pending": "Neither accepted nor refused yet: waiting to be sent, or being sent.",
}


@dataclass(frozen=True)
class Lookup:
    """The answer to a search: its HTTP status, what went wrong (None: nothing), and the
    trace found."""

    id: str
    status: int
    error: str | None = None
    trace: Trace | None = None
    retention_days: float | None = None

    @property
    def an_invoice(self) -> bool:
        """Whether the id is an invoice id (else a message id) of the trace found."""
        return self.trace is not None and any(self.id in event.invoice_ids
                                              for event in self.trace.events)


def days(retention: float) -> str:
    """``retention`` days as ``trace`` prints them (``30``, ``0.5``)."""
    return f"{retention:g}"


def look_up(ledger: Ledger | None, raw: str) -> Lookup:
    """Search ``raw`` (stripped): 200 with the trace, 200 without for no id, 400 for an id
    over :data:`MAX_ID`, 404 for the ledger off or the id unknown, 503 when the store
    fails (logged, the id left out)."""
    id = raw.strip()
    if len(id) > MAX_ID:
        return Lookup(id[:MAX_ID], 400, f"id longer than {MAX_ID} characters")
    if ledger is None:
        return Lookup(id, 404, LEDGER_OFF)
    retention = ledger.retention_days
    if not id:
        return Lookup(id, 200, retention_days=retention)
    try:
        found = ledger.trace(id)
    except Ms1Error as exc:
        text = str(exc)
        log.warning("console: reading the ledger failed: %s",
                    text.replace(repr(id[:80]), "(the id)").replace(id, "(the id)"))
        return Lookup(id, 503, f"the ledger cannot be read: {text}", retention_days=retention)
    if found is None:
        return Lookup(id, 404, f"{id}: not found (retention {days(retention)} days)",
                      retention_days=retention)
    return Lookup(id, 200, trace=found, retention_days=retention)


def iso(at: float) -> str:
    """``at`` (``time.time()``) in UTC, ISO 8601 to the millisecond."""
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def as_json(found: Lookup) -> dict[str, Any]:
    """The body of ``/api/trace``: ``trace --json``'s, with ``retention_days``, and
    ``error`` when there is one."""
    body: dict[str, Any] = {"id": found.id}
    if found.trace is not None:
        body.update(found=True, outcome=found.trace.outcome,
                    events=[e.as_dict() for e in found.trace.events])
    elif found.status == 404 and found.retention_days is not None:
        body["found"] = False
    if found.retention_days is not None:
        body["retention_days"] = found.retention_days
    if found.error is not None:
        body["error"] = found.error
    return body


__all__ = ["LEDGER_OFF", "MAX_ID", "OUTCOME_TEXT", "SHOWN_IDS", "Lookup", "as_json", "days",
           "iso", "look_up"]
