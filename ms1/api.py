"""What a third-party plugin imports: the hook marker, the configuration schema, the
model, each contract with its in-memory twin, and the exception tree. Stable: a name
here is removed or changed only in a major release (the README's "Releases and
compatibility"); the modules behind it may move in any release."""

from ms1.config import Config, Option
from ms1.errors import ConfigError, Ms1Error, QueueError, SourceError, TransportError
from ms1.markers import hookimpl
from ms1.model import BATCH_PATH, UNIT_PATH, Batch, DeadLetter, Item
from ms1.ops.fleet import Fleet, MemoryFleet
from ms1.pipeline.batching import BatchPolicy, SizeBatchPolicy, UnitPolicy
from ms1.pipeline.deadletters import DeadLetterStore, MemoryDeadLetters
from ms1.pipeline.outbound import Delivery, MemoryQueue, QueueBackend, QueueStats
from ms1.pipeline.sending.limiter import Grant, RateLimiter, SlidingWindowLimiter
from ms1.pipeline.source import MemorySource, Source
from ms1.pipeline.transport import MemoryTransport, Request, Response, Transport

__all__ = [
    "BATCH_PATH", "UNIT_PATH", "Batch", "BatchPolicy", "Config", "ConfigError", "DeadLetter",
    "DeadLetterStore", "Delivery", "Fleet", "Grant", "Item", "MemoryDeadLetters",
    "MemoryFleet", "MemoryQueue", "MemorySource", "MemoryTransport", "Ms1Error", "Option",
    "QueueBackend", "QueueError", "QueueStats", "RateLimiter", "Request", "Response",
    "SizeBatchPolicy", "SlidingWindowLimiter", "Source", "SourceError", "Transport",
    "TransportError", "UnitPolicy", "hookimpl",
]
