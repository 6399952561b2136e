"""The dead-letter browser's filter and pages: pure functions over a
:class:`~ms1.pipeline.deadletters.DeadLetterStore`, read page by page with ``scan``.

A filter holds what the console's query string may carry and nothing else: a reason
substring, a stage, a date range (UTC days) and an invoice id. It never holds a payload.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ms1.model import DeadLetter
from ms1.ops.overview import STAGES
from ms1.pipeline.deadletters import DeadLetterStore

#: letters one page shows
PAGE = 50
#: letters one page request reads at most while looking for matches (the rest: "more")
SCAN_BUDGET = 20_000
#: most letters "replay all that match" takes in one request
REPLAY_ALL_MAX = 100_000
#: longest filter text kept (reason, invoice id)
MAX_TEXT = 200


class FilterError(ValueError):
    """A filter value that cannot be read (shown to the user, with the field)."""


def _day(text: str, field: str) -> dt.date | None:
    text = text.strip()
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{field}: expected a date YYYY-MM-DD") from None


@dataclass(frozen=True)
class LetterFilter:
    """Which letters to show: each field set narrows it (``reason`` and ``invoice``:
    contained, ignoring case; ``stage``: equal; ``since``/``until``: UTC days, inclusive)."""

    reason: str = ""
    stage: str = ""
    since: dt.date | None = None
    until: dt.date | None = None
    invoice: str = ""

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> LetterFilter:
        """From query or form fields ``reason``, ``stage``, ``from``, ``to``, ``invoice``;
        :class:`FilterError` for a bad value."""
        stage = args.get("stage", "").strip()
        if stage and stage not in STAGES:
            raise FilterError(f"stage: one of {', '.join(STAGES)}")
        since = _day(args.get("from", ""), "from")
        until = _day(args.get("to", ""), "to")
        if since and until and until < since:
            raise FilterError("to: before from")
        return cls(reason=args.get("reason", "").strip()[:MAX_TEXT], stage=stage,
                   since=since, until=until,
                   invoice=args.get("invoice", "").strip()[:MAX_TEXT])

    @property
    def empty(self) -> bool:
        return not (self.reason or self.stage or self.since or self.until or self.invoice)

    def args(self) -> dict[str, str]:
        """The fields set, as query/form fields (:meth:`from_args` reads them back)."""
        found = {"reason": self.reason, "stage": self.stage,
                 "from": self.since.isoformat() if self.since else "",
                 "to": self.until.isoformat() if self.until else "", "invoice": self.invoice}
        return {key: value for key, value in found.items() if value}

    def matches(self, letter: DeadLetter) -> bool:
        if self.stage and letter.stage != self.stage:
            return False
        if self.reason and self.reason.lower() not in letter.reason.lower():
            return False
        if self.invoice and self.invoice.lower() not in (letter.invoice_id or "").lower():
            return False
        if self.since or self.until:
            day = dt.datetime.fromtimestamp(letter.at, dt.UTC).date()
            if self.since and day < self.since:
                return False
            if self.until and day > self.until:
                return False
        return True


@dataclass(frozen=True)
class Page:
    """One page of matching letters. ``next_after``: where the next page starts (None:
    the store was read to its end); ``scanned``: letters read for this page."""

    letters: list[DeadLetter]
    next_after: str | None
    scanned: int


def _scan(store: DeadLetterStore, after: str | None, chunk: int = 500
          ) -> Iterator[DeadLetter]:
    while True:
        letters = store.scan(after, chunk)
        yield from letters
        if len(letters) < chunk:
            return
        after = letters[-1].id


def find(store: DeadLetterStore, flt: LetterFilter, after: str | None = None,
         limit: int = PAGE, budget: int = SCAN_BUDGET) -> Page:
    """Up to ``limit`` letters matching ``flt`` after letter ``after``, reading at most
    ``budget`` letters (then ``next_after`` says where to go on, even if the page is not
    full)."""
    found: list[DeadLetter] = []
    scanned = 0
    last: str | None = after
    for letter in _scan(store, after):
        scanned += 1
        last = letter.id
        if flt.matches(letter):
            found.append(letter)
            if len(found) >= limit:
                return Page(found, letter.id, scanned)
        if scanned >= budget:
            return Page(found, last, scanned)
    return Page(found, None, scanned)


def matching_ids(store: DeadLetterStore, flt: LetterFilter, most: int = REPLAY_ALL_MAX
                 ) -> list[str]:
    """Ids of every letter matching ``flt`` (at most ``most``), oldest first."""
    ids = []
    for letter in _scan(store, None):
        if flt.matches(letter):
            ids.append(letter.id)
            if len(ids) >= most:
                break
    return ids


__all__ = ["MAX_TEXT", "PAGE", "REPLAY_ALL_MAX", "SCAN_BUDGET", "FilterError",
           "LetterFilter", "Page", "find", "matching_ids"]
