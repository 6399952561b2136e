"""Building the service's parts from the config, through the plugins.

:class:`Components` holds the swappable parts (source, batch policy, outbound queue,
dead letters, transport, rate limiter), each built by the plugin the config names;
:func:`make_pacer` builds the pacer the ``[send]`` options describe. Running them is
:mod:`ms1.runtime.service`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pluggy

from ms1.config import Config
from ms1.ops.fleet import Fleet
from ms1.pipeline.batching import BatchPolicy
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import RateLimiter, SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Pacer
from ms1.pipeline.source import Source
from ms1.pipeline.transport import Transport
from ms1.runtime import pluginmanager
from ms1.runtime import settings as from_config

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@dataclass(frozen=True)
class Components:
    """The swappable parts, as built by the plugins (``limiter`` None: from ``[send]``;
    ``fleet`` None: this process only, a :class:`~ms1.ops.fleet.MemoryFleet`)."""

    source: Source
    policy: BatchPolicy
    queue: QueueBackend
    dead_letters: DeadLetterStore
    transport: Transport
    limiter: RateLimiter | None = None
    fleet: Fleet | None = None
    #: the invoice ledger (None: ``[ledger] backend = off``)
    ledger: Ledger | None = None

    @classmethod
    def build(cls, pm: pluggy.PluginManager, config: Config,
              inputs: Sequence[str] = ()) -> Components:
        """Build every part the config names; if one fails, close those already built."""
        built: list[Closable] = []

        def keep(component: C) -> C:
            built.append(component)
            return component

        try:
            source = keep(pluginmanager.build_source(pm, config, inputs))
            policy = keep(pluginmanager.build_batch_policy(pm, config))
            queue = keep(pluginmanager.build_queue(pm, config))
            dead_letters = keep(pluginmanager.build_dead_letters(pm, config))
            transport = keep(pluginmanager.build_transport(pm, config))
            limiter = keep(pluginmanager.build_rate_limiter(pm, config))
            fleet = keep(pluginmanager.build_fleet(pm, config, queue.name))
            ledger = pluginmanager.build_ledger(pm, config, queue.name)
            if ledger is not None:
                keep(ledger)
            transport.set_api_key(config.api_key)
        except BaseException:
            for component in reversed(built):
                try:
                    component.close()
                except Exception:
                    log.exception("closing %s failed", type(component).__name__)
            raise
        return cls(source, policy, queue, dead_letters, transport, limiter, fleet, ledger)

    def close(self) -> None:
        parts = (self.source, self.transport, self.queue, self.dead_letters, self.policy,
                 self.limiter, self.fleet, self.ledger)
        for part in parts:
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("closing %s failed", type(part).__name__)


def make_pacer(config: Config, limiter: RateLimiter | None = None) -> Pacer:
    """The shared pacer (rate limit, 429/401 pauses, breaker) the ``[send]`` options describe."""
    settings = from_config.pacer(config)
    if limiter is None:
        limiter = SlidingWindowLimiter(settings.limit, settings.window,
                                       shaping=from_config.service(config).shaping)
    pacer = Pacer(limiter, Breaker(settings.breaker_failures, settings.breaker_reset))
    pacer.configure(settings)
    return pacer
