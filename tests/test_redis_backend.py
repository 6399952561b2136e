"""The Redis backend against a real redis-server: takeover, recovery, atomicity, the shared
limiter, authentication, errors. (fakeredis is not used: it is wrong about XAUTOCLAIM
cursors and delivery counts.)"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import RedisServer

from ms1.admin import replay
from ms1.deadletters import MemoryDeadLetters
from ms1.errors import QueueError
from ms1.model import BATCH_PATH, Batch, DeadLetter, Item
from ms1.outbound import MemoryQueue
from ms1_plugins.redis_backend import (
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
    ])
    out = MemoryQueue()
    result = replay(store, out, ids=None, max_items=2, max_bytes=10_000)
    assert (result.replayed, result.batches) == (3, 2)
    assert [letter_id for letter_id, _ in result.still_invalid] == ["4"]
    assert [letter.id for letter in store.all()] == ["4"]
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


def test_a_thread_s_own_connection_goes_back_to_the_pool_when_the_thread_ends(
        redis_url) -> None:
    link = RedisLink(redis_url, max_connections=2, connect_timeout=0.5, socket_timeout=0.5)
    replies = []
    for _ in range(6):  # more threads than connections, one after the other
        thread = threading.Thread(target=lambda: replies.append(link.command("PING")))
        thread.start()
        thread.join(5)
    assert replies == [b"PONG"] * 6 or replies == ["PONG"] * 6
    link.use().release()


def test_a_connection_broken_mid_command_is_dropped_and_the_next_call_reconnects(
        redis_url) -> None:
    link = RedisLink(redis_url)
    assert link.command("CLIENT", "SETNAME", "victim") in (b"OK", "OK")
    link.client.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(Exception) as failed:
        link.command("PING")
    assert "Connection" in type(failed.value).__name__ or "closed" in str(failed.value)
    assert link.command("PING") in (b"PONG", "PONG")
    link.use().release()
