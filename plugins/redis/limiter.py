"""The shared rate limiter: one sliding window for every instance on the Redis.

A sliding-window log in a sorted set (``[redis] rate_limit_key``), updated by
``scripts/limiter_acquire.lua`` and ``scripts/limiter_finish.lua`` on the server's clock,
so hosts need not agree on the time.
"""

from __future__ import annotations

import uuid

from ms1.errors import QueueError
from ms1.sending.limiter import RateLimiter

from .link import RedisLink, translated


class RedisRateLimiter(RateLimiter):
    """At most ``limit`` requests in any ``window`` s for every instance on the Redis.

    Member = one request, score = when MS4 counted it (see
    :mod:`ms1.sending.limiter`). While in flight a request's score is
    start + ``lease`` (the longest a request can take), so the slot of a process killed
    mid-request still expires.
    """

    def __init__(self, link: RedisLink, *, key: str, limit: int, window: float,
                 lease: float) -> None:
        self.link = link
        self.key, self.limit, self.window, self.lease = key, limit, window, lease

    def try_acquire(self, ahead: float = 0.0) -> tuple[str | None, float]:
        token = uuid.uuid4().hex
        with translated(QueueError, "take a rate-limit slot", self.link):
            granted, wait = self.link.script("limiter_acquire", [self.key],
                                             [self.limit, self.window, token, self.lease,
                                              repr(float(ahead))])
        if int(granted):
            self.free_hint = int(float(wait))  # a grant's second value: see free_hint
            return token, 0.0
        return None, max(float(wait), 0.001)

    def finish(self, token: str, ago: float = 0.0) -> None:
        with translated(QueueError, "stamp a rate-limit slot", self.link):
            self.link.script("limiter_finish", [self.key], [token, repr(float(ago))])

    def cancel(self, token: str) -> None:
        with translated(QueueError, "give back a rate-limit slot", self.link):
            self.link.client.zrem(self.key, token)

    def close(self) -> None:
        self.link.release()
