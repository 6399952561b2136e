"""The shared rate limiter: one sliding window, and one learned pace, for every instance
on the Redis.

A sliding-window log in a sorted set (``[redis] rate_limit_key``), updated by
``scripts/limiter_acquire.lua`` and ``scripts/limiter_finish.lua`` on the server's clock,
so hosts need not agree on the time. With shaping, the learned
:class:`~ms1.pipeline.sending.shape.Shape` and GCRA's theoretical arrival time live in a hash
beside it (``<rate_limit_key>:shape``, the same hash tag): every instance paces by it and
learns into it (``scripts/limiter_learn.lua``, compare and set).
"""

from __future__ import annotations

import uuid
from typing import Any

from ms1.errors import QueueError
from ms1.pipeline.sending.limiter import Change, Grant, RateLimiter
from ms1.pipeline.sending.shape import Shape

from .link import RedisLink, translated

#: compare-and-set rounds before a learning step gives up (another instance kept
#: writing: its step stands, this one's is lost)
LEARN_TRIES = 8


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisRateLimiter(RateLimiter):
    """At most ``limit`` requests in any ``window`` s for every instance on the Redis.

    Member = one request, score = when MS4 counted it (see
    :mod:`ms1.pipeline.sending.limiter`). While in flight a request's score is
    start + ``lease`` (the longest a request can take), so the slot of a process killed
    mid-request still expires.
    """

    def __init__(self, link: RedisLink, *, key: str, limit: int, window: float,
                 lease: float, shaping: bool = False) -> None:
        self.link = link
        self.key, self.limit, self.window, self.lease = key, limit, window, lease
        self.shared_as = key
        self.shape_key = f"{key}:shape"
        self.shaping = shaping
        self._shape: Shape | None = Shape.initial(limit) if shaping else None

    # configure(): the figures only (no round trip: a reload never waits on Redis); the
    # acquire script holds a stored burst to the limit, and the next learning step fits it

    def _keys(self) -> list[str]:
        return [self.key, self.shape_key] if self.shaping else [self.key]

    def try_acquire(self, ahead: float = 0.0) -> tuple[str | None, float]:
        grant, wait = self.acquire(ahead)
        return (grant.token if grant is not None else None), wait

    def acquire(self, ahead: float = 0.0) -> tuple[Grant | None, float]:
        token = uuid.uuid4().hex
        args: list[str | int | float] = [self.limit, self.window, token, self.lease,
                                         repr(float(ahead))]
        if self.shaping:
            start = Shape.initial(self.limit)
            args += [repr(start.burst), repr(start.spacing), repr(float(self.spacing_floor))]
        with translated(QueueError, "take a rate-limit slot", self.link):
            reply = self.link.script("limiter_acquire", self._keys(), args)
        if not int(reply[0]):
            return None, max(float(reply[1]), 0.001)
        self.free_hint = int(float(reply[1]))  # a grant's second value: see free_hint
        if len(reply) < 5:
            return Grant(token), 0.0
        epoch = int(float(reply[4])) if self.shaping else None
        return Grant(token, float(reply[2]), float(reply[3]), epoch), 0.0

    def finish(self, token: str, ago: float = 0.0) -> None:
        with translated(QueueError, "stamp a rate-limit slot", self.link):
            self.link.script("limiter_finish", [self.key], [token, repr(float(ago))])

    def cancel(self, token: str) -> None:
        # the pace is not given back: a later grant may already stand on this one's step
        with translated(QueueError, "give back a rate-limit slot", self.link):
            self.link.client.zrem(self.key, token)

    @property
    def shape(self) -> Shape | None:
        """The shape as this instance last read or wrote it."""
        return self._shape

    def _read(self) -> tuple[Shape, str]:
        with translated(QueueError, "read the learned rate-limit shape", self.link):
            raw = self.link.client.hgetall(self.shape_key)
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Shape.from_fields(fields, Shape.initial(self.limit)), fields.get("version", "")

    def learn(self, change: Change) -> Shape | None:
        if not self.shaping:
            return None
        for _ in range(LEARN_TRIES):
            shape, version = self._read()
            new = change(shape.fitted(self.limit))
            if new is None:
                self._shape = shape
                return shape
            pairs = [item for name_value in new.as_fields().items() for item in name_value]
            with translated(QueueError, "store the learned rate-limit shape", self.link):
                written = self.link.script("limiter_learn", [self.shape_key],
                                           [version, *pairs])
            if int(written):
                self._shape = new
                return new
        return self._shape

    def close(self) -> None:
        self.link.release()
