"""Idle costs nothing (issue 20): a service with nothing to do uses at most 0.2 % of a
core. Before, its 64 sender threads each asked the queue every 0.2 s (1.7 % of a core
with the memory queue); now one sender at a time waits on the queue and the others on a
condition (ms1.pipeline.sending.sender.IdlePoll). Measured from the kernel's per-thread CPU time
(/proc/PID/task/*/schedstat, nanoseconds) of an ms1-service process over 4 s."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.sender import IdlePoll, WakingEvent

WINDOW = 4.0


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.mark.slow
@pytest.mark.alone  # CPU time, not wall time, but caches shared with a busy suite inflate it
@pytest.mark.xdist_group("measure")
# with Redis, an idle instance still makes three round trips a second (the reader's and one
# sender's blocking reads, the queue's counts for /readyz) and a heartbeat every 3.3 s
@pytest.mark.parametrize("queue", ["memory", "redis"])
def test_an_idle_service_uses_at_most_0_2_percent_of_a_core(
        queue: str, own_redis: Any, tmp_path: Path, procs: list[Any]) -> None:
    from support import service_ini, wait_until

    config = tmp_path / "idle.ini"
    config.write_text(service_ini(own_redis.url, settings={
        "ms1": {"log_level": "WARNING"}, "queue": {"backend": queue},
        "source": {"allow_volatile": "yes"},
        # the shipped defaults, not the suite's quick 0.2 s reads
        "redis": {"block_timeout": 2.0, "socket_timeout": 10}}))
    log = tmp_path / "ms1.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                                env={**os.environ, "MS1_MS4_API_KEY": "k"},
                                stdout=subprocess.DEVNULL, stderr=err)
    procs.append(proc)
    # started: its 64 senders are up, and their start-up work is done
    assert wait_until(lambda: threads(proc.pid) >= 64, timeout=30), log.read_text()
    settled = cpu_ns(proc.pid)
    deadline = time.monotonic() + 30
    while True:  # the start-up (imports, first connections) ends: 0.5 s of little CPU
        time.sleep(0.5)
        now = cpu_ns(proc.pid)
        if now - settled < 5_000_000 or time.monotonic() > deadline:
            break
        settled = now
    before, started = cpu_ns(proc.pid), time.monotonic()
    time.sleep(WINDOW)  # the measurement itself: nothing to wait for but time
    used = (cpu_ns(proc.pid) - before) / 1e9
    share = used / (time.monotonic() - started)
    print(f"\nidle service, {queue} queue, {threads(proc.pid)} threads: {used * 1000:.1f} ms "
          f"of CPU in {WINDOW:g} s = {share:.3%} of a core")
    assert proc.poll() is None, log.read_text()
    assert share <= 0.002


def test_one_idle_sender_at_a_time_asks_the_queue_and_a_stop_wakes_the_rest() -> None:
    idle = IdlePoll(fallback=30)
    stop = WakingEvent(idle)
    queue = MemoryQueue()
    asking: list[int] = []
    most = [0]
    lock = threading.Lock()

    def sender() -> None:
        while not stop.is_set():
            if not idle.take(stop.is_set):
                return
            try:
                with lock:
                    asking.append(1)
                    most[0] = max(most[0], len(asking))
                queue.get("s", timeout=0.05)
                with lock:
                    asking.pop()
            finally:
                idle.give()

    workers = [threading.Thread(target=sender) for _ in range(16)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    stop.set()
    for worker in workers:
        worker.join(5)
    assert not any(w.is_alive() for w in workers)
    assert time.monotonic() - started < 1  # not the 30 s fallback: the stop woke them
    assert most[0] == 1
