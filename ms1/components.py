"""Building the service's parts from the config, through the plugins.

:class:`Components` holds the swappable parts (source, batch policy, outbound queue,
dead letters, transport, rate limiter), each built by the plugin the config names;
:func:`make_pacer` builds the pacer the ``[send]`` options describe. Running them is
:mod:`ms1.service`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from ms1 import pluginmanager
from ms1.batching import BatchPolicy
from ms1.config import Config
from ms1.deadletters import DeadLetterStore
from ms1.outbound import QueueBackend
from ms1.sending.breaker import Breaker
from ms1.sending.limiter import RateLimiter, SlidingWindowLimiter
from ms1.sending.pacer import Pacer
from ms1.source import Source
from ms1.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Components:
    """The swappable parts, as built by the plugins (``limiter`` None: from ``[send]``)."""

    source: Source
    policy: BatchPolicy
    queue: QueueBackend
    dead_letters: DeadLetterStore
    transport: Transport
    limiter: RateLimiter | None = None

    @classmethod
    def build(cls, pm: pluggy.PluginManager, config: Config,
              inputs: Sequence[str] = ()) -> Components:
        built: list[Any] = []
        try:
            for kind, extra in (("source", {"inputs": list(inputs)}), ("batch_policy", {}),
                                ("queue", {}), ("dead_letters", {}), ("transport", {}),
                                ("rate_limiter", {})):
                built.append(pluginmanager.build(pm, config, kind, **extra))
        except BaseException:
            for component in reversed(built):
                component.close()
            raise
        transport = built[4]
        transport.set_api_key(config.api_key)
        return cls(*built)

    def close(self) -> None:
        parts = (self.source, self.transport, self.queue, self.dead_letters, self.policy,
                 self.limiter)
        for part in parts:
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("closing %s failed", type(part).__name__)


def make_pacer(config: Config, limiter: RateLimiter | None = None) -> Pacer:
    """The shared pacer (rate limit, 429/401 pauses, breaker) the ``[send]`` options describe."""
    if limiter is None:
        limiter = SlidingWindowLimiter(config.get_int("send", "requests_per_minute"),
                                       config.get_float("send", "rate_window"))
    breaker = Breaker(config.get_int("send", "breaker_failures"),
                      config.get_float("send", "breaker_reset"))
    return Pacer(limiter, breaker,
                 retry_after_default=config.get_float("send", "retry_after_default"),
                 retry_after_cap=config.get_float("send", "retry_after_max"),
                 auth_probe_interval=config.get_float("send", "auth_probe_interval"))
