"""Reconciliation (issue 24): every e-mail read in a period is accounted for — rejected,
accepted by MS4, dead-lettered, or pending in a queue that still holds it. One that the
ledger calls pending but no queue holds breaks the identity and is listed by id.
``ms1-service reconcile`` prints it; the service keeps ``ms1_ledger_unreconciled_emails``."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field

from ms1.errors import Ms1Error
from ms1.pipeline.ledger import EmailState, Ledger
from ms1.pipeline.outbound import QueueBackend

log = logging.getLogger(__name__)
#: seconds an e-mail read just before a reconciliation may be recorded but not yet stored
GRACE = 60.0


@dataclass
class Reconciliation:
    """What became of the e-mails read in ``[since, until)``: how many ended each way
    (``counts``, by outcome); ``emails``, each e-mail's state, oldest read first, only when
    asked for (``ms1-service reconcile --csv``; the service counts, it does not list a
    million); ``unexplained``: pending by the ledger, held by no queue; ``checked``: False
    when the queue cannot list what it holds (pending e-mails then go unchecked)."""

    since: float
    until: float
    counts: dict[str, int] = field(default_factory=dict)
    emails: list[EmailState] = field(default_factory=list)
    unexplained: list[EmailState] = field(default_factory=list)
    checked: bool = True

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)

    @property
    def read(self) -> int:
        return sum(self.counts.values())

    @property
    def balanced(self) -> bool:
        """read = rejected + accepted + dead-lettered + pending (held by a queue)."""
        return not self.unexplained

    def summary(self) -> dict[str, object]:
        counts = {outcome: self.count(outcome)
                  for outcome in ("rejected", "accepted", "dead_lettered")}
        return {"since": self.since, "until": self.until, "read": self.read, **counts,
                "pending": self.count("pending") - len(self.unexplained),
                "unexplained": len(self.unexplained), "pending_checked": self.checked,
                "balanced": self.balanced}


def reconcile(ledger: Ledger, queue: QueueBackend | None, since: float, until: float,
              *, now: float, grace: float = GRACE, listed: bool = True) -> Reconciliation:
    """Account for every e-mail read in ``[since, until)``. A pending one is explained
    while the queue holds its batch, or when read within ``grace`` s of ``now``. One
    found in no queue is read again (it may have been settled meanwhile, or read again on
    a later day after a crash): still pending and held nowhere, it is unexplained.
    ``listed``: keep every e-mail's state in :attr:`Reconciliation.emails`; else only the
    pending ones are held while counting (the service's reconciler)."""
    result = Reconciliation(since, until)
    counts: dict[str, int] = {}
    pending: dict[str, EmailState] = {}
    kept: list[EmailState] = []
    for state in ledger.emails(since, until):  # each e-mail once
        counts[state.outcome] = counts.get(state.outcome, 0) + 1
        if state.outcome == "pending" and state.read_at < now - grace:
            pending[state.email] = state
        if listed:
            kept.append(state)

    def held_nowhere(emails: list[str]) -> list[str]:
        """Those of ``emails`` the queue does not hold (none when it cannot tell)."""
        if not emails:
            return []
        held = queue.held_messages() if queue is not None else None
        if held is None:
            result.checked = False
            return []
        return [email for email in emails if email not in held]

    suspects = held_nowhere(list(pending))
    if suspects:  # settled meanwhile, or newer on a later day: the newest state counts
        newer = ledger.outcomes(suspects)
        for email in suspects:
            if email in newer and newer[email].outcome != "pending":
                counts["pending"] -= 1
                outcome = newer[email].outcome
                counts[outcome] = counts.get(outcome, 0) + 1
                pending[email] = pending[email]._replace(outcome=outcome)
        # still pending: perhaps stored since the first look
        suspects = held_nowhere([email for email in suspects
                                 if pending[email].outcome == "pending"])
    result.counts = counts
    if listed:
        result.emails = sorted((pending.get(state.email, state) for state in kept),
                               key=lambda state: state.read_at)
    result.unexplained = [pending[email] for email in suspects]
    return result


class Reconciler:
    """Reconciles the last ``window`` seconds every ``interval`` seconds in a thread of its
    own, for ``ms1_ledger_unreconciled_emails``: :attr:`unreconciled` is the last count
    (None until one succeeded, or after a failure: the store could not be read)."""

    def __init__(self, ledger: Ledger, queue: QueueBackend, *, interval: float,
                 window: float) -> None:
        self.ledger, self.queue = ledger, queue
        self.interval, self.window = interval, window
        self.unreconciled: int | None = None
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def run_once(self) -> Reconciliation | None:
        now = time.time()
        try:
            result = reconcile(self.ledger, self.queue, now - self.window, now, now=now,
                               listed=False)
        except Ms1Error as exc:
            self.unreconciled, self.error = None, str(exc)
            log.warning("could not reconcile the ledger: %s", exc)
            return None
        self.unreconciled, self.error = len(result.unexplained), ""
        if result.unexplained:
            log.error("%d e-mails read in the last %.0f s are pending by the ledger but in no "
                      "queue (first: %s); ms1-service reconcile lists them",
                      len(result.unexplained), self.window,
                      result.unexplained[0].email[:200])  # the log escapes it
        return result

    def _run(self) -> None:
        # at once (the gauge is there from then on: an idle service's later minutes stay
        # quiet), then every interval, at random within it: instances started together
        # drift apart and do not read the ledger at once
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self.run_once()
            except Exception as exc:
                self.unreconciled, self.error = None, f"{type(exc).__name__}: {exc}"
                log.exception("could not reconcile the ledger")
            wait = self.interval * random.uniform(0.5, 1.0)

    def close(self, timeout: float = 1.0) -> None:
        """Stop; a reconciliation under way is left to end on its own (a daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


__all__ = ["GRACE", "Reconciler", "Reconciliation", "reconcile"]
