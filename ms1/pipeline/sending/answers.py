"""The answer table: what each answer of MS4 means to ms1 — in this one place.

The pacer (who may send, and when) and the sender (what becomes of the batch) both read
:func:`classify`; nothing else in ms1 looks at a status code. The principle: **nothing
is ever dropped, and nothing is sent at full rate into an answer that will not change.**

More: docs/internals.md, ``ms1.pipeline.sending.answers``.
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
