"""The answer table: what each answer of MS4 means to ms1 — in this one place.

The pacer (who may send, and when) and the sender (what becomes of the batch) both read
:func:`classify`; nothing else in ms1 looks at a status code. The principle: **nothing
is ever dropped, and nothing is sent at full rate into an answer that will not change.**

==========================  ==============  ===============================================
answer                      :class:`Kind`   ms1 does
==========================  ==============  ===============================================
202                         ACCEPTED        ack the batch
400, 413, 422               REFUSED         dead-letter the objects the answer names
                                            (:mod:`ms1.pipeline.sending.refusals`), resend the rest
                                            as one batch; naming none: split the batch
                                            until the refused object is isolated; dead-
                                            letter it with MS4's text; never resend an
                                            unchanged batch
401, 403                    UNAUTHORIZED    every sender stops; CRITICAL once per spell;
                                            one probe every ``auth_probe_interval`` s; a
                                            key reload or a probe answered otherwise ends it
3xx, 404, 405, 2xx but      MISCONFIGURED   every sender stops; CRITICAL once per spell
202, any other 4xx                          naming ``[transport.http] base_url``; one probe
                                            every ``breaker_reset`` s; a probe answered
                                            otherwise ends it
429                         RATE_LIMITED    every sender pauses until ``Retry-After``; not a
                                            breaker failure
408, 409, 5xx, a 1xx taken  RETRY           retry with backoff (tenacity); a breaker failure
as final, no answer                         (after ``breaker_failures`` in a row: one probe
                                            per ``breaker_reset`` s)
==========================  ==============  ===============================================

Why so:

* **422** Unprocessable Content is a refused object (semantically invalid), like 400. It
  is also what the Idempotency-Key draft (draft-ietf-httpapi-idempotency-key-header)
  answers to a key reused with *another* body — which ms1 cannot send: its key is a
  hash of the body.
* **409** Conflict is, in that draft, "a request with this key is still being
  processed" — a re-send racing the original after a lost answer. Splitting would give
  the halves new keys, so MS4 would store them *and* the original: duplicates. Dead-
  lettering would set aside objects MS4 is storing. So: the unchanged batch, same key,
  retried with backoff; a breaker failure, so a 409 that does not go away is probed once
  per ``breaker_reset`` s, and ``/readyz`` names it.
* **403**: the key is known but lacks a right; no resend will change that, and every
  batch would get it: stop and alert, as for 401.
* **3xx, 404, 405**: ms1 is not talking to MS4's ``/batch-metadata`` (a wrong
  ``base_url``, a redirect ms1 will not follow: it POSTs a body, and following a
  redirect with it is a decision for the operator, not for ms1). Nothing a resend
  changes: stop, alert, probe.
* **200, 201, 204** (any 2xx but 202) are not the contract's acceptance: acking on them
  could lose invoices (whatever answered may not have stored them, e.g. a catch-all
  server at a wrong ``base_url``), and resending at full rate would hammer: treated as a
  configuration error (stop, alert, probe). Every other 4xx likewise: an answer the
  contract does not have, that a resend will not change.
* **408** Request Timeout, **5xx**, no answer, and a 1xx that came back as final (a
  broken server or proxy): may change by itself; retry with backoff, count in the breaker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from http import HTTPStatus


class Kind(enum.Enum):
    """What an answer means for the batch and for every sender."""

    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNAUTHORIZED = "unauthorized"
    MISCONFIGURED = "misconfigured"
    RATE_LIMITED = "rate limited"
    RETRY = "retry"

    @property
    def stops_senders(self) -> bool:
        """Every sender stops until a probe is answered otherwise (or the key changes)."""
        return self in (Kind.UNAUTHORIZED, Kind.MISCONFIGURED)

    @property
    def paced(self) -> bool:
        """The pacer, not the batch's backoff, decides when to send again."""
        return self in (Kind.UNAUTHORIZED, Kind.MISCONFIGURED, Kind.RATE_LIMITED)

    @property
    def breaker_failure(self) -> bool:
        return self is Kind.RETRY


@dataclass(frozen=True)
class Answer:
    """One row of the table: the status (None: no answer), its kind, and its name."""

    status: int | None
    kind: Kind

    @property
    def name(self) -> str:
        """``"409 Conflict"``, ``"no answer"``, ``"299"``."""
        if self.status is None:
            return "no answer"
        try:
            return f"{self.status} {HTTPStatus(self.status).phrase}"
        except ValueError:
            return str(self.status)


#: the statuses named in the table; the rest go by their class (:func:`classify`)
TABLE: dict[int, Kind] = {
    202: Kind.ACCEPTED,
    400: Kind.REFUSED,
    413: Kind.REFUSED,
    422: Kind.REFUSED,
    401: Kind.UNAUTHORIZED,
    403: Kind.UNAUTHORIZED,
    404: Kind.MISCONFIGURED,
    405: Kind.MISCONFIGURED,
    429: Kind.RATE_LIMITED,
    408: Kind.RETRY,
    409: Kind.RETRY,
}


def classify(status: int | None) -> Answer:
    """The row for ``status`` (None: no answer at all — timeout, refused, dropped)."""
    if status is None:
        return Answer(None, Kind.RETRY)
    kind = TABLE.get(status)
    if kind is not None:
        return Answer(status, kind)
    # 5xx, or a 1xx as final answer (a broken server or proxy): may change by itself;
    # 2xx but 202, 3xx, any other 4xx: not the contract, and a resend will not change it
    broken = status < 200 or status >= 500
    return Answer(status, Kind.RETRY if broken else Kind.MISCONFIGURED)
