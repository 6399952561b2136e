"""Idle costs nothing (issue 20): a service with nothing to do uses at most 0.2 % of a
core. Before, its 64 sender threads each asked the queue every 0.2 s (1.7 % of a core
with the memory queue); now one sender at a time waits on the queue and the others on a
condition (ms1.pipeline.sending.sender.IdlePoll). Measured from the kernel's per-thread CPU
time (/proc/PID/task/*/schedstat, nanoseconds) and context switches of an ms1-service
process over 4 s.

What an idle process costs is its wake-ups times what one costs, and the second is the
machine's. At stop 27 this code measured 0.09-0.14 % (about 150 us a wake-up of the
service). On the machine of stop 28 (same kind; its kernel runs DAMON's proactive
pageout) the same code measured 0.23-0.75 %: a bare Python thread that wakes once a
second and does nothing cost 430-630 us a wake-up there (50-66 us when it wakes 100
times a second). So the test measures, in the same run, a bare reference process waking
every 0.5 s, and asserts what the service decides: how often it wakes (waits on events
and long blocking reads, no polls), and that a wake-up costs it at most a few bare ones
(no work hidden in each). The 0.2 % itself is asserted as it stands where a bare wake-up
costs at most 100 us, and scaled by the measured cost above that (printed either way)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.sender import IdlePoll, WakingEvent

WINDOW = 4.0
#: a bare wake-up's cost (us) up to which the 0.2 % holds as it stands (stop 27's 0.114 %
#: at about 150 us a service wake-up, which costs 1-2.4 bare ones: 60-150 us)
NORMAL_WAKEUP_US = 100.0
#: wake-ups a second at most: measured 4.6-8.0 (memory queue) and 5.5-10.2 (Redis
#: queue) -- the reader's blocking read every 2 s, one sender's, the queue's counts every
#: second, the fleet's heartbeat; the old 64 polling senders made 320
MOST_WAKEUPS = {"memory": 12.0, "redis": 16.0}
#: a wake-up of the service may cost this many bare ones (it does a little work: a
#: Redis read, a heartbeat); measured 1.0-2.4
MOST_PER_WAKEUP = 4.0

REFERENCE = """
import threading
stop = threading.Event()
def wake():
    while not stop.wait(0.5):
        pass
threading.Thread(target=wake).start()
"""


def _over_threads(pid: int, read: Callable[[Path], int]) -> int:
    """``read`` of every thread of ``pid``, summed (a thread that ended meanwhile: 0)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += read(task)
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    return _over_threads(pid, lambda task: int((task / "schedstat").read_text().split()[0]))


def switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` so far (each wake-up is at least one)."""
    return _over_threads(pid, lambda task: sum(
        int(line.split()[1]) for line in (task / "status").read_text().splitlines()
        if "ctxt_switches" in line))


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
    reference = subprocess.Popen([sys.executable, "-c", REFERENCE])
    procs.append(reference)
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
    pids = (proc.pid, reference.pid)
    before = [(cpu_ns(pid), switches(pid)) for pid in pids]
    started = time.monotonic()
    time.sleep(WINDOW)  # the measurement itself: nothing to wait for but time
    after = [(cpu_ns(pid), switches(pid)) for pid in pids]
    took = time.monotonic() - started
    (used, woke), (ref_used, ref_woke) = (
        ((a[0] - b[0]) / 1e9, a[1] - b[1]) for a, b in zip(after, before, strict=True))
    share = used / took
    bare_us = ref_used / max(1, ref_woke) * 1e6
    per_wakeup = used / max(1, woke) * 1e6
    bound = 0.002 * max(1.0, bare_us / NORMAL_WAKEUP_US)
    print(f"\nidle service, {queue} queue, {threads(proc.pid)} threads: {used * 1000:.1f} ms "
          f"of CPU in {WINDOW:g} s = {share:.3%} of a core; {woke / took:.1f} wake-ups a "
          f"second at {per_wakeup:.0f} us; a bare wake-up here {bare_us:.0f} us; bound "
          f"{bound:.3%}" + ("" if bound == 0.002 else " (0.2 % scaled by the bare wake-up)"))
    assert proc.poll() is None, log.read_text()
    assert woke / took <= MOST_WAKEUPS[queue]
    assert per_wakeup <= MOST_PER_WAKEUP * bare_us
    assert share <= bound


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
