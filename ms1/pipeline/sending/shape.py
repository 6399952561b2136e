"""What ms1 learns of the shape of MS4's rate limiter: how large a burst it allows.

MS4's contract gives a rate (``limit`` per ``window``) and nothing on how it is counted.
The rate limiters a real MS4 sits behind differ in the burst they allow: a sliding log
the whole window's budget at once, a token bucket its capacity, nginx's ``limit_req``
without ``burst`` none at all. ms1 paces requests by GCRA (a token bucket: one request
every ``window / limit`` seconds, times ``1 + spacing``) with a burst allowance learned
as TCP learns its window (AIMD):

More: docs/internals.md, ``ms1.pipeline.sending.shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: the allowance a cold start begins with (two requests at once, then the steady pace)
INITIAL_BURST = 2.0
#: the spacing added to the emission interval: 2 % under the rate, for the jitter between
#: ms1's clock and the limiter's (nginx counts whole milliseconds)
BASE_SPACING = 0.02
#: what a 429 at the steady pace adds to the spacing (additive: each step costs 2 % of
#: the ceiling, so it is never overshot by much)
SPACING_STEP = 0.02
#: the most spacing a strict limiter's 429s widen it to
MAX_SPACING = 0.2
#: the longest hold after a cut, in windows' budgets
MAX_HOLD_WINDOWS = 16
#: a request granted at a level up to this was sent at the steady pace (no burst in use):
#: a tenth of an interval early at most. Beyond it, it left ahead of the pace, which only
#: a burst allowance lets it do: its 429 cuts the allowance. (It was 1.5: a probe of a
#: grown allowance, granted half an interval early and refused by a limiter without
#: burst, widened the spacing instead, for good — nginx without burst at 93.6 %.)
STEADY = 1.1
#: a request granted at the steady pace with this share of the window's budget in use
#: (the sliding log's), this one included, and refused: MS4 may count late (see Pacer)
WINDOW_FULL = 0.9


@dataclass(frozen=True)
class Shape:
    """The learned shape (requests; ``spacing`` a fraction of the emission interval)."""

    burst: float = INITIAL_BURST
    ceiling: float = 120.0
    spacing: float = BASE_SPACING
    epoch: int = 0
    cuts: int = 0
    credit: int = 0  # accepted full-use requests since the last growth (avoidance)

    @classmethod
    def initial(cls, limit: int) -> Shape:
        return cls(burst=min(INITIAL_BURST, float(limit)), ceiling=float(limit))

    @property
    def slow_start(self) -> bool:
        return self.burst < self.ceiling

    def fitted(self, limit: int) -> Shape:
        """The shape for a new ``limit`` (a reload): no allowance above the budget."""
        return replace(self, burst=max(1.0, min(self.burst, float(limit))),
                       ceiling=max(1.0, min(self.ceiling, float(limit))))

    def as_fields(self) -> dict[str, str]:
        return {"burst": repr(self.burst), "ceiling": repr(self.ceiling),
                "spacing": repr(self.spacing), "epoch": str(self.epoch),
                "cuts": str(self.cuts), "credit": str(self.credit)}

    @classmethod
    def from_fields(cls, fields: dict[str, str], default: Shape) -> Shape:
        """A shape read back (a Redis hash); fields missing or unreadable keep
        ``default``'s (a hostile or older entry never stops the senders)."""
        values: dict[str, float | int] = {}
        for name, kind in (("burst", float), ("ceiling", float), ("spacing", float),
                           ("epoch", int), ("cuts", int), ("credit", int)):
            try:
                values[name] = kind(fields[name])
            except (KeyError, ValueError, TypeError):
                continue
        shape = replace(default, **values)  # type: ignore[arg-type]
        return replace(shape, burst=max(1.0, shape.burst), ceiling=max(1.0, shape.ceiling),
                       spacing=min(MAX_SPACING, max(0.0, shape.spacing)))


def full_use(shape: Shape, level: float) -> bool:
    """A request granted at ``level`` (requests ahead of the steady pace, itself
    included) used the whole allowance: its acceptance says the allowance holds."""
    return level > shape.burst - 1


def accepted(shape: Shape, level: float, epoch: int, limit: int) -> Shape | None:
    """A request granted at ``level`` in ``epoch`` was accepted: the grown shape, or
    None when it teaches nothing."""
    if epoch != shape.epoch or not full_use(shape, level):
        return None
    if shape.slow_start:
        return replace(shape, burst=min(shape.ceiling, shape.burst + 1))
    hold = limit * min(MAX_HOLD_WINDOWS, 2 ** shape.cuts)
    if shape.credit + 1 < hold:
        return replace(shape, credit=shape.credit + 1)
    burst = min(float(limit), shape.burst + 1)
    return replace(shape, burst=burst, ceiling=burst, credit=0,
                   spacing=max(BASE_SPACING, shape.spacing / 2))


def refused(shape: Shape, level: float, epoch: int) -> Shape | None:
    """A request granted at ``level`` in ``epoch`` drew a 429 the model cannot explain:
    the cut shape (a new epoch), or None if an earlier answer of the spell cut already."""
    if epoch != shape.epoch:
        return None
    if level > STEADY:  # part of a burst: the limiter allows less than that
        # at least halved (rounded down), and below the refused request's level (its
        # count ahead of the pace, to the nearest request: the clock drifts by fractions)
        burst = float(max(1, min(math.floor(shape.burst / 2), round(level - 1))))
        return replace(shape, burst=burst, ceiling=burst, epoch=shape.epoch + 1,
                       cuts=shape.cuts + 1, credit=0)
    # at the steady pace: a strict limiter, and the requests came too close
    return replace(shape, burst=1.0, ceiling=1.0, epoch=shape.epoch + 1, cuts=shape.cuts + 1,
                   credit=0, spacing=min(MAX_SPACING, shape.spacing + SPACING_STEP))
