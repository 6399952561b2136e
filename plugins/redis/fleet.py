"""Fleet ``redis``: every instance on the same Redis publishes its snapshot there.

Keys (named from ``[redis] outbound_stream`` by :func:`~.link.key_names`, so a configured
hash tag applies and they share the slot of every other key ms1 uses): the instances that
serve one outbound stream are one fleet.

More: docs/internals.md, ``ms1_plugins.redis.fleet``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ms1.config import Config
from ms1.errors import QueueError
from ms1.hookspecs import hookimpl
from ms1.ops.fleet import Fleet

from .leases import decode
from .link import RedisLink, consumer_name, key_names, link_for, translated

#: milliseconds the index set lives after the last publish
INDEX_TTL_MS = 3_600_000
#: the name ``[fleet] backend`` selects this fleet by
NAME = "redis"


def fleet_keys(config: Config) -> str:
    """The index key of the fleet of ``config`` (per-instance keys are ``<index>:<id>``)."""
    return f"{key_names(config)['outbound_stream']}:instances"


class RedisFleet(Fleet):
    """Snapshots of every instance on the Redis (see the module text)."""

    name = NAME

    def __init__(self, link: RedisLink, *, index: str, label: str = "") -> None:
        self.link = link
        self.index = index
        self.label = label

    def _key(self, instance_id: str) -> str:
        return f"{self.index}:{instance_id}"

    def publish(self, instance_id: str, snapshot: Mapping[str, Any], ttl: float) -> None:
        data = json.dumps(snapshot, separators=(",", ":"), default=str)
        with translated(QueueError, f"publish to {self.index}", self.link):
            pipe = self.link.client.pipeline(transaction=False)
            pipe.set(self._key(instance_id), data, px=max(1, int(ttl * 1000)))
            pipe.sadd(self.index, instance_id)
            pipe.pexpire(self.index, INDEX_TTL_MS)
            pipe.execute()

    def snapshots(self) -> list[dict[str, Any]]:
        with translated(QueueError, f"read {self.index}", self.link):
            ids = sorted(decode(member) for member in self.link.client.smembers(self.index))
            if not ids:
                return []
            pipe = self.link.client.pipeline(transaction=False)
            for instance_id in ids:
                pipe.get(self._key(instance_id))
            values = pipe.execute()
            gone = [i for i, value in zip(ids, values, strict=True) if value is None]
            if gone:
                self.link.client.srem(self.index, *gone)
        found = []
        for value in values:
            if value is None:
                continue
            try:
                snapshot = json.loads(value)
            except ValueError:
                continue  # not ours: skipped
            if isinstance(snapshot, dict):
                found.append(snapshot)
        return found

    def withdraw(self, instance_id: str) -> None:
        with translated(QueueError, f"withdraw from {self.index}", self.link):
            pipe = self.link.client.pipeline(transaction=False)
            pipe.delete(self._key(instance_id))
            pipe.srem(self.index, instance_id)
            pipe.execute()

    def close(self) -> None:
        self.link.release()


@hookimpl(specname="ms1_components")
def fleet_components() -> Sequence[tuple[str, str]]:
    """The redis plugin's fleet (declared here, next to it)."""
    return [("fleet", NAME)]


@hookimpl
def ms1_make_fleet(name: str, config: Config) -> Fleet | None:
    if name != NAME:
        return None
    return RedisFleet(link_for(config), index=fleet_keys(config),
                      label=consumer_name(config))


__all__ = ["INDEX_TTL_MS", "RedisFleet", "fleet_components", "fleet_keys", "ms1_make_fleet"]
