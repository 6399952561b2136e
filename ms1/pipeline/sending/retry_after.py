"""``Retry-After``: how long MS4 asks every sender to pause after a 429."""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime


def parse_retry_after(value: str | None, *, default: float, cap: float,
                      now: datetime | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` value, always within ``[0, cap]``.

    Accepts delay-seconds (``"7"``; a non-negative decimal like ``"1.5"`` too) and
    an HTTP-date in any of its three formats (IMF-fixdate, RFC 850, asctime — the
    latter parsed naive and taken as UTC). A date in the past gives 0. Missing,
    empty, negative or unparseable values give ``default`` (clamped as well).
    """
    seconds = _retry_after_seconds(value, now or datetime.now(UTC))
    if seconds is None:
        seconds = default
    return min(max(seconds, 0.0), max(cap, 0.0))


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime carries no zone; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return (when - now).total_seconds()
