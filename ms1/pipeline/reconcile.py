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
    """What became of the e-mails read in ``[since, until)``. ``unexplained``: pending
    by the ledger, held by no queue; ``checked``: False when the queue cannot list what it
    holds (pending e-mails then go unchecked)."""

    since: float
    until: float
    emails: list[EmailState] = field(default_factory=list)
    unexplained: list[EmailState] = field(default_factory=list)
    checked: bool = True

    def count(self, outcome: str) -> int:
        return sum(1 for state in self.emails if state.outcome == outcome)

    @property
    def read(self) -> int:
        return len(self.emails)

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
              *, now: float, grace: float = GRACE) -> Reconciliation:
    """Account for every e-mail read in ``[since, until)``. A pending one is explained
    while the queue holds its batch, or when read within ``grace`` s of ``now``. One
    found in no queue is read again (it may have been settled meanwhile, or read again on
    a later day after a crash): still pending and held nowhere, it is unexplained."""
    states = {state.email: state for state in ledger.emails(since, until)}
    result = Reconciliation(since, until)

    def held_nowhere(emails: list[str]) -> list[str]:
        """Those of ``emails`` the queue does not hold (none when it cannot tell)."""
        if not emails:
            return []
        held = queue.held_messages() if queue is not None else None
        if held is None:
            result.checked = False
            return []
        return [email for email in emails if email not in held]

    suspects = held_nowhere([state.email for state in states.values()
                             if state.outcome == "pending" and state.read_at < now - grace])
    if suspects:  # settled meanwhile, or newer on a later day: the newest state counts
        newer = ledger.outcomes(suspects)
        for email in suspects:
            if email in newer:
                states[email] = states[email]._replace(outcome=newer[email].outcome)
        # still pending: perhaps stored since the first look
        suspects = held_nowhere([email for email in suspects
                                 if states[email].outcome == "pending"])
    result.emails = sorted(states.values(), key=lambda state: state.read_at)
    result.unexplained = [states[email] for email in suspects]
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
            result = reconcile(self.ledger, self.queue, now - self.window, now, now=now)
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
