"""Issue 24, the ledger's first part: every batch outcome recorded before the step that
settles it, shared through Redis, read by ``ms1-service trace``. The same contract over
the in-memory ledger and a real redis-server; then the real service against ms4-sim with
poison objects: ``trace`` shows each invoice's history under the key the sim saw."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
from support import service_ini, tail, wait_until
from test_redis_durability import (
    enqueue,
    make_emails,
    service_env,
    start_service,
    start_sim,
    stop_service,
)

from ms1.pipeline.ledger import Attempt, Ledger, LedgerEvent, MemoryLedger
from ms1_plugins.redis import RedisLink
from ms1_plugins.redis.ledger import RedisLedger

ROOT = Path(__file__).resolve().parent.parent


def test_a_batchs_history_is_traced_by_invoice_and_by_message(ledger: Ledger) -> None:
    invoices, messages = ("INV-1", "INV-2"), ("<1@x>", "<2@x>")
    now = time.time()
    ledger.record([LedgerEvent("batched", "b1", invoices, messages, ("1-0", "2-0"), at=now)])
    ledger.record([LedgerEvent(
        "accepted", "b1", invoices, messages, at=now + 1,
        attempts=(Attempt(now + 0.5, 500, 0.1, "00-b1-s1-01"),
                  Attempt(now + 0.9, 202, 0.05, "00-b1-s2-01")))])
    for id in ("INV-2", "<1@x>"):
        found = ledger.trace(id)
        assert found is not None and found.outcome == "accepted"
        assert [e.kind for e in found.events] == ["batched", "accepted"]
        assert [a.status for a in found.events[1].attempts] == [500, 202]
        assert found.events[1].attempts[1].traceparent == "00-b1-s2-01"
    assert ledger.trace("INV-9") is None


def test_a_split_chain_and_a_dead_letter_are_the_invoices_history(ledger: Ledger) -> None:
    now = time.time()
    ledger.record([LedgerEvent("batched", "b", ("A", "B"), ("<a>", "<b>"), at=now)])
    ledger.record([LedgerEvent("split", "b", ("A", "B"), at=now + 1, parts=("b1", "b2")),
                   LedgerEvent("batched", "b1", ("A",), ("<a>",), at=now + 1),
                   LedgerEvent("batched", "b2", ("B",), ("<b>",), at=now + 1)])
    ledger.record([LedgerEvent("dead_lettered", "b1", ("A",), ("<a>",), at=now + 2,
                               detail="400 bad currency")])
    ledger.record([LedgerEvent("accepted", "b2", ("B",), ("<b>",), at=now + 2)])
    a = ledger.trace("A")
    assert a is not None and a.outcome == "dead_lettered"
    assert [(e.kind, e.batch_id) for e in a.events] == [
        ("batched", "b"), ("split", "b"), ("batched", "b1"), ("dead_lettered", "b1")]
    assert a.events[-1].detail == "400 bad currency"
    b = ledger.trace("<b>")
    assert b is not None and b.outcome == "accepted" and "b1" not in {
        e.batch_id for e in b.events}


def test_retention_forgets_old_records(redis_url: str) -> None:
    """A record lives as long as the retention (plus the day being written): every key
    carries it as its time to live, so nothing else is ever touched."""
    link = RedisLink(redis_url).use()
    ledger = RedisLedger(link, key="t:ledger", retention_days=0.5)
    ledger.record([LedgerEvent("batched", "b1", ("INV-1",), ("<1>",))])
    client = link.client
    keys = [k.decode() for k in client.keys("t:ledger:*")]
    assert keys and all(0 < client.ttl(k) <= int(1.5 * 86400) for k in keys)
    memory = MemoryLedger(retention_days=1)
    memory.record([LedgerEvent("batched", "old", ("INV-1",), at=time.time() - 2 * 86400)])
    assert memory.trace("INV-1") is None
    ledger.close()


def test_a_hostile_record_is_skipped_not_an_error(redis_url: str) -> None:
    link = RedisLink(redis_url).use()
    ledger = RedisLedger(link, key="t:ledger", retention_days=30)
    ledger.record([LedgerEvent("batched", "b1", ("INV-1",))])
    link.client.rpush("t:ledger:b:b1", b"\xff not json", b'{"kind": "x"}', b"[]")
    found = ledger.trace("INV-1")
    assert found is not None and [e.kind for e in found.events] == ["batched"]
    ledger.close()


def trace(config: Path, id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "trace",
                           id, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False, env=service_env())


@pytest.mark.slow
def test_trace_shows_what_ms4_sim_saw_for_every_invoice(
        own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    """500 e-mails through the real service on Redis to ms4-sim, which refuses every
    50th-by-hash invoice: for every invoice ``trace`` says accepted under the key the sim
    accepted it under, or dead-lettered with the sim's text; an unknown id exits 1."""
    sim = start_sim(procs, tmp_path, "--reject-every", "50")
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(own_redis.url, ms4_url=sim.url,
                                  settings={"ms1": {"log_format": "text"}}))
    path, emails = make_emails(tmp_path, 500, invalid_every=0)
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    enqueue(config, path, len(emails))
    refused = {s.invoice_id for s in emails if zlib.crc32(s.invoice_id.encode()) % 50 == 0}
    assert refused, "the seed data must hold objects the sim refuses"
    assert wait_until(lambda: sim.accepted() == len(emails) - len(refused), 60), tail(log)
    assert stop_service(service, log) == 0
    accepted_list = json.loads(urllib.request.urlopen(f"{sim.url}/accepted", timeout=5).read())
    keys_by_invoice = {i: r["idempotency_key"] for r in accepted_list
                       for i in r["invoice_ids"] if r["answer"] == "202"}
    ledger = RedisLedger(RedisLink(own_redis.url).use(), key="ms1:ledger", retention_days=30)
    first_refused = next(s for s in emails if s.invoice_id in refused)
    for sample in emails[::25] + [s for s in emails if s.invoice_id in refused]:
        if sample in (emails[0], first_refused):  # as the command prints it
            shown = trace(config, sample.invoice_id, "--json")
            assert shown.returncode == 0, shown.stderr
            record = json.loads(shown.stdout)
        else:  # the same record, without a process per invoice
            found = ledger.trace(sample.invoice_id)
            assert found is not None
            record = {"outcome": found.outcome, "events": [e.as_dict() for e in found.events]}
        if sample.invoice_id in refused:
            assert record["outcome"] == "dead_lettered", record
            assert "rejected by sim" in record["events"][-1]["detail"], record
        else:
            assert record["outcome"] == "accepted", record
            accepted = [e for e in record["events"] if e["kind"] == "accepted"]
            assert accepted[-1]["idempotency_key"] == keys_by_invoice[sample.invoice_id]
            assert accepted[-1]["attempts"][-1]["status"] == 202
            assert accepted[-1]["attempts"][-1]["traceparent"].split("-")[1] == \
                keys_by_invoice[sample.invoice_id]
    ledger.close()
    text = trace(config, emails[0].invoice_id)
    assert text.returncode == 0 and "accepted" in text.stdout and "Idempotency-Key" in text.stdout
    unknown = trace(config, "INV-NOT-THERE")
    assert unknown.returncode == 1
    assert "INV-NOT-THERE: not found (retention 30 days)" in unknown.stdout


