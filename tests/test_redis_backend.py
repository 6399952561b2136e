"""The Redis backend against a real redis-server: takeover, recovery, atomicity, the shared
limiter, authentication, errors, malformed entries, argument bounds. (fakeredis is not
used: it is wrong about XAUTOCLAIM cursors and delivery counts.)"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pluggy
import pytest
import redis
from conftest import RedisServer

from ms1.config import CORE_OPTIONS, Config
from ms1.errors import QueueError
from ms1.model import BATCH_PATH, Batch, DeadLetter, Item
from ms1.pipeline import samples
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.replay import replay
from ms1.pipeline.transport import MemoryTransport
from ms1.runtime.components import Components
from ms1.runtime.service import COMMIT_GROUP, Service, Summary
from ms1_plugins.redis import (
    RedisDeadLetters,
    RedisLink,
    RedisQueue,
    RedisRateLimiter,
    RedisSource,
    redact_url,
)


def batch(n: int, size: int = 3) -> Batch:
    items = [Item(b'{"invoice_id":"%d-%d"}' % (n, k), f"{n}-{k}", f"<{n}-{k}>", "")
             for k in range(size)]
    return Batch.of(BATCH_PATH, items)


def queue(url: str, consumer: str, visibility: float = 30) -> RedisQueue:
    return RedisQueue(RedisLink(url).use(), stream="t:out", group="g", consumer=consumer,
                      visibility_timeout=visibility, block_timeout=0.05)


def source(url: str, consumer: str = "c", delete: bool = True) -> RedisSource:
    return RedisSource(RedisLink(url).use(), stream="t:in", group="g", consumer=consumer,
                       visibility_timeout=30, delete_acked=delete)


def test_entry_of_a_dead_consumer_is_taken_over_after_the_visibility_timeout(redis_url
                                                                             ) -> None:
    dead = queue(redis_url, "dead", visibility=1)
    dead.put(batch(1))
    held = dead.get("s", timeout=1)
    assert held is not None
    dead.link.release()  # the process dies: no ack, no heartbeat
    alive = queue(redis_url, "alive", visibility=1)
    assert alive.get("s", timeout=0.1) is None  # not idle long enough yet
    deadline = time.monotonic() + 5
    taken = None
    while taken is None and time.monotonic() < deadline:
        taken = alive.get("s", timeout=0.2)
    assert taken is not None and taken.batch.id == held.batch.id
    assert taken.attempts == 2
    alive.ack(taken)
    assert alive.stats().empty
    alive.close()


def test_every_batch_of_a_dead_consumer_is_taken_over_at_once(redis_url) -> None:
    """A killed instance held 20 batches (senders + prefetch): they come back together once
    idle past the visibility timeout, not one per claim interval (the chaos test saw 14
    batches come back 1.5 s apart; 5 s apart at the production visibility timeout)."""
    dead = queue(redis_url, "dead", visibility=2)
    for n in range(20):
        dead.put(batch(n))
    dead.link.client.xreadgroup("g", "dead", {"t:out": ">"}, count=20)  # held, never acked
    dead.link.release()  # kill -9
    alive = queue(redis_url, "alive", visibility=2)
    taken: list = []
    first = None
    deadline = time.monotonic() + 20
    while len(taken) < 20 and time.monotonic() < deadline:
        got = alive.get("s", timeout=0.2)
        if got is not None:
            first = first or time.monotonic()
            taken.append(got)
    assert len(taken) == 20, f"only {len(taken)} of 20 taken over in 20 s"
    assert first is not None and time.monotonic() - first < 1.0
    assert all(d.attempts == 2 for d in taken)
    for d in taken:
        alive.ack(d)
    assert alive.stats().empty
    alive.close()


def test_claimed_but_not_yet_handed_out_entries_are_refreshed_too(redis_url) -> None:
    """Entries claimed in one page wait in this instance until a sender takes them: the
    heartbeat refreshes them meanwhile, so no other instance takes them over as well."""
    dead = queue(redis_url, "dead", visibility=1.5)
    for n in range(6):
        dead.put(batch(n))
    dead.link.client.xreadgroup("g", "dead", {"t:out": ">"}, count=6)
    dead.link.release()
    slow = queue(redis_url, "slow", visibility=1.5)
    deadline = time.monotonic() + 10
    first = None
    while first is None and time.monotonic() < deadline:
        first = slow.get("s", timeout=0.2)  # claims all six, hands out one
    assert first is not None
    other = queue(redis_url, "other", visibility=1.5)
    until = time.monotonic() + 4  # well past the visibility timeout
    while time.monotonic() < until:
        assert other.get("s", timeout=0.2) is None
    rest = [slow.get("s", timeout=0.2) for _ in range(5)]
    assert all(d is not None for d in rest)
    for d in [first, *rest]:
        assert d is not None
        slow.ack(d)
    assert slow.stats().empty
    for q in (slow, other):
        q.close()


def test_restarted_instance_first_rereads_its_own_pending(redis_url) -> None:
    first = queue(redis_url, "host-a")
    for n in range(3):
        first.put(batch(n))
    held = [first.get("s", timeout=1) for _ in range(2)]
    first.link.release()  # kill -9: two batches pending for host-a
    second = queue(redis_url, "host-a")  # same consumer name after restart
    again = [second.get("s", timeout=1) for _ in range(3)]
    assert [d.batch.id for d in again if d][:2] == [d.batch.id for d in held if d]
    assert all(d is not None for d in again)
    for d in again:
        assert d is not None
        second.ack(d)
    assert second.stats().empty
    second.close()


def test_heartbeat_keeps_a_slow_batch_from_being_taken_over(redis_url) -> None:
    slow = queue(redis_url, "slow", visibility=1.2)
    slow.put(batch(1))
    held = slow.get("s", timeout=1)
    assert held is not None
    other = queue(redis_url, "other", visibility=1.2)
    deadline = time.monotonic() + 3  # 2.5 x the visibility timeout
    while time.monotonic() < deadline:
        assert other.get("s", timeout=0.2) is None
    slow.ack(held)
    slow.close()
    other.close()


def test_enqueue_acks_the_inbound_entries_in_the_same_transaction(redis_url) -> None:
    src = source(redis_url)
    out = RedisQueue(src.link.use(), stream="t:out", group="g", consumer="c",
                     visibility_timeout=30, block_timeout=0.05)
    src.push([b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
    messages = src.read(10, timeout=0.5)
    assert len(messages) == 3
    items = [Item(b"{}", f"i{k}", "m", m.ref) for k, m in enumerate(messages)]
    assert out.put(Batch.of(BATCH_PATH, items), src) is True  # acked atomically
    client = src.link.client
    assert client.xlen("t:in") == 0
    assert client.xpending("t:in", "g")["pending"] == 0
    assert client.xlen("t:out") == 1
    out.close()
    src.close()


def test_dead_letters_ack_the_inbound_entry_atomically_and_list_and_remove(redis_url) -> None:
    src = source(redis_url, delete=False)
    dead = RedisDeadLetters(src.link.use(), stream="t:dead")
    src.push([b"not json"])
    [message] = src.read(10, timeout=0.5)
    letter = DeadLetter(reason="email: not valid JSON", stage="processor", payload=b"not json",
                        source_ref=message.ref)
    assert dead.add([letter], src) is True
    assert src.link.client.xpending("t:in", "g")["pending"] == 0
    assert src.link.client.xlen("t:in") == 1  # delete_acked_inbound = no keeps the entry
    [stored] = dead.list()
    assert (stored.reason, stored.payload, stored.source_ref) == (
        letter.reason, b"not json", message.ref)
    assert dead.list(ids=[stored.id]) == [stored]
    assert dead.remove([stored.id]) == 1 and dead.count() == 0
    dead.close()
    src.close()


def test_source_rereads_unacked_entries_after_restart(redis_url) -> None:
    first = source(redis_url, consumer="a")
    first.push([b"1", b"2"])
    assert len(first.read(10, timeout=0.5)) == 2
    first.link.release()  # died with the e-mails in an open batch, unacked
    second = source(redis_url, consumer="a")
    assert [m.data for m in second.read(10, timeout=0.5)] == [b"1", b"2"]
    second.close()


@pytest.mark.alone
@pytest.mark.xdist_group("measure")
def test_shared_rate_limit_holds_across_instances(redis_url) -> None:
    limit, window = 10, 0.6
    limiters = [RedisRateLimiter(RedisLink(redis_url).use(), key="t:rl", limit=limit,
                                 window=window, lease=5) for _ in range(3)]
    ends: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + 2.0

    def worker(limiter: RedisRateLimiter) -> None:
        while time.monotonic() < stop:
            token, wait = limiter.try_acquire()
            if token is None:
                time.sleep(min(wait, 0.05))
                continue
            time.sleep(0.005)  # the request
            limiter.finish(token)
            with lock:
                ends.append(time.monotonic())

    threads = [threading.Thread(target=worker, args=(lim,)) for lim in limiters for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ends.sort()
    busiest = max(sum(1 for e in ends if start <= e < start + window) for start in ends)
    assert busiest <= limit
    assert len(ends) >= limit * 3  # it does let requests through: ~2 s / 0.6 s windows
    for lim in limiters:
        lim.close()


def test_slot_of_a_dead_process_expires_with_its_lease(redis_url) -> None:
    limiter = RedisRateLimiter(RedisLink(redis_url).use(), key="t:rl2", limit=1, window=0.2,
                               lease=0.3)
    token, _ = limiter.try_acquire()
    assert token is not None  # ... and the process dies before finish()
    assert limiter.try_acquire()[0] is None
    time.sleep(0.55)  # lease + window
    assert limiter.try_acquire()[0] is not None
    limiter.close()


def test_password_url_works_and_is_never_shown(tmp_path) -> None:
    server = RedisServer(tmp_path, password="s3cret-pw").start()
    try:
        q = queue(server.url, "c")
        q.put(batch(1))
        assert q.stats().ready == 1
        assert "s3cret-pw" not in repr(q.describe()) and "s3cret-pw" not in q.link.url
        q.close()
        wrong = queue(server.url.replace("s3cret-pw", "nope"), "c")
        with pytest.raises(QueueError) as info:
            wrong.put(batch(2))
        assert "nope" not in str(info.value) and "***" in str(info.value)
        wrong.close()
    finally:
        server.stop()


def test_redact_url() -> None:
    assert redact_url("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_unreachable_redis_is_a_queue_error_naming_the_url() -> None:
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    q = RedisQueue(RedisLink(url, connect_timeout=0.5).use(), stream="s", group="g",
                   consumer="c", visibility_timeout=30, block_timeout=0.05)
    started = time.monotonic()
    with pytest.raises(QueueError, match=f"take a batch: ConnectionError.*{url}"):
        q.get("s", timeout=0.1)
    assert time.monotonic() - started < 3
    q.close()


def test_replay_batches_objects_and_reprocesses_emails() -> None:
    store = MemoryDeadLetters()
    good_email = json.dumps({"message_id": "<m>", "raw_json": {
        "invoice_id": "R1", "vendor_name": "V", "invoice_date": "2025-01-02",
        "total_amount": 5, "currency": "EUR"}}).encode()
    store.add([
        DeadLetter(reason="400", stage="ms4", payload=b'{"invoice_id":"A"}', invoice_id="A"),
        DeadLetter(reason="400", stage="ms4", payload=b'{"invoice_id":"B"}', invoice_id="B"),
        DeadLetter(reason="was broken", stage="processor", payload=good_email),
        DeadLetter(reason="bad", stage="processor", payload=b"still not json"),
        DeadLetter(reason="no 'email' field", stage="source", payload=b'{"mail": "x"}'),
        DeadLetter(reason="not an ms1 batch", stage="queue", payload=b'{"junk": "y"}'),
    ])
    out = MemoryQueue()
    result = replay(store, out, ids=None, max_items=2, max_bytes=10_000)
    assert (result.replayed, result.batches) == (3, 2)
    assert [letter_id for letter_id, _ in result.still_invalid] == ["4", "5", "6"]
    assert "raw source entry" in dict(result.still_invalid)["5"]
    assert [letter.id for letter in store.all()] == ["4", "5", "6"]
    got = []
    while (d := out.get("x", timeout=0)) is not None:
        got.extend(d.batch.invoice_ids)
    assert got == ["A", "B", "R1"]


def test_enqueue_retried_after_a_lost_reply_adds_nothing_twice(redis_url) -> None:
    src = source(redis_url)
    out = RedisQueue(src.link.use(), stream="t:out", group="g", consumer="c",
                     visibility_timeout=30, block_timeout=0.05)
    src.push([b"a", b"b"])
    refs = [m.ref for m in src.read(10, timeout=0.5)]
    b = Batch.of(BATCH_PATH, [Item(b"{}", f"i{k}", "m", ref) for k, ref in enumerate(refs)])
    out.put(b, src)
    out.put(b, src)  # the same call again, as after "Connection closed" on EXEC's reply
    assert src.link.client.xlen("t:out") == 1
    out.close()
    src.close()


def test_put_many_acks_every_batch_inbound_atomically_and_once(redis_url) -> None:
    src = source(redis_url)
    out = RedisQueue(src.link.use(), stream="t:out", group="g", consumer="c",
                     visibility_timeout=30, block_timeout=0.05)
    src.push([b"e%d" % k for k in range(9)])
    refs = [m.ref for m in src.read(10, timeout=0.5)]
    batches = [Batch.of(BATCH_PATH, [Item(b'{"n":%d}' % k, f"i{k}", "m", refs[k])
                                     for k in range(start, start + 3)])
               for start in (0, 3, 6)]
    assert out.put(batches[0], src) is True
    # the group holds a batch already stored (its refs acked): only the others are added
    assert out.put_many(batches, src) is True
    client = src.link.client
    assert client.xlen("t:out") == 3
    assert client.xpending("t:in", "g")["pending"] == 0 and client.xlen("t:in") == 0
    assert out.put_many(batches, src) is True  # retried after a lost reply: adds nothing
    assert client.xlen("t:out") == 3
    got = [out.get("s", timeout=1) for _ in range(3)]
    assert [d.batch.id for d in got if d] == [b.id for b in batches]
    out.close()
    src.close()


def test_finish_retried_after_a_lost_reply_adds_the_halves_once(redis_url) -> None:
    q = queue(redis_url, "c")
    whole = batch(1, size=4)
    q.put(whole)
    delivery = q.get("s", timeout=1)
    assert delivery is not None
    halves = whole.split()
    q.replace(delivery, halves)
    q.replace(delivery, halves)  # retried: the original is already acked
    assert q.link.client.xlen("t:out") == 2
    q.close()


def test_own_held_entries_are_not_handed_out_again_when_they_look_idle(redis_url) -> None:
    q = queue(redis_url, "c", visibility=1)
    q.put(batch(1))
    held = q.get("s", timeout=1)
    assert held is not None
    # as after an outage longer than the visibility timeout: the heartbeat could not run
    q.link.client.xclaim("t:out", "g", "c", 0, [held.token], idle=60_000, justid=True)
    q._claimer.claim_soon()
    assert q.get("s", timeout=0.2) is None
    q.ack(held)
    q.close()


def test_scripts_are_reloaded_when_redis_lost_its_script_cache(redis_url) -> None:
    q = queue(redis_url, "c")
    q.put(batch(1))
    q.link.client.script_flush()  # as after a Redis restart
    q.put(batch(2))
    delivery = q.get("s", timeout=1)
    assert delivery is not None
    q.link.client.script_flush()
    q.ack(delivery)
    assert q.link.client.xlen("t:out") == 1
    q.close()


def test_more_threads_than_pooled_connections_wait_for_one_rather_than_fail(
        redis_url) -> None:
    """A connection is held for one command only: 24 threads share a pool of 2 (a busy
    pool makes a caller wait, it does not raise 'No connection available')."""
    link = RedisLink(redis_url, max_connections=2, connect_timeout=0.5, socket_timeout=0.5)
    limiter = RedisRateLimiter(link.use(), key="t:rl3", limit=1_000_000, window=1, lease=5)
    errors: list[Exception] = []
    done = []

    def work() -> None:
        try:
            for _ in range(50):
                token, _ = limiter.try_acquire()
                assert token is not None
                limiter.finish(token)
            done.append(1)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(done) == 24
    assert len(link.client.connection_pool._connections) <= 2
    limiter.close()
    link.use().release()


def test_a_connection_killed_by_the_server_is_replaced_by_the_next_command(redis_url) -> None:
    q = queue(redis_url, "c")
    q.put(batch(1))
    q.link.client.client_kill_filter(_type="normal", skipme=False)
    deadline = time.monotonic() + 5
    stats = None
    while stats is None and time.monotonic() < deadline:
        try:  # at most the command on the killed connection fails; the next one reconnects
            stats = q.stats()
        except QueueError as exc:
            assert "ConnectionError" in str(exc)
    assert stats is not None and stats.ready == 1
    q.close()


def test_unix_socket_url_works(tmp_path) -> None:
    """No TCP keepalive on a unix socket (redis-py refuses the option there)."""
    import subprocess

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        q = queue(f"unix://{sock}?db=0", "c")
        deadline = time.monotonic() + 10
        while not q.link.ping():
            assert time.monotonic() < deadline, "redis-server on a unix socket did not start"
            time.sleep(0.05)
        q.put(batch(1))
        delivery = q.get("s", timeout=1)
        assert delivery is not None
        q.ack(delivery)
        assert q.stats().empty
        q.close()
    finally:
        proc.kill()
        proc.wait(10)


# --- malformed entries are set aside one by one -----------------------------------------


def raw_fields(payload: bytes) -> dict[bytes, bytes]:
    """The fields of a set-aside entry, back from its dead letter's payload."""
    def value(item: Any) -> bytes:
        return base64.b64decode(item["base64"]) if isinstance(item, dict) else item.encode()

    return {value(name): value(data) for name, data in json.loads(payload)["fields"]}


