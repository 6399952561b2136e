"""End to end through the in-memory pipeline: nothing lost, nothing doubled, limits held."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from ms1.errors import QueueError
from ms1.model import BATCH_PATH
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.pipeline.transport import MemoryTransport, Response
from ms1.runtime.components import Components
from ms1.runtime.service import COMMIT_GROUP, Service


def run_pipeline(make_config, pm, emails: list[samples.Sample], *, max_items: int = 50,
                 max_bytes: int = 1_048_576, threads: int = 4, transport=None):
    config = make_config(f"[send]\nthreads = {threads}\nretry_initial = 0.001\n"
                         "retry_max = 0.01\nrequests_per_minute = 1000000\n")
    source = MemorySource((s.data for s in emails), finite=True)
    parts = Components(source=source,
                       policy=SizeBatchPolicy(max_items, max_bytes, max_wait=3600),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport or MemoryTransport())
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(timeout=120)
    return summary, parts


def test_ten_thousand_emails_exactly_once(make_config, pm) -> None:
    emails = list(samples.generate(10_000, invalid_every=7))
    valid = [s for s in emails if s.valid]
    invalid = [s for s in emails if not s.valid]
    assert len(valid) % 50 != 0  # so the last batch must be partial

    summary, parts = run_pipeline(make_config, pm, emails)

    assert summary.ok, summary.render()
    transport = parts.transport
    assert isinstance(transport, MemoryTransport)
    delivered = Counter()
    sizes = []
    for request in transport.accepted:
        assert request.path == BATCH_PATH
        objects = json.loads(request.body)
        assert len(objects) == request.count
        sizes.append(len(objects))
        delivered.update(o["invoice_id"] for o in objects)
    # every valid invoice delivered exactly once
    assert set(delivered) == {s.invoice_id for s in valid}
    assert max(delivered.values()) == 1
    # batches never above 50; exactly one partial batch, holding the last valid invoice
    assert max(sizes) == 50
    partial = [r for r in transport.accepted if r.count < 50]
    assert len(partial) == 1
    assert partial[0].count == len(valid) % 50
    assert valid[-1].invoice_id in {o["invoice_id"] for o in json.loads(partial[0].body)}
    # every invalid one dead-lettered with its reason and message id
    dead = parts.dead_letters
    assert isinstance(dead, MemoryDeadLetters)
    letters = dead.all()
    assert len(letters) == len(invalid)
    by_message = {letter.message_id: letter for letter in letters}
    for sample in invalid:
        if sample.defect == "not_json":
            continue  # no message id can be read from a broken e-mail
        letter = by_message[sample.message_id]
        assert letter.stage == "processor" and letter.reason
        assert letter.payload == sample.data
    not_json = [letter for letter in letters if letter.message_id is None]
    assert len(not_json) == sum(1 for s in invalid if s.defect == "not_json")
    assert all(letter.reason.startswith("email: not valid JSON") for letter in not_json)
    assert all(letter.source_ref for letter in letters)
    # every inbound message was acked, each exactly once, and only once it was safe
    source = parts.source
    assert isinstance(source, MemorySource)
    assert len(source.acked) == len(emails) == len(set(source.acked))
    s = summary.stats
    assert (s["emails_read"], s["rejected"], s["invoices_delivered"]) == (
        10_000, len(invalid), len(valid))


def test_byte_limit_holds_end_to_end(make_config, pm) -> None:
    emails = list(samples.generate(2_000))
    max_bytes = 4096
    summary, parts = run_pipeline(make_config, pm, emails, max_bytes=max_bytes)
    assert summary.ok
    transport = parts.transport
    assert isinstance(transport, MemoryTransport)
    assert all(len(r.body) <= max_bytes for r in transport.accepted)
    assert max(r.count for r in transport.accepted) < 50  # bytes, not items, closed them
    assert sum(r.count for r in transport.accepted) == 2_000


def test_oversize_object_is_dead_lettered_not_sent(make_config, pm) -> None:
    emails = list(samples.generate(20))
    big = json.loads(emails[5].data)
    big["raw_json"]["vendor_name"] = "V" * 500
    emails[5] = samples.Sample(json.dumps(big).encode(), emails[5].invoice_id,
                               emails[5].message_id)
    summary, parts = run_pipeline(make_config, pm, emails, max_bytes=400)
    assert summary.ok
    dead = parts.dead_letters
    assert isinstance(dead, MemoryDeadLetters)
    [letter] = dead.all()
    assert letter.stage == "batching" and "[batch] max_bytes" in letter.reason
    assert letter.invoice_id == emails[5].invoice_id


def test_ms4_400_in_the_pipeline_isolates_bad_object(make_config, pm) -> None:
    emails = list(samples.generate(500))
    poisoned = {emails[17].invoice_id, emails[333].invoice_id}

    def ms4(request):
        ids = [o["invoice_id"] for o in json.loads(request.body)]
        bad = [i for i in ids if i in poisoned]
        return Response(400, text=f"bad object {bad[0]}") if bad else Response(202)

    summary, parts = run_pipeline(make_config, pm, emails, transport=MemoryTransport(ms4))
    assert summary.ok
    transport = parts.transport
    assert isinstance(transport, MemoryTransport)
    delivered = [o["invoice_id"] for r in transport.accepted for o in json.loads(r.body)]
    assert sorted(delivered) == sorted({s.invoice_id for s in emails} - poisoned)
    dead = parts.dead_letters
    assert isinstance(dead, MemoryDeadLetters)
    assert {letter.invoice_id for letter in dead.all()} == poisoned


class SlowQueue(MemoryQueue):
    """A queue whose store takes 20 ms a call, like a round trip to a loaded Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[int] = []

    def put_many(self, batches, source=None) -> bool:
        self.groups.append(len(batches))
        time.sleep(0.02)
        return super().put_many(batches, source)


