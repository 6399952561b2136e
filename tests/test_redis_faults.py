"""Issue 21: readiness follows whether the pipeline stores and sends, not whether Redis
answers a PING. A real redis-server refusing writes (OOM under ``maxmemory``, MISCONF
after a failed BGSAVE, ``CLIENT PAUSE WRITE``) or holding a key of the wrong type under
the inbound stream or the rate limiter's key: ``/readyz`` is 503 naming the cause within
5 s, 200 again within 5 s of the fault's end, and every invoice is delivered.

Before (the defect): ``/readyz`` said 200 "ready" through all of them — the queue's counts
(XLEN, XPENDING: reads) still came back — while the committer could store nothing or the
reader read nothing (``ms1.progress.Outage`` now carries each part's state)."""

from __future__ import annotations

import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from support import service_ini, tail, wait_until
from test_redis_durability import (
    INBOUND,
    Sim,
    enqueue,
    make_emails,
    start_service,
    start_sim,
    stop_service,
)

RATE_KEY = "ms1:rate-limit"


def readyz(address: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def config_for(tmp_path: Path, redis_url: str, sim: Sim, address: str) -> Path:
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url, ms4_url=sim.url, settings={
        "ms1": {"log_format": "text", "shutdown_timeout": 10},
        "metrics": {"address": address},
        "send": {"rate_limiter": "redis", "threads": 4}}))
    return config


def within(seconds: float, predicate: Callable[[], bool]) -> float | None:
    """How long ``predicate`` took to hold (None: not within ``seconds``)."""
    started = time.monotonic()
    if wait_until(predicate, seconds, interval=0.1):
        return time.monotonic() - started
    return None


def oom(client: Any) -> Callable[[], None]:
    client.config_set("maxmemory", "1mb")  # noeviction (the default): writes refused
    return lambda: client.config_set("maxmemory", "0")


def misconf(client: Any) -> Callable[[], None]:
    folder = client.config_get("dir")["dir"]
    client.config_set("save", "3600 1")
    client.config_set("dir", "/proc")  # the BGSAVE cannot write its file there
    client.bgsave()
    assert wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err"
                      and not client.info("persistence")["rdb_bgsave_in_progress"], 10)

    def undo() -> None:
        client.config_set("dir", folder)
        client.bgsave()
    return undo


def pause(client: Any) -> Callable[[], None]:
    client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    return lambda: client.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "named"), [
    (oom, "maxmemory"), (misconf, "MISCONF"), (pause, "no answer|Timeout")])
def test_redis_refusing_writes_makes_readyz_503_naming_it_and_loses_nothing(
        fault: Callable[[Any], Callable[[], None]], named: str,
        own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    """As in the issue: the service ready, 3,000 e-mails in the inbound stream, then the
    fault: the reader may read them (or not, a paused Redis holds its XREADGROUP), the
    committer cannot store them. (The service is stopped with SIGSTOP while they are
    written and the fault begins, so that it meets them all under the fault.)"""
    sim = start_sim(procs, tmp_path, "--latency", "0.02")
    address = f"127.0.0.1:{free_port()}"
    config = config_for(tmp_path, own_redis.url, sim, address)
    log = tmp_path / "service.log"
    client = own_redis.client()
    service = start_service(procs, config, log)
    assert wait_until(lambda: readyz(address)[0] == 200, 30), tail(log)
    path, emails = make_emails(tmp_path, 3000, invalid_every=0)
    service.send_signal(signal.SIGSTOP)
    try:
        enqueue(config, path, len(emails))
        undo = fault(client)
    finally:
        service.send_signal(signal.SIGCONT)
    try:
        took = within(10, lambda: readyz(address)[0] == 503
                      and re.search(named, readyz(address)[1]) is not None)
        status, text = readyz(address)
        print(f"\n{fault.__name__}: /readyz {status} after {took} s: {text.strip()[:200]}")
        assert took is not None and took <= 5, (status, text, tail(log))
        time.sleep(2)  # the fault holds: still not ready
        assert readyz(address)[0] == 503, readyz(address)
    finally:
        undo()
    back = within(10, lambda: readyz(address)[0] == 200)
    print(f"{fault.__name__}: /readyz 200 again {back} s after the fault ended")
    assert back is not None and back <= 5, (readyz(address), tail(log))
    assert wait_until(lambda: sim.accepted() == len(emails), 60), (sim.stats(), tail(log))
    assert service.poll() is None
    assert stop_service(service, log) == 0


@pytest.mark.slow
@pytest.mark.parametrize(("key", "named"), [
    (INBOUND, "cannot read from source"), (RATE_KEY, "rate limiter unavailable")])
def test_a_wrong_type_key_makes_readyz_503_naming_it(
        key: str, named: str, own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    sim = start_sim(procs, tmp_path, "--latency", "0.02")
    address = f"127.0.0.1:{free_port()}"
    config = config_for(tmp_path, own_redis.url, sim, address)
    log = tmp_path / "service.log"
    client = own_redis.client()
    service = start_service(procs, config, log)
    assert wait_until(lambda: readyz(address)[0] == 200, 30), tail(log)
    client.delete(key)
    client.set(key, "x")  # a string where a stream or a sorted set belongs
    if key == RATE_KEY:  # the limiter is asked when there is something to send
        path, emails = make_emails(tmp_path, 500, invalid_every=0)
        enqueue(config, path, len(emails))
    took = within(10, lambda: readyz(address)[0] == 503
                  and named in readyz(address)[1] and "WRONGTYPE" in readyz(address)[1])
    status, text = readyz(address)
    print(f"\nwrong-type {key}: /readyz {status} after {took} s: {text.strip()[:200]}")
    assert took is not None and took <= 5, (status, text, tail(log))
    client.delete(key)
    back = within(10, lambda: readyz(address)[0] == 200)
    assert back is not None and back <= 5, (readyz(address), tail(log))
    if key == INBOUND:
        path, emails = make_emails(tmp_path, 500, invalid_every=0)
        enqueue(config, path, len(emails))
    assert wait_until(lambda: sim.accepted() == len(emails), 60), (sim.stats(), tail(log))
    assert service.poll() is None
    assert stop_service(service, log) == 0