GOOD_FIELDS = {b"id": b"x", b"path": BATCH_PATH.encode(), b"payloads": b"{}",
               b"invoice_ids": b'["a"]', b"message_ids": b'["m"]', b"created_at": b"1.0"}
JUNK = {
    "missing-field": {b"id": b"x", b"path": BATCH_PATH.encode()},
    "bad-json": {**GOOD_FIELDS, b"invoice_ids": b"[not json"},
    "binary": {b"\xff\xfe": b"\x00\x81\xff", b"payloads": b"\xc3\x28"},
    # issue 11: wrong types inside an entry that has every field
    "ids-not-strings": {**GOOD_FIELDS, b"invoice_ids": b"[1]"},
    "ids-not-a-list": {**GOOD_FIELDS, b"invoice_ids": b'{"a": "b"}'},
    "ids-a-string": {**GOOD_FIELDS, b"message_ids": b'"m"'},
    "count-mismatch": {**GOOD_FIELDS, b"invoice_ids": b'["a", "b"]'},
    "more-payloads": {**GOOD_FIELDS, b"payloads": b"{}\n{}"},
    "empty-payloads": {**GOOD_FIELDS, b"payloads": b""},
    "payload-not-an-object": {**GOOD_FIELDS, b"payloads": b"[1]"},
    "deeply-nested-json": {**GOOD_FIELDS, b"invoice_ids": b"[" * 50_000},
    "created-at-nan": {**GOOD_FIELDS, b"created_at": b"nan"},
    "refs-not-strings": {**GOOD_FIELDS, b"refs": b"[null]"},
    "id-binary": {**GOOD_FIELDS, b"id": b"\xff"},
    "unknown-path": {**GOOD_FIELDS, b"path": b"/elsewhere"},
}


