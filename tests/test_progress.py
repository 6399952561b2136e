"""The progress registry behind the watchdog and /healthz (issue 12: progress, not only
thread death)."""

from __future__ import annotations

import threading

from ms1.heartbeat import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_thread_without_a_beat_for_longer_than_the_limit_is_stalled() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.beat("sender-1", "POST batch b1")
    progress.beat("reader")
    clock.now += 5
    progress.beat("reader")
    assert progress.stalled(10) == []
    clock.now += 6
    stalls = progress.stalled(10)
    assert [s.thread for s in stalls] == ["sender-1"]
    assert "POST batch b1" in str(stalls[0]) and "11 s" in str(stalls[0])


def test_a_bounded_wait_never_counts_as_a_stall_and_leaving_it_is_progress() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.beat("sender-1")
    with progress.waiting("sender-1", "401 spell"):
        clock.now += 3600
        assert progress.stalled(10) == []
        assert progress.doing()["sender-1"] == "401 spell"
    assert progress.stalled(10) == []
    clock.now += 11
    assert [s.thread for s in progress.stalled(10)] == ["sender-1"]


def test_nested_waits_and_leaving_threads() -> None:
    clock = Clock()
    progress = Progress(clock)
    with progress.waiting("committer", "Redis down"):
        with progress.waiting("committer", "Redis down"):
            clock.now += 100
        clock.now += 100
        assert progress.stalled(10) == []
    progress.leave("committer")
    clock.now += 100
    assert progress.stalled(10) == []


def test_many_threads_beating_at_once() -> None:
    progress = Progress()
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        for _ in range(2000):
            progress.beat(f"t{n}")
            with progress.waiting(f"t{n}", "pacer"):
                pass

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.stalled(60) == [] and len(progress.doing()) == 8


def test_an_outage_is_a_failure_until_an_answer_or_a_call_past_its_allowance() -> None:
    """Issue 21: readiness follows whether each part works (ms1.heartbeat.Outage)."""
    from ms1.heartbeat import SLOW_CALL, Outage

    now = [100.0]
    outage = Outage("storing", clock=lambda: now[0])
    assert outage.problem() is None
    outage.failed("cannot store (%s)", "OOM")
    outage.failed("cannot store (%s)", "MISCONF")  # the latest reason is the one named
    assert outage.problem() == "cannot store (MISCONF)" and outage.down
    outage.answered("stored again")
    assert outage.problem() is None
    with outage.calling(allowance=1.0):
        now[0] += 1.0 + SLOW_CALL
        assert outage.problem() is None  # within its allowance + SLOW_CALL
        now[0] += 0.5
        assert outage.problem() == "storing: no answer for 4 s"
    assert outage.problem() is None
