"""Built-in plugin ``memory``: in-process source, queue, dead letters, transport, limiter,
fleet.

For tests, demos and embedding; nothing survives the process.
"""

from __future__ import annotations

from collections.abc import Sequence

from ms1.config import Config
from ms1.hookspecs import hookimpl
from ms1.ops.fleet import Fleet, MemoryFleet
from ms1.pipeline.deadletters import DeadLetterStore, MemoryDeadLetters
from ms1.pipeline.ledger import Ledger, MemoryLedger
from ms1.pipeline.outbound import MemoryQueue, QueueBackend
from ms1.pipeline.sending.limiter import RateLimiter, SlidingWindowLimiter
from ms1.pipeline.source import MemorySource, Source
from ms1.pipeline.transport import MemoryTransport, Transport

NAME = "memory"


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("source", NAME), ("queue", NAME), ("dead_letters", NAME), ("transport", NAME),
            ("rate_limiter", NAME), ("fleet", NAME), ("ledger", NAME)]


@hookimpl
def ms1_component_traits() -> Sequence[tuple[str, str, str]]:
    return [("queue", NAME, "volatile"), ("dead_letters", NAME, "volatile")]


@hookimpl
def ms1_make_ledger(name: str, config: Config) -> Ledger | None:
    if name != NAME:
        return None
    return MemoryLedger(config.get_float("ledger", "retention_days"))


@hookimpl
def ms1_make_source(name: str, config: Config, inputs: Sequence[str]) -> Source | None:
    return MemorySource(finite=True) if name == NAME else None


@hookimpl
def ms1_make_queue(name: str, config: Config) -> QueueBackend | None:
    return MemoryQueue() if name == NAME else None


@hookimpl
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    return MemoryDeadLetters() if name == NAME else None


@hookimpl
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    return MemoryTransport() if name == NAME else None


@hookimpl
def ms1_make_rate_limiter(name: str, config: Config) -> RateLimiter | None:
    if name != NAME:
        return None
    return SlidingWindowLimiter(config.get_int("send", "requests_per_minute"),
                                config.get_float("send", "rate_window"),
                                shaping=config.get_str("send", "rate_shape") == "learn")


@hookimpl
def ms1_make_fleet(name: str, config: Config) -> Fleet | None:
    return MemoryFleet() if name == NAME else None