@pytest.mark.parametrize("kind", sorted(JUNK))
def test_a_malformed_outbound_entry_is_set_aside_and_the_rest_of_its_read_delivered(
        redis_url, kind) -> None:
    """8 batches and, in the middle, an entry that is no batch, all fetched by one
    prefetching XREADGROUP: the 8 go out at once, the other becomes a dead letter with its
    raw fields and the reason, and the outbound stream ends up empty."""
    q = RedisQueue(RedisLink(redis_url).use(), stream="t:out", group="g", consumer="c",
                   visibility_timeout=30, block_timeout=0.05, prefetch=8,
                   dead_letter_stream="t:dead")
    good = [batch(n) for n in range(8)]
    for b in good[:4]:
        q.put(b)
    junk_id = q.link.client.xadd("t:out", JUNK[kind]).decode()
    for b in good[4:]:
        q.put(b)
    delivered: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + 5

    def sender(name: str) -> None:
        while time.monotonic() < deadline:
            with lock:
                if len(delivered) >= len(good):
                    return
            try:
                d = q.get(name, timeout=0.1)
            except QueueError as exc:  # a real sender backs off and tries again
                errors.append(str(exc))
                continue
            if d is not None:
                with lock:
                    delivered.append(d.batch.id)
                q.ack(d)

    threads = [threading.Thread(target=sender, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(delivered) == sorted(b.id for b in good), errors
    assert errors == []
    client = q.link.client
    drained = time.monotonic() + 5
    while client.xlen("t:out") and time.monotonic() < drained:
        time.sleep(0.02)
    assert client.xlen("t:out") == 0 and client.xpending("t:out", "g")["pending"] == 0
    [letter] = RedisDeadLetters(q.link.use(), stream="t:dead").list()
    assert letter.stage == "queue" and letter.source_ref == junk_id
    assert "not an ms1 batch" in letter.reason
    assert raw_fields(letter.payload) == JUNK[kind]
    q.close()


def test_source_hands_out_a_malformed_entry_with_its_problem_and_the_rest_as_usual(
        redis_url) -> None:
    src = source(redis_url)
    client = src.link.client
    ids = [client.xadd("t:in", fields).decode() for fields in (
        {b"email": b"1"}, {b"mail": b"2"}, {b"\xff\xfe": b"\x00\x80"}, {b"email": b"3"})]
    messages = src.read(10, timeout=0.5)
    assert [m.ref for m in messages] == ids
    assert [m.data for m in messages if m.problem is None] == [b"1", b"3"]
    odd = [m for m in messages if m.problem is not None]
    assert [raw_fields(m.data) for m in odd] == [{b"mail": b"2"}, {b"\xff\xfe": b"\x00\x80"}]
    assert all("no 'email' field" in (m.problem or "") for m in odd)
    src.close()


def test_source_decodes_every_inbound_shape_in_one_place(redis_url, caplog) -> None:
    """Issue 11: an entry with fields besides ``email`` of which one is named in binary is
    set aside with all of them; a non-UTF-8 ``email`` goes to the processor as it is; one
    larger than the source's bound is set aside unparsed, its e-mail kept as the payload
    (clipped by the store). Issue 21: one with text-named fields besides ``email`` (an
    ingestor's trace id) is an e-mail (it was a dead letter), each name said once."""
    caplog.set_level(logging.INFO)
    src = RedisSource(RedisLink(redis_url).use(), stream="t:in", group="g", consumer="c",
                      visibility_timeout=30, delete_acked=True, max_email_bytes=1000)
    client = src.link.client
    shapes: list[dict[bytes, bytes]] = [
        {b"email": b"1"},
        {b"email": b"2", b"extra": b"x", b"\xff": b"y"},
        {b"email": b"\xff\xfe{not utf-8"},
        {b"email": b"x" * 1001},
        {b"email": b"x" * 1000},
        {b"email": b"3", b"trace": b"abc"},
        {b"email": b"4", b"trace": b"def"},
    ]
    ids = [client.xadd("t:in", fields).decode() for fields in shapes]
    messages = src.read(10, timeout=0.5)
    assert [m.ref for m in messages] == ids
    ok, extra, binary, big, edge, traced, traced_again = messages
    assert (ok.data, ok.problem) == (b"1", None)
    assert extra.problem is not None and raw_fields(extra.data) == shapes[1]
    assert "not text" in extra.problem and "'extra'" in extra.problem
    assert "'\\xff'" in extra.problem
    assert (binary.data, binary.problem) == (shapes[2][b"email"], None)
    assert big.problem is not None and big.data == shapes[3][b"email"]
    assert "1001 bytes" in big.problem and "1000" in big.problem
    assert (edge.data, edge.problem) == (shapes[4][b"email"], None)
    assert [(m.data, m.problem) for m in (traced, traced_again)] == [(b"3", None), (b"4", None)]
    assert sum("'trace'" in r.getMessage() for r in caplog.records) == 1  # said once
    src.close()


def test_a_non_utf8_email_is_dead_lettered_with_its_bytes_intact(
        make_config, pm, redis_server, redis_url) -> None:
    emails = [s.data for s in samples.generate(20, invalid_every=0)]
    bad = b'\xff{"message_id": "<bin>", "raw_json": {}}\x00\x81'

    def push(client: Any) -> None:
        for data in [*emails[:10], bad, *emails[10:]]:
            client.xadd("ms1:emails", {"email": data})

    summary, parts, letters = run_once(pm, redis_config(make_config, redis_url), push, 30)
    assert summary.ok, summary.render()
    assert len(delivered_invoices(parts)) == 20
    [letter] = letters
    assert letter.stage == "processor" and letter.payload == bad
    assert letter.reason.startswith("email: not UTF-8")


def test_redis_dead_letters_are_clipped_and_keep_size_and_hash(redis_url) -> None:
    import hashlib

    store = RedisDeadLetters(RedisLink(redis_url).use(), stream="t:dead")
    store.max_payload_bytes = 4096
    big = b"\xfe" * 5_000_000
    store.add([DeadLetter(reason="r", stage="processor", payload=big, at=2.0),
               DeadLetter(reason="s", stage="processor", payload=b"\xfe", at=2.0)])
    clipped, small = store.list()
    assert clipped.payload == big[:4096] and clipped.payload_size == len(big)
    assert clipped.payload_sha256 == hashlib.sha256(big).hexdigest()
    assert "clipped" in clipped.reason
    assert (small.payload, small.payload_size, small.payload_sha256) == (b"\xfe", None, None)
    store.close()


def test_a_huge_malformed_outbound_entry_is_set_aside_clipped(redis_url) -> None:
    q = RedisQueue(RedisLink(redis_url).use(), stream="t:out", group="g", consumer="c",
                   visibility_timeout=30, block_timeout=0.05, dead_letter_stream="t:dead",
                   max_payload_bytes=2048)
    q.link.client.xadd("t:out", {b"junk": b"j" * 3_000_000})
    assert q.get("s", timeout=0.2) is None
    [letter] = RedisDeadLetters(q.link.use(), stream="t:dead").list()
    assert len(letter.payload) <= 2048 and letter.payload_size is not None
    assert letter.payload_size > 3_000_000 and letter.payload_sha256
    assert "not an ms1 batch" in letter.reason and "clipped" in letter.reason
    assert q.link.client.xlen("t:out") == 0
    q.close()


def redis_config(make_config: Callable[[str], Config], url: str, *, max_items: int = 50,
                 read_chunk: int = 500) -> Config:
    return make_config(f"""\
        [source]
        name = redis
        read_chunk = {read_chunk}
        [queue]
        backend = redis
        [dead_letters]
        backend = redis
        [batch]
        max_items = {max_items}
        max_bytes = 104857600
        max_wait = 0.2
        [send]
        threads = 4
        retry_initial = 0.01
        retry_max = 0.05
        requests_per_minute = 1000000
        [ms4]
        transport = memory
        [redis]
        url = {url}
        consumer = t
        block_timeout = 0.05
        """)


def run_once(pm: pluggy.PluginManager, config: Config, push: Callable[[Any], None],
             timeout: float) -> tuple[Summary, Components, list[DeadLetter]]:
    """The service in this process, once, on what ``push(client)`` put in the inbound
    stream; its parts are closed afterwards (the dead letters are listed first)."""
    parts = Components.build(pm, config)
    try:
        assert isinstance(parts.source, RedisSource)
        push(parts.source.link.client)
        service = Service(config, pm, parts, once=True)
        service.start()
        summary = service.run_once(timeout)
        letters = parts.dead_letters.list(limit=10_000)
    finally:
        parts.close()
    return summary, parts, letters


def delivered_invoices(parts: Components) -> list[str]:
    assert isinstance(parts.transport, MemoryTransport)
    return [o["invoice_id"] for r in parts.transport.accepted for o in json.loads(r.body)]


def test_inbound_entries_without_an_email_field_become_dead_letters_with_raw_fields(
        make_config, pm, redis_server, redis_url) -> None:
    emails = [s.data for s in samples.generate(120, invalid_every=0)]
    odd = [{b"mail": b"hello"}, {b"\xff\xfe": b"\x00\x80", b"other": b"x"}]
    odd_ids: list[str] = []

    def push(client: Any) -> None:
        for data in emails[:60]:
            client.xadd("ms1:emails", {"email": data})
        odd_ids.extend(client.xadd("ms1:emails", fields).decode() for fields in odd)
        for data in emails[60:]:
            client.xadd("ms1:emails", {"email": data})

    summary, parts, letters = run_once(pm, redis_config(make_config, redis_url), push, 30)
    assert summary.ok, summary.render()
    assert sorted(delivered_invoices(parts)) == sorted(
        s.invoice_id for s in samples.generate(120, invalid_every=0))
    assert [(x.stage, x.source_ref) for x in letters] == [("source", i) for i in odd_ids]
    assert [raw_fields(x.payload) for x in letters] == odd
    assert all("no 'email' field" in x.reason for x in letters)
    client = redis_server.client()
    assert client.xlen("ms1:emails") == 0 and client.xpending("ms1:emails", "ms1")["pending"] == 0
    client.close()


def max_items_bound() -> int:
    [option] = [o for o in CORE_OPTIONS if (o.section, o.key) == ("batch", "max_items")]
    assert option.max is not None
    return int(option.max)


def test_batches_at_the_largest_max_items_are_stored_and_acked(
        make_config, pm, redis_server, redis_url) -> None:
    """[batch] max_items at its maximum, Redis source and queue: every batch is stored
    with its inbound entries acked (a batch's refs once passed Lua's unpack limit)."""
    max_items = max_items_bound()
    count = 4 * max_items + 7
    emails = [s.data for s in samples.generate(count, invalid_every=0)]

    def push(client: Any) -> None:
        for start in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for data in emails[start:start + 1000]:
                pipe.xadd("ms1:emails", {"email": data})
            pipe.execute()

    config = redis_config(make_config, redis_url, max_items=max_items, read_chunk=5000)
    summary, parts, _ = run_once(pm, config, push, 30)
    assert summary.ok, summary.render()
    assert len(delivered_invoices(parts)) == count
    assert summary.stats["batches_enqueued"] == 5
    client = redis_server.client()
    assert client.xlen("ms1:emails") == 0 and client.xlen("ms1:outbound") == 0
    client.close()


# --- no script call carries more than a few thousand arguments -------------------------

MAX_ARGS = 4_100  # the bound (4,000) plus one group's own overhead


def script_calls(client: Any) -> list[int]:
    """Arguments of every EVALSHA Redis logged (the slow log, set to log every command,
    keeps 31 arguments and says how many more there were)."""
    counts = []
    for entry in client.slowlog_get(100_000):
        command = entry["command"]
        if not command.upper().startswith((b"EVALSHA", b"EVAL ")):
            continue
        more = re.search(rb"\.\.\. \((\d+) more arguments\)$", command)
        counts.append(31 + int(more.group(1)) if more else len(command.split(b" ")))
    return counts


def log_every_command(server: RedisServer) -> Any:
    client = server.client()
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()
    return client


def test_a_full_commit_group_of_the_largest_batches_goes_in_bounded_script_calls(
        own_redis) -> None:
    src = RedisSource(RedisLink(own_redis.url).use(), stream="t:in", group="g",
                      consumer="c", visibility_timeout=30, delete_acked=True)
    out = RedisQueue(src.link.use(), stream="t:out", group="g", consumer="c",
                     visibility_timeout=30, block_timeout=0.05)
    size = max_items_bound()
    src.push([b"e%d" % k for k in range(COMMIT_GROUP * size)])
    refs: list[str] = []
    while len(refs) < COMMIT_GROUP * size:
        refs += [m.ref for m in src.read(5000, timeout=0.5)]
    batches = [Batch.of(BATCH_PATH, [Item(b'{"n":%d}' % k, f"i{k}", "m", refs[k])
                                     for k in range(start, start + size)])
               for start in range(0, len(refs), size)]
    client = log_every_command(own_redis)
    assert out.put_many(batches, src) is True
    calls = script_calls(client)
    assert len(calls) > 1 and max(calls) <= MAX_ARGS, calls
    assert client.xlen("t:out") == COMMIT_GROUP and client.xlen("t:in") == 0
    assert client.xpending("t:in", "g")["pending"] == 0
    assert out.put_many(batches, src) is True  # retried as after a lost reply: adds nothing
    assert client.xlen("t:out") == COMMIT_GROUP
    client.close()
    out.close()
    src.close()


def test_dead_letters_of_a_whole_read_chunk_go_in_bounded_script_calls(own_redis) -> None:
    src = RedisSource(RedisLink(own_redis.url).use(), stream="t:in", group="g",
                      consumer="c", visibility_timeout=30, delete_acked=True)
    dead = RedisDeadLetters(src.link.use(), stream="t:dead")
    src.push([b"bad %d" % k for k in range(5000)])
    messages = src.read(5000, timeout=0.5)
    assert len(messages) == 5000
    letters = [DeadLetter(reason="email: not valid JSON", stage="processor", payload=m.data,
                          source_ref=m.ref) for m in messages]
    client = log_every_command(own_redis)
    assert dead.add(letters, src) is True
    calls = script_calls(client)
    assert max(calls) <= MAX_ARGS, calls
    assert dead.count() == 5000 and client.xlen("t:in") == 0
    assert client.xpending("t:in", "g")["pending"] == 0
    assert [x.payload for x in dead.list(limit=5000)] == [m.data for m in messages]
    assert dead.add(letters, src) is True  # retried: adds nothing
    assert dead.count() == 5000
    client.close()
    dead.close()
    src.close()


def test_describe_gives_length_pending_and_consumers(redis_url) -> None:
    q = queue(redis_url, "c")
    assert q.describe() == {"stream": "t:out", "length": 0, "consumers": []}  # no group yet
    q.put(batch(1))
    q.put(batch(2))
    assert q.get("s", timeout=1) is not None  # the other one is prefetched: held too
    info = q.describe()
    assert (info["length"], info["group"], info["pending"]) == (2, "g", 2)
    assert [(c["name"], c["pending"]) for c in info["consumers"]] == [("c", 2)]
    q.close()


def test_nogroup_inside_a_pipeline_makes_the_groups_again(redis_url: str) -> None:
    """redis-py words a pipeline's error "Command # 1 (XCLAIM ...) of pipeline caused
    error: NOGROUP ...": the heartbeat's refresh must still make ms1 create its groups
    again (only an error starting with NOGROUP did)."""
    from ms1_plugins.redis.leases import Held, ensure_group
    from ms1_plugins.redis.link import RedisLink

    link = RedisLink(redis_url).use()
    try:
        ensure_group(link, "ng:stream", "g")
        entry = link.client.xadd("ng:stream", {"f": "v"})
        link.client.xreadgroup("g", "c", {"ng:stream": ">"}, count=1)
        held = Held(link, "ng:stream", "g", "c")
        held.add([entry.decode()])
        link.client.xgroup_destroy("ng:stream", "g")  # as a failover can lose it
        with pytest.raises(QueueError, match="NOGROUP"):
            held.refresh()
        assert ("ng:stream", "g") not in link.groups
        ensure_group(link, "ng:stream", "g")  # and it is made again
        assert link.client.xinfo_groups("ng:stream")[0]["name"] == b"g"
    finally:
        link.release()


def test_a_user_without_info_still_gets_its_writes_replicated(redis_url: str) -> None:
    """An ACL user may lack INFO (it is in @dangerous): whether the primary has WAITAOF
    is then unknown and ms1 sends WAIT, rather than failing every replicated write (the
    submit, the batch ack) for good."""
    from ms1_plugins.redis.link import RedisLink

    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("ms1-noinfo", enabled=True, passwords=["+pw-noinfo"], keys=["*"],
                      commands=["+@all", "-info"])
    user_url = redis_url.replace("redis://", "redis://ms1-noinfo:pw-noinfo@")
    link = RedisLink(user_url, min_replicas=1, replica_timeout=0.05).use()
    try:
        replies, acked = link.replicated(lambda pipe: pipe.set("noinfo:key", "v"))
        assert replies == [True] and acked == 0  # no replica here: WAIT answers 0
        assert not link.uses_waitaof
    finally:
        link.release()
        admin.acl_deluser("ms1-noinfo")
        admin.close()


@pytest.mark.parametrize(("error", "lasting_"), [
    (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     True),
    (redis.ResponseError("Command # 1 (EVALSHA a 2 k s) of pipeline caused error: WRONGTYPE "
                         "Operation against a key holding the wrong kind of value"), True),
    (redis.exceptions.NoPermissionError("this user has no permissions to run the 'evalsha' "
                                        "command"), True),
    (redis.ResponseError("Command # 1 (EVALSHA a 2 k s) of pipeline caused error: The user "
                         "executing the script can't run this command or subcommand"), True),
    (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), False),
    (redis.ResponseError("Command # 1 (EVALSHA a 2 k s) of pipeline caused error: READONLY "
                         "You can't write against a read only replica."), False),
    (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), False),
    (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), False),
    (redis.ResponseError("MASTERDOWN Link with MASTER is down"), False),
    (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), False),
    (redis.ConnectionError("Connection refused"), False),
    (redis.TimeoutError("Timeout reading from socket"), False),
])
def test_lasting_tells_a_refusal_no_wait_clears_from_a_passing_one(
        error: BaseException, lasting_: bool) -> None:
    """``submit`` stops retrying on a lasting refusal only; an outage, a failover's
    READONLY, a full memory or missing replicas may pass."""
    from ms1.errors import SourceError
    from ms1_plugins.redis.link import lasting

    try:
        raise SourceError("submit 1 e-mails") from error
    except SourceError as wrapped:
        assert lasting(wrapped) is lasting_
        assert lasting(error) is lasting_
