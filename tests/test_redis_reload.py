"""Reload on a real Redis, with the service, the MS4 simulator and redis-server each in its
own process: raising ``[send] threads`` mid-run needs no connection more than the pool has
(connections are held for one command, never kept by a thread)."""

from __future__ import annotations

import re
import signal
import time

import pytest
from test_redis_durability import (
    INBOUND,
    OUTBOUND,
    enqueue,
    make_emails,
    start_service,
    start_sim,
    stop_service,
    tail,
    wait_until,
    write_config,
    xlen,
)

pytestmark = pytest.mark.slow


def test_raising_send_threads_on_reload_from_4_to_32_loses_nothing(own_redis, tmp_path,
                                                                   procs) -> None:
    """20,000 e-mails; shared Redis rate limiter, source and queue; SIGHUP raises the
    senders from 4 to 32 mid-run. No pool error ("No connection available"), nothing lost,
    no duplicate, no takeover."""
    sim = start_sim(procs, tmp_path, "--latency", "0.04")
    config = tmp_path / "ms1.ini"
    write_config(config, sim_url=sim.url, redis_url=own_redis.url, threads=4)
    path, emails = make_emails(tmp_path, 20_000, invalid_every=0)
    enqueue(config, path, len(emails))
    client = own_redis.client()
    log = tmp_path / "service.log"
    started = time.monotonic()
    service = start_service(procs, config, log)
    assert wait_until(lambda: b"ready" in log.read_bytes(), 30), tail(log)
    assert wait_until(lambda: sim.accepted() >= 2_000, 60, interval=0.02), tail(log)
    before = sim.accepted()
    reload_at = time.monotonic() - started
    write_config(config, sim_url=sim.url, redis_url=own_redis.url, threads=32)
    service.send_signal(signal.SIGHUP)
    assert wait_until(lambda: b"configuration reloaded" in log.read_bytes(), 10), tail(log)
    finished = wait_until(lambda: sim.accepted() >= len(emails)
                          and xlen(client, INBOUND) == 0 and xlen(client, OUTBOUND) == 0,
                          90, interval=0.1)
    elapsed = time.monotonic() - started
    assert service.poll() is None, f"the service exited {service.returncode}:\n{tail(log)}"
    status = stop_service(service, log)
    stats = sim.stop()
    text = log.read_text(errors="replace")
    print(f"\nreload at {reload_at:.1f} s with {before}/{len(emails)} accepted; "
          f"accepted {stats['unique_invoices_accepted']}, lost "
          f"{len(emails) - stats['unique_invoices_accepted']}, duplicates "
          f"{stats['duplicate_invoices']}, requests {stats['requests_by_status']}, "
          f"HTTP connections {stats['connections_opened']}, elapsed {elapsed:.1f} s")
    assert finished, f"not done 90 s after the start: {stats}\n{tail(log)}"
    assert status == 0, tail(log)
    assert not re.search(r"No connection available|ConnectionError|pool", text), tail(log, 60)
    assert "took over" not in text, tail(log, 60)
    assert "cannot" not in text, tail(log, 60)
    assert stats["unique_invoices_accepted"] == len(emails)
    assert stats["duplicate_invoices"] == 0
    assert stats["connections_opened"] > 16  # one per sender thread: the 32 did send
    client.close()
