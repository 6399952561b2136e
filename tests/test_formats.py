"""Issue 22: two versions on one Redis — a rolling upgrade, in both orders, under load.

Every entry ms1 writes carries its format (field ``v``); an outbound batch of a newer
format than this version reads is left untouched — pending, never acked, dead-lettered
or dropped — logged once at CRITICAL, and ``/readyz`` answers 503 naming it until a newer
instance has taken it. Today the "other version" is a fixture writing format 2 (what
the next major release may write); from the next release on it is the previous release,
installed from its git revision.

Before (the defect): an entry of any unknown shape was set aside as a dead letter "not an
ms1 batch" — during a rolling upgrade the older instance would have dead-lettered the
newer one's batches."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from support import tail, wait_until
from test_redis_durability import enqueue, make_emails, start_service, start_sim, stop_service
from test_redis_faults import config_for, readyz

from ms1.model import ENTRY_FORMAT
from ms1.pipeline.deadletters import decode_letter

pytestmark = pytest.mark.slow

OUTBOUND, DEAD = "ms1:outbound", "ms1:dead-letters"
FUTURE = ENTRY_FORMAT + 1


def write_future_batches(client: Any, count: int) -> list[str]:
    """``count`` outbound entries as a newer ms1 might write them: format 2, a field this
    version does not know, the payloads in a new layout."""
    ids = []
    for n in range(count):
        payloads = [{"invoice_id": f"FUT-{n}-{k}"} for k in range(10)]
        ids.append(client.xadd(OUTBOUND, {
            "v": str(FUTURE), "id": f"future-{n}", "path": "/batch-metadata",
            "body": json.dumps(payloads), "trace": "00-abc-def-01"}).decode())
    return ids


def group_exists(client: Any) -> bool:
    try:
        return any(g["name"] == b"ms1" for g in client.xinfo_groups(OUTBOUND))
    except Exception:
        return False


@pytest.mark.parametrize("order", ["newer-joins-a-running-older", "older-starts-among-newer"])
def test_an_older_and_a_newer_version_on_one_redis_lose_nothing(
        order: str, own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    client = own_redis.client()
    sim = start_sim(procs, tmp_path, "--latency", "0.02")
    address = f"127.0.0.1:{free_port()}"
    config = config_for(tmp_path, own_redis.url, sim, address)
    log = tmp_path / "service.log"
    path, emails = make_emails(tmp_path, 3000, invalid_every=0)
    future: list[str] = []
    if order == "older-starts-among-newer":
        future = write_future_batches(client, 20)
    service = start_service(procs, config, log)
    enqueue(config, path, len(emails))  # the load: 3,000 e-mails, 60 batches
    if order == "newer-joins-a-running-older":
        assert wait_until(lambda: sim.accepted() >= 500, 30), tail(log)
        future = write_future_batches(client, 20)
    # the older instance delivers everything it can read ...
    assert wait_until(lambda: sim.accepted() == len(emails), 90), (sim.stats(), tail(log))
    # ... and says, within the queue watch's pace, that it holds entries it cannot read
    assert wait_until(lambda: readyz(address)[0] == 503, 15), (readyz(address), tail(log))
    _, body = readyz(address)
    assert "newer format" in body and "format 2" in body, body
    text = log.read_text(errors="replace")
    critical = [line for line in text.splitlines() if " CRITICAL " in line]
    assert len(critical) == len(future), critical  # once per entry, however often seen
    # nothing of the newer version's is lost: every entry still there, none acked, none
    # dead-lettered
    assert all(client.xrange(OUTBOUND, entry, entry) for entry in future)
    pending = client.xpending_range(OUTBOUND, "ms1", "-", "+", 100)
    assert {p["message_id"].decode() for p in pending} == set(future)
    letters = [decode_letter(lambda k, f=f: f.get(k.encode()), f.get(b"payload", b""), i)
               for i, f in client.xrange(DEAD)]
    assert letters == [], letters[:3]
    assert sim.stats()["unique_invoices_accepted"] == len(emails)  # no future one sent
    # the newer instance takes its entries (claims, sends, acks them): ready again
    for entry in future:
        client.xack(OUTBOUND, "ms1", entry)
        client.xdel(OUTBOUND, entry)
    assert wait_until(lambda: readyz(address)[0] == 200, 15), (readyz(address), tail(log))
    assert stop_service(service, log) == 0
    print(f"\n{order}: {len(emails)} delivered, {len(future)} newer entries left untouched "
          f"({time.strftime('%H:%M:%S')})")


def test_stored_entries_carry_their_format(own_redis: Any, tmp_path: Path) -> None:
    """What this version writes says which format it is."""
    from ms1.model import Batch, DeadLetter
    from ms1_plugins.redis import RedisLink, RedisQueue
    from ms1_plugins.redis.deadletters import letter_fields

    queue = RedisQueue(RedisLink(own_redis.url).use(), stream="f:out", group="g",
                       consumer="c", visibility_timeout=30, block_timeout=0.05)
    try:
        queue.put(Batch("/batch-metadata", (b'{"a":1}',), ("i",), ("m",)))
        ((_, fields),) = own_redis.client().xrange("f:out")
        assert fields[b"v"] == str(ENTRY_FORMAT).encode()
    finally:
        queue.close()
    assert letter_fields(DeadLetter(reason="r", stage="s", payload=b"p"))["v"] == "1"


def test_a_dead_letter_of_a_newer_format_is_shown_as_such_and_kept() -> None:
    fields = {b"v": b"2", b"reason": b"r", b"stage": b"ms4", b"payload": b"{}", b"at": b"1"}
    letter = decode_letter(lambda k: fields.get(k.encode()), b"{}", "1-0")
    assert letter.malformed is not None and "format 2, newer" in letter.malformed
