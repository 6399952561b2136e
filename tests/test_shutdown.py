"""Shutdown within its deadline, whatever MS4 or Redis do (issue 12), through the real
service as a subprocess: SIGTERM while MS4 hangs or Redis is frozen exits 0 within
``shutdown_timeout`` + 2 s and a restart delivers everything; ``--once`` drains on
SIGTERM (exit 1, the summary says what is left); a second SIGINT exits at once."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RedisServer, free_port
from test_http_transport import Server
from test_watchdog import (
    config_file,
    enqueue,
    hang,
    running,
    serve,  # noqa: F401 - fixture
    stop,
    tail,
    wait_until,
)

from ms1.pipeline import samples

pytestmark = pytest.mark.slow
SHUTDOWN_TIMEOUT = 2.0
BOUND = SHUTDOWN_TIMEOUT + 2.0


@pytest.fixture
def sim() -> Iterator[Callable[..., str]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                                 "--rate-limit", "0", "--api-key", "k", *args],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        return proc.stdout.readline().split()[-1]

    yield start
    for proc in procs:
        proc.terminate()
        proc.communicate(timeout=10)


def accepted(url: str) -> int:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
        return int(json.loads(answer.read())["unique_invoices_accepted"])


def deliver_the_rest(tmp_path: Path, sim_url: str, redis_url: str, count: int) -> None:
    """Restart with a working MS4 (--once): every e-mail is delivered."""
    config = config_file(tmp_path, ms4_url=sim_url, redis_url=redis_url)
    log = tmp_path / "restart.log"
    with running(config, log, "--once") as service:
        assert service.wait(timeout=60) == 0, tail(log)
    assert accepted(sim_url) == count, tail(log)


def test_sigterm_while_ms4_hangs_exits_0_in_time_and_nothing_is_lost(
        tmp_path: Path, redis_url: str, serve: Callable[..., Server],  # noqa: F811
        sim: Callable[..., str]) -> None:
    server = serve(hang)
    config = config_file(tmp_path, ms4_url=server.url, redis_url=redis_url,
                         shutdown_timeout=SHUTDOWN_TIMEOUT)
    emails = enqueue(config, tmp_path, 40)
    log = tmp_path / "service.log"
    with running(config, log) as service:
        assert wait_until(lambda: server.request_count() == 2, 20), tail(log)
        code, took = stop(service)
    print(f"SIGTERM to exit with MS4 hanging: {took:.2f} s")
    assert code == 0 and took <= BOUND, tail(log)
    deliver_the_rest(tmp_path, sim(), redis_url, len(emails))


def test_sigterm_while_redis_is_frozen_exits_0_in_time_and_nothing_is_lost(
        tmp_path: Path, own_redis: RedisServer, sim: Callable[..., str]) -> None:
    url = sim("--latency", "0.3")
    # socket_timeout longer than the whole bound: no Redis call may be waited out
    config = config_file(tmp_path, ms4_url=url, redis_url=own_redis.url, threads=1,
                         shutdown_timeout=SHUTDOWN_TIMEOUT, socket_timeout=8)
    emails = enqueue(config, tmp_path, 60)
    log = tmp_path / "service.log"
    with running(config, log) as service:
        assert wait_until(lambda: accepted(url) >= 10, 20), tail(log)
        with own_redis.frozen():
            code, took = stop(service)
    print(f"SIGTERM to exit with Redis frozen: {took:.2f} s")
    assert code == 0 and took <= BOUND, tail(log)
    assert "Traceback" not in log.read_text()
    deliver_the_rest(tmp_path, url, own_redis.url, len(emails))


def test_sigterm_while_a_console_request_waits_on_a_frozen_redis_exits_in_time(
        tmp_path: Path, own_redis: RedisServer, sim: Callable[..., str]) -> None:
    """The console's running requests get what is left of the bound, not 3 s more: a
    request for the dead letters, stuck on a frozen Redis, does not hold the exit."""
    url = sim()
    port = free_port()
    config = config_file(tmp_path, ms4_url=url, redis_url=own_redis.url, threads=1,
                         shutdown_timeout=SHUTDOWN_TIMEOUT, socket_timeout=8,
                         extra=f"[console]\naddress = 127.0.0.1:{port}\n")
    emails = enqueue(config, tmp_path, 20)
    log = tmp_path / "service.log"

    def ask() -> None:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/dead-letters", timeout=30):
            pass

    stuck = threading.Thread(target=ask, daemon=True)
    with running(config, log) as service:
        assert wait_until(lambda: accepted(url) >= len(emails), 20), tail(log)
        with own_redis.frozen():
            stuck.start()
            stuck.join(1.0)  # a bound, not the synchronisation: it must still be waiting
            assert stuck.is_alive()
            code, took = stop(service)
    print(f"SIGTERM to exit with a console request on a frozen Redis: {took:.2f} s")
    assert code == 0 and took <= BOUND, tail(log)


def test_once_drains_on_sigterm_and_exits_1_saying_what_is_left(
        tmp_path: Path, serve: Callable[..., Server]) -> None:  # noqa: F811
    server = serve(hang)
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(100, invalid_every=0)))
    config = config_file(tmp_path, ms4_url=server.url, redis_url="redis://127.0.0.1:1/0",
                         source="files", queue="memory", shutdown_timeout=SHUTDOWN_TIMEOUT)
    log = tmp_path / "service.log"
    with running(config, log, "--once", str(data), stdout=subprocess.PIPE) as service:
        assert wait_until(lambda: server.request_count() == 2, 20), tail(log)
        code, took = stop(service)
        assert service.stdout is not None
        summary = service.stdout.read().decode()
    print(f"--once: SIGTERM to exit: {took:.2f} s\n{summary}")
    assert code == 1 and took <= BOUND, tail(log)
    assert "received SIGTERM: draining" in log.read_text()
    assert "e-mails read: 100" in summary
    assert "UNDELIVERED: 10 batches (100 invoices)" in summary
    assert "INTERRUPTED" in summary


def test_a_second_sigint_exits_at_once_and_nothing_is_lost(
        tmp_path: Path, redis_url: str, serve: Callable[..., Server],  # noqa: F811
        sim: Callable[..., str]) -> None:
    server = serve(hang)
    config = config_file(tmp_path, ms4_url=server.url, redis_url=redis_url,
                         shutdown_timeout=20)
    emails = enqueue(config, tmp_path, 40)
    log = tmp_path / "service.log"
    with running(config, log, "--once") as service:
        assert wait_until(lambda: server.request_count() == 2, 20), tail(log)
        service.send_signal(signal.SIGINT)
        assert wait_until(lambda: "received SIGINT: draining" in log.read_text(), 5), tail(log)
        code, took = stop(service, signal.SIGINT)
    print(f"second SIGINT to exit: {took:.2f} s")
    assert code == 130 and took <= 1.0, tail(log)
    assert "second SIGINT" in log.read_text()
    deliver_the_rest(tmp_path, sim(), redis_url, len(emails))