def test_committer_stores_what_piled_up_in_one_call(make_config, pm) -> None:
    emails = list(samples.generate(3_000, invalid_every=11))
    config = make_config("[send]\nthreads = 2\nrequests_per_minute = 1000000\n")
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(10, 1_048_576, 3600), queue=SlowQueue(),
                       dead_letters=MemoryDeadLetters(), transport=MemoryTransport())
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(timeout=60)
    assert summary.ok, summary.render()
    queue = parts.queue
    assert isinstance(queue, SlowQueue)
    valid = [s for s in emails if s.valid]
    assert sum(queue.groups) == summary.stats["batches_enqueued"] == -(-len(valid) // 10)
    assert max(queue.groups) == COMMIT_GROUP  # 300 batches cannot all wait 20 ms each
    assert len(queue.groups) < len(valid) // 10 // 4
    transport = parts.transport
    assert isinstance(transport, MemoryTransport)
    delivered = [o["invoice_id"] for r in transport.accepted for o in json.loads(r.body)]
    assert sorted(delivered) == sorted(s.invoice_id for s in valid)
    source = parts.source
    assert isinstance(source, MemorySource)
    assert sorted(source.acked) == sorted(set(source.acked)) and len(source.acked) == 3_000


class OneAtATimeQueue(SlowQueue):
    """A third-party style queue whose put_many is not all-or-nothing; one put fails."""

    group_commit = False

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put_many(self, batches, source=None) -> bool:
        self.puts += 1
        if self.puts == 5:
            raise QueueError("connection lost")
        return super().put_many(batches, source)


def test_a_queue_without_group_commit_gets_one_batch_per_call_and_no_duplicate(
        make_config, pm) -> None:
    emails = list(samples.generate(1_000))
    config = make_config("[send]\nthreads = 2\nrequests_per_minute = 1000000\n")
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(10, 1_048_576, 3600), queue=OneAtATimeQueue(),
                       dead_letters=MemoryDeadLetters(), transport=MemoryTransport())
    service = Service(config, pm, parts, once=True)
    service.intake._retry_delay = 0.01
    service.start()
    summary = service.run_once(timeout=60)
    assert summary.ok, summary.render()
    queue = parts.queue
    assert isinstance(queue, OneAtATimeQueue)
    assert queue.groups == [1] * 100  # the failed call stored nothing and was retried alone
    transport = parts.transport
    assert isinstance(transport, MemoryTransport)
    delivered = [o["invoice_id"] for r in transport.accepted for o in json.loads(r.body)]
    assert sorted(delivered) == sorted(s.invoice_id for s in emails)


