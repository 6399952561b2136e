"""Reading MS4's refusal: which objects of the batch did it name?

A refused batch (400, 422) holds at least one object MS4 will not take. When MS4's answer
names them, the sender dead-letters exactly those, each with MS4's text for it, and sends
the rest in one request; when it names none, or cannot be trusted, the sender splits the
batch in halves as before (:meth:`ms1.pipeline.sending.sender.Sender._split`).

More: docs/internals.md, ``ms1.pipeline.sending.refusals``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ms1.config import DEFAULT_INDEX_PATTERN as DEFAULT_INDEX_PATTERN  # its option's default

#: refusals whose answer may name objects (413 is about the batch's size)
NAMING_STATUSES = frozenset({400, 422})
#: most characters of MS4's text kept for one object
OBJECT_TEXT_MAX = 1000


@dataclass(frozen=True)
class Reading:
    """What a refusal says. ``named``: index → MS4's text for that object, in index order
    (empty: the answer names nothing usable); ``problem``: why the answer is not trusted
    (None if it named nothing or was trusted)."""

    named: dict[int, str] = field(default_factory=dict)
    problem: str | None = None


class _Untrusted(Exception):
    """The answer names objects but cannot be trusted (out of range, repeated,
    contradictory)."""


@dataclass(frozen=True)
class RefusalReader:
    """Finds the objects a refusal names (see the module's docstring). Immutable: the
    senders share one, inside :class:`~ms1.pipeline.sending.sender.SendSettings`."""

    json_details: bool = True
    index_pattern: re.Pattern[str] | None = re.compile(DEFAULT_INDEX_PATTERN)

    def read(self, status: int, text: str, invoice_ids: Sequence[str]) -> Reading:
        """The objects the answer ``status``/``text`` to a batch of ``invoice_ids`` (in the
        order sent) names; ``named`` empty: split the batch in halves."""
        if status not in NAMING_STATUSES or len(invoice_ids) < 2:
            return Reading()
        try:
            body: Any = json.loads(text)
        except (ValueError, RecursionError):
            body = None
        try:
            named: list[tuple[int, str]] = []
            if self.json_details and isinstance(body, dict):
                named = _details(body, invoice_ids)
            if not named and self.index_pattern is not None:
                texts = list(_strings(body)) if isinstance(body, (dict, list, str)) \
                    else [text]
                named = [found for one in texts for found in _matches(self.index_pattern, one)]
            return Reading(_checked(named, len(invoice_ids)))
        except _Untrusted as exc:
            return Reading(problem=str(exc))


def _details(body: dict[str, Any], invoice_ids: Sequence[str]) -> list[tuple[int, str]]:
    details = body.get("details")
    if not isinstance(details, list) or not details:
        return []
    named = []
    for entry in details:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or type(index) is not int:
            raise _Untrusted(f"a detail without an integer index: {_clip(entry, 100)}")
        invoice_id = entry.get("invoice_id")
        if (isinstance(invoice_id, str) and 0 <= index < len(invoice_ids)
                and invoice_id != invoice_ids[index]):
            raise _Untrusted(f"item {index} is named as invoice {invoice_id!r}, but the batch "
                             f"holds {invoice_ids[index]!r} there")
        field_, message = entry.get("field"), entry.get("message")
        if isinstance(message, str) and isinstance(field_, str) and field_:
            what = f"{field_}: {message}"
        elif isinstance(message, str) and message:
            what = message
        else:
            what = _clip(entry, OBJECT_TEXT_MAX)
        named.append((index, what))
    return named


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys excepted, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _matches(pattern: re.Pattern[str], text: str) -> Iterator[tuple[int, str]]:
    found = list(pattern.finditer(text))
    ends = [following.start() for following in found[1:]] + [len(text)] if found else []
    for match, end in zip(found, ends, strict=True):
        what = text[match.end():end].strip().strip(";,").strip()
        yield int(match.group("index")), what or match.group(0)


def _checked(named: list[tuple[int, str]], size: int) -> dict[int, str]:
    result: dict[int, str] = {}
    for index, what in named:
        if not 0 <= index < size:
            raise _Untrusted(f"it names item {index}, outside a batch of {size} "
                             f"(indexes are 0-based)")
        if index in result:
            raise _Untrusted(f"it names item {index} twice")
        result[index] = what[:OBJECT_TEXT_MAX]
    return dict(sorted(result.items()))


def _clip(value: Any, limit: int) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:limit]
