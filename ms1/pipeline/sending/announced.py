"""What MS4 (or the proxy in front of it) announces of its rate limit in its answers.

Read from every answer, in this order of preference:

More: docs/internals.md, ``ms1.pipeline.sending.announced``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

#: the most seconds a reset is taken to mean (a longer one is read as nothing)
MAX_RESET = 86_400.0
_PARAM = re.compile(r";\s*([a-z][a-z0-9_-]*)\s*=\s*(\"[^\"]*\"|[^;,\s]+)", re.I)


@dataclass(frozen=True)
class Announced:
    """One answer's announcement; a field MS4 did not send (or sent unreadable) is None."""

    source: str  # "draft", "ratelimit" (the older draft) or "x-ratelimit"
    limit: int | None = None
    window: float | None = None
    remaining: int | None = None
    reset: float | None = None

    def text(self) -> str:
        """``120 per 60 s, 37 left, resets in 12 s (draft)``."""
        parts = []
        if self.limit is not None:
            parts.append(f"{self.limit}" + (f" per {self.window:g} s"
                                            if self.window is not None else ""))
        if self.remaining is not None:
            parts.append(f"{self.remaining} left")
        if self.reset is not None:
            parts.append(f"resets in {self.reset:.0f} s")
        return ", ".join(parts) + f" ({self.source})"


def _number(text: str | None) -> float | None:
    """A field's non-negative finite number (quotes and blanks around it allowed)."""
    if text is None:
        return None
    try:
        value = float(text.strip().strip('"'))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _count(text: str | None) -> int | None:
    value = _number(text)
    return int(value) if value is not None and value == int(value) and value <= 10**9 \
        else None


def _seconds(text: str | None, now: Callable[[], float] = time.time) -> float | None:
    value = _number(text)
    if value is not None and value > 1e9:  # a Unix time
        value = max(0.0, value - now())
    return value if value is not None and value <= MAX_RESET else None


def _items(value: str) -> list[dict[str, str]]:
    """A structured-field list of ``"name";k=v;...`` items, as dicts of their params."""
    items = []
    for part in value.split(","):
        params = {k.lower(): v.strip('"') for k, v in _PARAM.findall(part)}
        if params:
            items.append(params)
    return items


def _draft(headers: Mapping[str, str]) -> Announced | None:
    state, policy = headers.get("ratelimit"), headers.get("ratelimit-policy")
    if state is None and policy is None:
        return None
    current = [i for i in _items(state or "") if _count(i.get("r")) is not None]
    least = min(current, key=lambda i: _count(i.get("r")) or 0, default={})
    policies = _items(policy or "")
    chosen = policies[0] if policies else {}
    if least and len(policies) > 1:  # the policy of the item with the least left
        name = re.match(r'\s*"([^"]*)"', (state or "").split(",")[current.index(least)])
        for item, text in zip(policies, (policy or "").split(","), strict=False):
            if name and re.match(rf'\s*"{re.escape(name.group(1))}"', text):
                chosen = item
    window = _seconds(chosen.get("w"))
    return Announced("draft", _count(chosen.get("q")), window or None,
                     _count(least.get("r")), _seconds(least.get("t")))


def _fields(headers: Mapping[str, str], prefix: str, source: str) -> Announced | None:
    limit, remaining, reset = (headers.get(f"{prefix}-{name}")
                               for name in ("limit", "remaining", "reset"))
    if limit is None and remaining is None and reset is None:
        return None
    window = None
    if limit is not None:
        first, _, rest = limit.partition(",")
        found = re.search(r";\s*w\s*=\s*([0-9.]+)", rest)
        window = _seconds(found.group(1)) if found else None
        limit = first
    return Announced(source, _count(limit), window or None, _count(remaining),
                     _seconds(reset))


def read_announced(headers: Mapping[str, str]) -> Announced | None:
    """The announcement in an answer's headers (lower-case keys), or None."""
    for found in (_draft(headers), _fields(headers, "ratelimit", "ratelimit"),
                  _fields(headers, "x-ratelimit", "x-ratelimit")):
        if found is not None and (found.remaining is not None or found.limit is not None):
            return found
    return None
