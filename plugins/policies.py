"""Built-in plugin: batch policies ``batch`` (the default) and ``unit`` (one per request)."""

from __future__ import annotations

from collections.abc import Sequence

from ms1.config import Config
from ms1.hookspecs import hookimpl
from ms1.pipeline.batching import BatchPolicy, SizeBatchPolicy, UnitPolicy


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("batch_policy", "batch"), ("batch_policy", "unit")]


@hookimpl
def ms1_make_batch_policy(name: str, config: Config) -> BatchPolicy | None:
    max_bytes = config.get_int("batch", "max_bytes")
    if name == "batch":
        return SizeBatchPolicy(max_items=config.get_int("batch", "max_items"),
                               max_bytes=max_bytes,
                               max_wait=config.get_float("batch", "max_wait"))
    if name == "unit":
        return UnitPolicy(max_bytes=max_bytes)
    return None
