"""Storing entries and acking the inbound e-mails they came from, in one atomic step.

More: docs/internals.md, ``ms1_plugins.redis.commit``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ms1.pipeline.source import Source

from .link import Fields, RedisLink
from .source import RedisSource

#: most arguments of one script call (a single larger group goes alone)
MAX_SCRIPT_ARGS = 4_000
#: entries to XADD together, and the inbound refs whose ack they stand for
EntryGroup = tuple[Sequence[Fields], Sequence[str]]
Arg = bytes | str | int


def inbound_of(source: Source | None, link: RedisLink) -> RedisSource | None:
    """``source`` if it is a Redis source on the same client (so acks can be atomic)."""
    if isinstance(source, RedisSource) and source.link is link:
        return source
    return None


def store(link: RedisLink, stream: str, groups: Sequence[EntryGroup],
          inbound: RedisSource | None) -> int:
    """XADD each group's entries to ``stream`` and ack the group's refs at ``inbound``,
    atomically per call (without ``inbound`` the refs are ignored: the caller acks them
    where they came from). Returns how many groups were added (a group an earlier call
    stored is not). Raises redis-py's errors: callers translate them."""
    if inbound is None:
        groups = [(entries, ()) for entries, _ in groups]
    keys = [stream, inbound.stream if inbound is not None else stream]
    head: list[Arg] = [inbound.group if inbound is not None else "",
                       1 if inbound is not None and inbound.delete else 0]
    added = 0
    for call in _calls(groups):
        args = [*head, len(call)]
        for packed in call:
            args += packed
        added += int(link.script("enqueue", keys, args, replicate=True))
    if inbound is not None:
        inbound.forget([ref for _, refs in groups for ref in refs])
    return added


def pack_entries(entries: Sequence[Fields]) -> list[Arg]:
    """Entries as the scripts read them: n entries, then per entry: 2*n, field, value..."""
    args: list[Arg] = [len(entries)]
    for fields in entries:
        args.append(len(fields) * 2)
        for key, value in fields.items():
            args += (key, value)
    return args


def _pack(group: EntryGroup) -> list[Arg]:
    """A group as enqueue.lua reads it: n refs, refs..., then its entries."""
    entries, refs = group
    return [len(refs), *refs, *pack_entries(entries)]


def _calls(groups: Sequence[EntryGroup]) -> Iterator[list[list[Arg]]]:
    """The packed groups, in order, cut into calls of at most MAX_SCRIPT_ARGS arguments."""
    call: list[list[Arg]] = []
    size = 0
    for group in groups:
        packed = _pack(group)
        if call and size + len(packed) > MAX_SCRIPT_ARGS:
            yield call
            call, size = [], 0
        call.append(packed)
        size += len(packed)
    if call:
        yield call
