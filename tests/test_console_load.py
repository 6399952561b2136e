"""200 idle connections to the console while the service delivers: delivery is not slowed
and the process never runs out of file descriptors.

The real service (``python -m ms1.cli``: Redis source, queue and dead letters, console on)
sends to ``ms4-sim`` with 0.2 s latency and 4 senders, so delivery is bound by MS4's
latency, not by CPU: a console that stalled the process (the GIL, a blocked accept loop)
or starved it of descriptors would show. Rounds of 1,600 e-mails, each one's delivery rate
measured at the sim (first to last accepted invoice): a warm-up, then alternately without
the idle connections and with 200 of them open (3 rounds without, 2 with: the machine's
noise hits both). Asserted: the median with the connections is >= 90 % of the median
without.

With ``RLIMIT_NOFILE`` lowered to 160 the 200 connections could not all be held next to
the pipeline's own descriptors: the console takes only what its budget allows (the rest
wait in the listen backlog), the service's open descriptors stay below the limit's
reserve, no "Too many open files" anywhere, and once the clients go the console answers
again. Without the lowered limit, all 200 are held (``[console] max_connections = 300``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from conftest import free_port
from support import service_ini, tail, wait_until

from ms1.ops.metrics import fd_reserve
from ms1.pipeline import samples

# alone: 0.74 once in CI with the rest of the suite beside it on 2 cores (0.93-1.07 alone)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("measure"), pytest.mark.alone]
ROUND = 1600
#: rounds of ROUND e-mails after the warm-up: without, with, without, with, without
ROUNDS = 5
IDLE = 200
RATIO = 0.9


def sim_accepted(url: str) -> int:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
        return int(json.loads(answer.read())["unique_invoices_accepted"])


def get(url: str, timeout: float = 3) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def limit_fds(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def deliver_round(client: redis_py.Redis, sim: str, start: int, count: int) -> float:
    """Put ``count`` e-mails on the inbound stream at once; the invoices per second MS4
    accepted them at, from the first to the last."""
    before = sim_accepted(sim)
    pipe = client.pipeline(transaction=False)
    for sample in samples.generate(count, start=start, prefix="LOAD"):
        pipe.xadd("ms1:emails", {"email": sample.data})
    pipe.execute()
    first_at = None
    first = before
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = sim_accepted(sim)
        if first_at is None and now > before:
            first_at, first = time.monotonic(), now
        if now >= before + count:
            assert first_at is not None
            return (before + count - first) / max(time.monotonic() - first_at, 1e-3)
        time.sleep(0.01)
    raise AssertionError(f"round from {start} not delivered: {sim_accepted(sim) - before}")


# CI runs the limited one (the stronger claim); MS1_MEASURE_FULL=1 adds the unlimited one
@pytest.mark.parametrize("fd_limit", [160] + ([None] if os.environ.get("MS1_MEASURE_FULL")
                                              == "1" else []))
def test_200_idle_console_connections_neither_slow_delivery_nor_exhaust_fds(
        redis_url: str, tmp_path: Path, procs: list[subprocess.Popen[Any]],
        fd_limit: int | None) -> None:
    sim_proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                                 "--rate-limit", "0", "--api-key", "k", "--latency", "0.2"],
                                stdout=subprocess.PIPE, text=True)
    procs.append(sim_proc)
    assert sim_proc.stdout is not None
    sim = sim_proc.stdout.readline().split()[-1]
    port = free_port()
    console = f"http://127.0.0.1:{port}"
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url, ms4_url=sim, settings={
        "ms1": {"shutdown_timeout": 5, "log_format": "kv"},
        "send": {"threads": 4},
        "batch": {"max_wait": 0.05},
        "redis": {"consumer": "load-test"},
        "console": {"address": f"127.0.0.1:{port}", "max_connections": 300,
                    "idle_timeout": 120},
    }))
    log = tmp_path / "service.log"
    service = subprocess.Popen(
        [sys.executable, "-m", "ms1.cli", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "MS1_MS4_API_KEY": "k"},
        preexec_fn=limit_fds(fd_limit) if fd_limit else None)
    procs.append(service)
    assert wait_until(lambda: get(f"{console}/api/overview") == 200, 30), tail(log)
    client = redis_py.Redis.from_url(redis_url)
    most_fds = [0]
    sampling = threading.Event()

    def sample_fds() -> None:
        while not sampling.wait(0.05):
            most_fds[0] = max(most_fds[0], open_fds(service.pid))

    sampler = threading.Thread(target=sample_fds, daemon=True)
    sampler.start()
    idle: list[socket.socket] = []
    without: list[float] = []
    with_idle: list[float] = []
    held = 0
    try:
        deliver_round(client, sim, 0, 500)  # warm-up: pools grown, code paths hot
        for number in range(ROUNDS):
            if number % 2:  # odd rounds: with the idle connections
                for _ in range(IDLE):
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                time.sleep(0.5)  # accepted (or left in the backlog) before the round
                held = max(held, open_fds(service.pid))
                with_idle.append(deliver_round(client, sim, 10_000 * (number + 1), ROUND))
                for sock in idle:
                    sock.close()
                idle.clear()
            else:
                without.append(deliver_round(client, sim, 10_000 * (number + 1), ROUND))
    finally:
        for sock in idle:
            sock.close()
        sampling.set()
        sampler.join(5)
        client.close()
    ratio = statistics.median(with_idle) / statistics.median(without)
    print(f"\nfd limit {fd_limit or 'default'}: invoices/s without "
          f"{', '.join(f'{r:,.0f}' for r in without)}; with {IDLE} idle connections "
          f"{', '.join(f'{r:,.0f}' for r in with_idle)}: ratio of the medians {ratio:.3f}; "
          f"open fds with the connections {held}, most {most_fds[0]}")
    assert ratio >= RATIO, (without, with_idle)
    assert wait_until(lambda: get(f"{console}/") == 200, 20), tail(log)
    text = log.read_text()
    assert "Too many open files" not in text and "EMFILE" not in text, tail(log)
    assert "level=ERROR" not in text and "level=CRITICAL" not in text, tail(log)
    if fd_limit is None:
        assert held >= IDLE  # every idle connection was held
    else:
        assert most_fds[0] <= fd_limit - fd_reserve(fd_limit), most_fds[0]
        assert "console: not accepting connections" in text
    service.send_signal(signal.SIGTERM)
    assert service.wait(30) == 0, tail(log)
    sim_proc.send_signal(signal.SIGTERM)
    sim_proc.wait(30)