@pytest.mark.parametrize("threads", [1, 8])
def test_undelivered_is_reported_not_hidden(make_config, pm, threads: int) -> None:
    config = make_config(f"[send]\nthreads = {threads}\nretry_initial = 0.01\nretry_max = 0.05\n")
    emails = list(samples.generate(120))
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(50, 1_048_576, 3600), queue=MemoryQueue(),
                       dead_letters=MemoryDeadLetters(),
                       transport=MemoryTransport(lambda r: Response(503)))
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(timeout=0.5)
    assert not summary.ok
    assert summary.undelivered.invoices == 120
    assert summary.undelivered.ready + summary.undelivered.in_flight == 3
    assert "UNDELIVERED: 3 batches (120 invoices)" in summary.render()
    assert "LOST when this process exits" in summary.render()


class DownQueue(MemoryQueue):
    """A durable queue whose server goes away after ``stores`` successful stores: every
    later put and every stats() fails, as a Redis that is down does."""

    name = "down"
    durable = True
    group_commit = False  # one batch per store, so "after 2 stores" is 2 batches

    def __init__(self, stores: int = 0) -> None:
        super().__init__()
        self.stores = stores

    def put_many(self, batches, source=None) -> bool:
        if self.stores <= 0:
            raise QueueError("connection refused")
        self.stores -= 1
        return super().put_many(batches, source)

    def get(self, consumer: str, timeout: float):
        time.sleep(min(timeout, 0.05))  # never hands a batch out: MS4 never sees them
        return None

    def stats(self):
        if self.stores <= 0:
            raise QueueError("connection refused")
        return super().stats()


@pytest.mark.parametrize("stores", [0, 2])
def test_queue_down_at_the_deadline_claims_nothing_and_counts_what_was_not_stored(
        make_config, pm, caplog: pytest.LogCaptureFixture, stores: int) -> None:
    """Issue 11: the committer, unable to store before the deadline, stopped with a
    "committer died" traceback, and the summary said "UNDELIVERED: -2 batches ... (durable:
    delivered by the next run)" about batches never stored."""
    config = make_config("[send]\nthreads = 2\n")
    emails = list(samples.generate(120, invalid_every=40))
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(10, 1_048_576, 3600), queue=DownQueue(stores),
                       dead_letters=MemoryDeadLetters(), transport=MemoryTransport())
    service = Service(config, pm, parts, once=True)
    service.intake._retry_delay = 0.05
    service.start()
    summary = service.run_once(timeout=1.0)
    text = summary.render()
    assert not summary.ok
    assert summary.undelivered is None and "connection refused" in summary.queue_error
    assert "UNDELIVERED: unknown: cannot read queue 'down'" in text
    assert "-1" not in text and "-2" not in text
    stored = summary.stats.get("invoices_enqueued", 0) + summary.stats.get("rejected", 0)
    assert stored == (20 if stores else 0)  # 2 stores of 10, or none (the letters wait behind)
    assert summary.not_stored == 120 - stored
    assert f"NOT STORED: {120 - stored} e-mails" in text and "LOST when it exits" in text
    assert "died" not in caplog.text and "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    [line] = [r.getMessage() for r in caplog.records if "were not stored" in r.getMessage()]
    assert line.startswith(f"{120 - stored} e-mails read from source memory were not stored")
