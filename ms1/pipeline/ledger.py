"""The invoice ledger (issue 24): what became of every e-mail and invoice, shared by all
instances. Written at the steps that happen anyway — a batch stored, an e-mail rejected,
a batch accepted, split, merged or dead-lettered — one write per batch outcome, before
the step that acks it (so a batch acked has its record: a crash between the two leaves
a record of an outcome that happens again, never an ack without one). Read by
``ms1-service trace`` and the console. Contract, in-memory twin; the Redis one is the
``redis`` plugin's."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

#: what an event says happened to a batch (or, ``rejected``, to one e-mail)
KINDS = ("batched", "rejected", "accepted", "split", "merged", "dead_lettered", "replayed")
#: the default of ``[ledger] retention_days``
RETENTION_DAYS = 30.0
#: what became of an e-mail so far, by the one letter a store keeps of it
OUTCOMES = {"p": "pending", "r": "rejected", "a": "accepted", "d": "dead_lettered"}
LETTERS = {outcome: letter for letter, outcome in OUTCOMES.items()}


def next_outcome(current: str | None, kind: str) -> str:
    """The outcome letter (:data:`OUTCOMES`) of an e-mail after an event of ``kind``
    named it, from ``current`` (None: the ledger knows nothing of it yet). An e-mail MS4
    accepted stays accepted (a duplicate's fate changes nothing); a dead letter or a
    refused e-mail replayed is pending again; a batch stored again (a crash re-read it, a
    split, a merge) changes nothing. ``scripts/ledger_record.lua`` says the same."""
    if kind == "accepted":
        return "a"
    if kind == "dead_lettered":
        return current if current == "a" else "d"
    if kind == "replayed":
        return current if current == "a" else "p"
    if current is not None:
        return current
    return "r" if kind == "rejected" else "p"


@dataclass(frozen=True)
class Attempt:
    """One request for a batch: when it left (``time.time()``), MS4's answer (None: none
    came) and how long it took, and the ``traceparent`` it carried."""

    at: float
    status: int | None
    latency: float
    traceparent: str = ""


@dataclass(frozen=True)
class LedgerEvent:
    """One step in the life of a batch (its id is the ``Idempotency-Key``): ``batched``
    (stored in the outbound queue), ``accepted`` (MS4's 202), ``split`` (into ``parts``),
    ``merged`` (``parts`` joined into this batch), ``dead_lettered`` (``invoice_ids``
    with MS4's ``detail``), ``replayed`` (dead letters back as this batch); or
    ``rejected``: one e-mail the processor refused (``detail``: why). Every event names
    its invoices and e-mails, so it stands on its own."""

    kind: str
    batch_id: str
    invoice_ids: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)
    detail: str = ""
    parts: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    #: its e-mails were first read no earlier than this (a batch's ``created_at``; 0: at
    #: any time the retention covers — a replay of old dead letters; None: at ``at``)
    read_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown ledger event kind {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        """The event as ``ms1-service trace --json`` and the console's ``/api/trace`` give
        it (the batch id is the ``Idempotency-Key``; at most 50 inbound refs)."""
        return {"kind": self.kind, "at": self.at, "batch": self.batch_id,
                "idempotency_key": None if self.kind == "rejected" else self.batch_id,
                "invoices": len(self.invoice_ids), "detail": self.detail,
                "parts": list(self.parts), "refs": list(self.refs[:50]),
                "attempts": [{"at": a.at, "status": a.status, "latency_s": round(a.latency, 4),
                              "traceparent": a.traceparent} for a in self.attempts]}

    def emails(self) -> list[tuple[str, str]]:
        """The e-mails it names, as ``(e-mail key, invoice id)``: the message id (a
        rejected e-mail without one: its batch id, ``e-<inbound ref>``)."""
        if self.kind == "rejected":
            key = self.message_ids[0] if self.message_ids and self.message_ids[0] \
                else self.batch_id
            return [(key, self.invoice_ids[0] if self.invoice_ids else "")]
        invoices = self.invoice_ids if len(self.invoice_ids) == len(self.message_ids) \
            else ("",) * len(self.message_ids)
        return [(m, i) for m, i in zip(self.message_ids, invoices, strict=True) if m]


class EmailState(NamedTuple):
    """What became of one e-mail so far: ``outcome`` (a value of :data:`OUTCOMES`), read
    (its first event) at ``read_at`` (``time.time()``). A tuple: ``reconcile`` makes a
    million of them for a busy day."""

    email: str
    invoice_id: str
    outcome: str
    read_at: float


@dataclass(frozen=True)
class Trace:
    """What the ledger knows of one invoice or e-mail: its events, oldest first."""

    id: str
    events: tuple[LedgerEvent, ...]

    @property
    def outcome(self) -> str:
        """``accepted``, ``dead_lettered``, ``rejected`` or ``pending`` (none of them yet)."""
        kinds = {event.kind for event in self.events}
        for kind in ("accepted", "dead_lettered", "rejected"):
            if kind in kinds:
                return kind
        return "pending"


class Ledger(ABC):
    """Contract of a ledger store. Every method is called from many threads."""

    name: str = "?"
    #: days a record is kept
    retention_days: float = RETENTION_DAYS
    #: True when every instance (and every command) reads the same records: only such a
    #: ledger can be reconciled against a shared queue
    shared: bool = True

    @abstractmethod
    def record(self, events: Sequence[LedgerEvent]) -> None:
        """Keep ``events`` (one round trip for all of them); raise
        :class:`~ms1.errors.QueueError` when the store cannot be reached."""

    @abstractmethod
    def trace(self, id: str) -> Trace | None:
        """The events of the invoice or e-mail ``id`` (an invoice id or a message id),
        and of every batch it was in; None when the ledger holds nothing of it."""

    @abstractmethod
    def emails(self, since: float, until: float) -> Iterator[EmailState]:
        """Every e-mail first read in ``[since, until)`` (``time.time()``), with what became
        of it so far (``reconcile``): each once (read again on a later day after a crash:
        its newest state), in no particular order, streamed (a busy day is a million).
        Raise :class:`~ms1.errors.QueueError` when the store cannot be reached."""

    @abstractmethod
    def outcomes(self, emails: Iterable[str]) -> dict[str, EmailState]:
        """The newest state the ledger holds of each of ``emails`` (absent: none)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections; may be called twice."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class MemoryLedger(Ledger):
    """The ledger in this process (tests, a service without Redis): nothing survives it."""

    name = "memory"
    shared = False

    def __init__(self, retention_days: float = RETENTION_DAYS) -> None:
        self.retention_days = retention_days
        self._lock = threading.Lock()
        self._events: list[LedgerEvent] = []
        self._by_id: dict[str, list[int]] = {}
        self._by_batch: dict[str, list[int]] = {}
        self._emails: dict[str, EmailState] = {}

    def record(self, events: Sequence[LedgerEvent]) -> None:
        with self._lock:
            for event in events:
                for email, invoice in event.emails():
                    known = self._emails.get(email)
                    letter = next_outcome(LETTERS[known.outcome] if known else None,
                                          event.kind)
                    self._emails[email] = EmailState(
                        email, invoice or (known.invoice_id if known else ""),
                        OUTCOMES[letter], known.read_at if known else event.at)
                n = len(self._events)
                self._events.append(event)
                self._by_batch.setdefault(event.batch_id, []).append(n)
                for key in {*event.invoice_ids, *event.message_ids}:
                    if key:
                        self._by_id.setdefault(key, []).append(n)

    def trace(self, id: str) -> Trace | None:
        cutoff = time.time() - self.retention_days * 86400
        with self._lock:
            direct = self._by_id.get(id, [])
            batches = {self._events[n].batch_id for n in direct}
            found = sorted({*direct, *(n for batch in batches
                                       for n in self._by_batch.get(batch, []))})
            events = [self._events[n] for n in found if self._events[n].at >= cutoff]
        return Trace(id, tuple(events)) if events else None

    def emails(self, since: float, until: float) -> Iterator[EmailState]:
        with self._lock:
            found = [state for state in self._emails.values() if since <= state.read_at < until]
        return iter(sorted(found, key=lambda state: state.read_at))

    def outcomes(self, emails: Iterable[str]) -> dict[str, EmailState]:
        with self._lock:
            return {email: self._emails[email] for email in emails if email in self._emails}
