"""Dead letters back on the outbound path (``dlq replay``, the console's replay): MS4
objects batched as they are, raw e-mails through the processor again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ms1.errors import Ms1Error
from ms1.model import Item
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger, LedgerEvent
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.processor import Accepted, unified_email_processor

#: dead-letter stages that hold a backend's raw entry, never replayed
RAW_ENTRY_STAGES = frozenset({"source", "queue"})


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: letters put back as batches, and letters still invalid (kept)."""

    replayed: int
    batches: int
    still_invalid: list[tuple[str, str]]  # (letter id, reason)


def replay(store: DeadLetterStore, queue: QueueBackend, *, ids: Sequence[str] | None,
           max_items: int, max_bytes: int,
           on_progress: Callable[[int, int], None] | None = None,
           ledger: Ledger | None = None) -> ReplayResult:
    """Put dead letters back on the outbound path, then remove them from ``store``.

    MS4 objects (stages ``ms4`` and ``batching``) are batched as they are; raw e-mails
    (stage ``processor``) go through the processor again and stay dead letters, with the
    new reason reported, if they are still invalid. Entries set aside by a backend because
    they were not an e-mail or a batch at all (stages ``source`` and ``queue``: their raw
    fields) are never replayed: they are kept and reported. A crash between enqueueing
    and removing leaves a letter both queued and dead-lettered (a duplicate, never a loss).
    ``on_progress(replayed, to_replay)`` is called before the first batch and after each.
    Each batch is recorded in ``ledger`` (``replayed``) before it is queued.
    """
    letters = store.list(limit=2**31, ids=ids)
    policy = SizeBatchPolicy(max_items=max_items, max_bytes=max_bytes, max_wait=0)
    batches = []
    still_invalid: list[tuple[str, str]] = []
    for letter in letters:
        if letter.malformed:
            still_invalid.append((letter.id, f"a malformed dead letter ({letter.malformed}): "
                                  "inspect it with dlq list --json, then fix or remove it"))
            continue
        if letter.stage in RAW_ENTRY_STAGES:
            still_invalid.append((letter.id, f"a raw {letter.stage} entry, not an e-mail or "
                                  f"an MS4 object ({letter.reason}); fix it at its origin"))
            continue
        if letter.payload_size is not None:  # only the start of it is kept
            still_invalid.append((letter.id, f"payload clipped ({letter.payload_size} bytes, "
                                  f"sha256 {letter.payload_sha256}): resend it from its origin"))
            continue
        if letter.stage == "processor":
            result = unified_email_processor(letter.payload)
            if not isinstance(result, Accepted):
                still_invalid.append((letter.id, result.reason))
                continue
            item = Item(result.payload, result.invoice_id, result.message_id, letter.id)
        else:
            item = Item(letter.payload, letter.invoice_id or "", letter.message_id or "",
                        letter.id)
        batches.extend(policy.add(item))
    last = policy.flush()
    if last is not None:
        batches.append(last)
    replayed = 0
    to_replay = sum(len(batch.refs) for batch in batches)
    if on_progress is not None:
        on_progress(0, to_replay)
    for batch in batches:
        if ledger is not None:  # read on any day the retention covers: read_after 0
            ledger.record([LedgerEvent("replayed", batch.id, batch.invoice_ids,
                                       batch.message_ids, batch.refs, read_after=0.0)])
        try:
            queue.put(batch)
        except Ms1Error as exc:  # not queued: still dead letters, as the ledger must say
            if ledger is not None:
                with contextlib.suppress(Ms1Error):
                    ledger.record([LedgerEvent(
                        "dead_lettered", batch.id, batch.invoice_ids, batch.message_ids,
                        batch.refs, detail=f"replay failed: {exc}"[:1000], read_after=0.0)])
            raise
        replayed += store.remove(batch.refs)
        if on_progress is not None:
            on_progress(replayed, to_replay)
    return ReplayResult(replayed, len(batches), still_invalid)