@pytest.mark.slow
def test_after_poison_a_401_spell_dropped_answers_and_two_kills_the_ledger_is_ms4s_log(
        own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    """Issue 24's acceptance run: 3,000 e-mails (1 in 100 not an invoice) through the real
    service on Redis to ms4-sim, which refuses 1 object in 50, drops 5 % of its 202s and
    answers 401 for a spell; the service is killed -9 twice. Then, for every invoice, the
    ledger says what the sim's own log says — accepted under a key the sim accepted it
    under, or dead-lettered with the sim's text — and ``reconcile`` balances exactly."""
    from support import sim_control
    from test_redis_durability import DEAD_LETTERS, cli, streams_drained, write_config

    sim = start_sim(procs, tmp_path, "--reject-every", "50", "--drop", "0.05",
                    "--latency", "0.03")
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url)
    with config.open("a") as ini:  # a probe a second ends the 401 spell quickly
        ini.write("\n[ledger]\nreconcile_interval = 0\n")
    text = config.read_text().replace("[send]\n", "[send]\nauth_probe_interval = 1\n", 1)
    config.write_text(text)
    path, emails = make_emails(tmp_path, 3_000, invalid_every=100)
    valid = [e for e in emails if e.valid]
    refused = {e.invoice_id for e in valid if zlib.crc32(e.invoice_id.encode()) % 50 == 0}
    assert refused and len(valid) < len(emails)
    started = time.time()
    enqueue(config, path, len(emails))
    client = own_redis.client()
    log = tmp_path / "service-0.log"
    service = start_service(procs, config, log)
    for n, share in enumerate((0.25, 0.5, 0.75), start=1):
        assert wait_until(lambda s=share: sim.accepted() >= s * len(valid), 90,
                          interval=0.01), tail(log)
        if n == 1:  # a 401 spell: every sender stops; it lasts until 3 probes were refused
            sim_control(sim.url, fail_401=1.0)
            assert wait_until(lambda: sim.stats()["requests_by_status"].get("401", 0) >= 3,
                              30), tail(log)
            sim_control(sim.url, fail_401=0.0)
            continue
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        log = tmp_path / f"service-{n}.log"
        service = start_service(procs, config, log)
    invalid = len(emails) - len(valid)
    assert wait_until(lambda: sim.accepted() >= len(valid) - len(refused)
                      and streams_drained(client)
                      and client.xlen(DEAD_LETTERS) >= invalid + len(refused), 120), tail(log)
    assert wait_until(lambda: b"ready" in log.read_bytes(), 30), tail(log)
    assert stop_service(service, log) == 0
    stats = sim.stats()
    assert stats["requests_by_status"].get("401", 0) > 0, stats
    requests = json.loads(urllib.request.urlopen(f"{sim.url}/accepted", timeout=5).read())
    assert any(request["answer"] == "dropped" for request in requests)
    keys: dict[str, set[str]] = {}  # every key MS4 accepted an invoice under
    for request in requests:
        for invoice in request["invoice_ids"]:
            keys.setdefault(invoice, set()).add(request["idempotency_key"])
    ledger = RedisLedger(RedisLink(own_redis.url).use(), key="ms1:ledger", retention_days=30)
    try:
        for email in valid:
            found = ledger.trace(email.invoice_id)
            assert found is not None, email.invoice_id
            if email.invoice_id in refused:
                assert found.outcome == "dead_lettered", found
                assert "rejected by sim" in found.events[-1].detail, found
                assert email.invoice_id not in keys
                continue
            assert found.outcome == "accepted", found
            accepted = [e for e in found.events if e.kind == "accepted"]
            assert {e.batch_id for e in accepted} <= keys[email.invoice_id], found
            assert accepted[-1].attempts[-1].status == 202
            assert accepted[-1].attempts[-1].traceparent.split("-")[1] in keys[email.invoice_id]
    finally:
        ledger.close()
    shown = cli(config, "reconcile", "--since", f"{time.time() - started + 60:.0f}s", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    summary = json.loads(shown.stdout)
    print(f"\nms4-sim {stats['requests_by_status']}; reconcile {summary}")
    assert summary == {**summary, "read": len(emails), "rejected": invalid,
                       "accepted": len(valid) - len(refused), "dead_lettered": len(refused),
                       "pending": 0, "unexplained": 0, "balanced": True}
    shown = cli(config, "reconcile", "--since", "1h", "--csv")
    rows = shown.stdout.splitlines()
    assert shown.returncode == 0 and rows[0] == "email,invoice_id,read_at,outcome"
    assert len(rows) == len(emails) + 1
    # retention is each ledger key's time to live; nothing else ms1 keeps has one
    for key in client.scan_iter("ms1:*"):
        ttl = client.ttl(key)
        if key.startswith(b"ms1:ledger:"):
            assert 0 < ttl <= 31 * 86400, key
        elif client.type(key) == b"stream":
            assert ttl == -1, key
