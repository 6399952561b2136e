"""Adaptive concurrency (issue 13): the controller's rules, the gate, and the share of
MS4's ceiling reached against ms4-sim at 0.05, 0.25, 0.5 and 1.0 s latency with default
settings (ms4-sim counting requests as they arrive, as ms1 assumes by default).

The measurement compresses MS4's limit 10x (120 requests per 6 s on both sides) and
measures like tests/test_unitvsbatch_performance.py: the share of the ceiling is the
window over the mean gap between accepted request k and k-120 (sim timestamps).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from typing import Any

import pluggy
import pytest
from support import run_in_process

from ms1.config import Config
from ms1.pipeline import samples
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.answers import classify
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.concurrency import Controller, Gate
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Aborted, Pacer
from ms1.pipeline.source import MemorySource
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service
from ms1_tools import bench
from ms1_tools.sim import Ms4Sim, SimConfig

ACCEPTED = classify(202)
FAILED = classify(500)
NO_ANSWER = classify(None)
PAUSED = classify(429)


class Held:
    def __init__(self) -> None:
        self.now = False

    def __call__(self) -> bool:
        return self.now


def controller(rate: float = 20.0, held: Held | None = None, **kwargs: Any) -> Controller:
    settings: dict[str, Any] = {"min_concurrency": 1, "max_concurrency": 64, **kwargs}
    return Controller(rate=lambda: rate, held_back=held or Held(), **settings)


def warm(c: Controller, latency: float, times: int = 20) -> None:
    for _ in range(times):
        c.observe(ACCEPTED, latency)


# --- the controller ------------------------------------------------------------------

def test_little_law_target_from_rate_and_latency() -> None:
    c = controller(rate=20.0)
    assert c.target == 4  # nothing observed yet
    c.observe(ACCEPTED, 0.5)
    assert c.target == 16  # ceil(20/s * 0.5 s * 1.5 + 1)
    warm(c, 0.5)
    assert c.target == 16
    assert c.gate.size == 16
    fast = controller(rate=20.0)
    warm(fast, 0.05)
    assert fast.target == 3  # ceil(20 * 0.05 * 1.5 + 1)


def test_the_windows_free_slots_join_the_target_at_once() -> None:
    c = controller(rate=20.0)
    c.admitted(100)  # a backlog after a quiet spell: the window allows 100 more now
    assert c.target == 64  # max_concurrency
    warm(c, 0.5)
    assert c.lookahead == pytest.approx(0.75)  # 1.5 latencies
    c.admitted(30)  # 30 slots free now or within the lookahead
    assert c.target == 31
    assert c.gate.size == 31
    c.admitted(0)  # the window is full: the steady rate is all
    assert c.target == 16
    c.admitted(None)  # a limiter that cannot say
    assert c.target == 16
    fixed = controller(fixed=3)
    fixed.admitted(100)
    assert fixed.target == 3


def test_bounds() -> None:
    c = controller(rate=1000.0, min_concurrency=2, max_concurrency=10)
    warm(c, 1.0)
    assert c.target == 10
    slow = controller(rate=0.01, min_concurrency=3, max_concurrency=10)
    for _ in range(5):
        slow.observe(ACCEPTED, 0.01)
    assert slow.target == 3
    assert controller(max_concurrency=10).pool == 10


def test_multiplicative_decrease_on_failures_down_to_min() -> None:
    c = controller(rate=20.0, min_concurrency=1)
    warm(c, 0.5)
    assert c.target == 16
    c.observe(FAILED, 0.5)
    assert c.target == 8
    c.observe(NO_ANSWER, 10.0)  # a timeout
    assert c.target == 4
    c.observe(FAILED, 0.5)
    c.observe(FAILED, 0.5)
    assert c.target == 1
    c.observe(FAILED, 0.5)
    assert c.target == 1
    for _ in range(3):  # additive increase after the failures
        c.observe(ACCEPTED, 0.5)
    assert c.target == 4


def test_rising_latency_shrinks() -> None:
    c = controller(rate=20.0)
    for _ in range(20):
        c.observe(ACCEPTED, 0.2)
    before = c.target
    assert before == 7
    for _ in range(10):
        c.observe(ACCEPTED, 2.0)  # MS4 slows down tenfold: no Little's-law growth
    assert c.target <= before


def test_no_growth_while_held_back() -> None:
    held = Held()
    rate = [20.0]
    c = Controller(rate=lambda: rate[0], held_back=held, min_concurrency=1,
                   max_concurrency=64)
    warm(c, 0.5)
    assert c.target == 16
    held.now = True  # a 429 pause, a stop or an open breaker
    rate[0] = 100.0  # a reload raised the limit: Little's law would want 76
    for _ in range(10):
        c.observe(ACCEPTED, 0.5)
        c.observe(PAUSED, 0.5)
    assert c.target == 16
    c.admitted(119)  # a stop's probe is granted with the window all but empty
    assert c.target == 16
    c.observe(FAILED, 0.5)  # but it still shrinks
    assert c.target == 8
    held.now = False
    for _ in range(3):
        c.observe(ACCEPTED, 0.5)
    assert c.target == 11  # additive increase again


def test_fixed_concurrency_ignores_observations() -> None:
    c = controller(fixed=7)
    assert c.target == 7 and c.pool == 7 and not c.adaptive
    c.observe(FAILED, 0.1)
    c.observe(ACCEPTED, 5.0)
    assert c.target == 7
    c.configure(min_concurrency=1, max_concurrency=32, fixed=None)  # threads unset: adaptive
    assert c.pool == 32
    c.observe(FAILED, 0.1)
    assert c.target < 7


def test_gate_resize_and_abort() -> None:
    gate = Gate(2)
    never = threading.Event()
    gate.acquire(never)
    gate.acquire(never)
    got = threading.Event()

    def third() -> None:
        gate.acquire(never)
        got.set()

    waiter = threading.Thread(target=third, daemon=True)
    waiter.start()
    assert not got.wait(0.3)
    gate.resize(3)
    assert got.wait(5)
    assert gate.held == 3
    gate.resize(1)  # takes nothing back
    gate.release()
    gate.release()
    assert gate.held == 1
    abort = threading.Event()
    abort.set()
    with pytest.raises(Aborted):
        gate.acquire(abort)
    waiter.join(5)


def test_service_threads_set_means_fixed(make_config: Any) -> None:
    from ms1.runtime.settings import concurrency as _concurrency_settings

    assert _concurrency_settings(make_config(""))["fixed"] is None
    assert _concurrency_settings(make_config("[send]\nthreads = 4\n"))["fixed"] == 4
    settings = _concurrency_settings(make_config("[send]\nmin_concurrency = 9\n"
                                                 "max_concurrency = 5\n"))
    assert settings["min_concurrency"] == 5 and settings["max_concurrency"] == 5


# --- against ms4-sim ---------------------------------------------------------------------

LIMIT, WINDOW = 120, 6.0  # MS4's 120 per 60 s, time compressed 10x on both sides


def run_against_sim(pm: pluggy.PluginManager, config: Config, sim: Ms4Sim,
                    invoices: int) -> Service:
    return run_in_process(pm, config, (s.data for s in samples.generate(invoices)))


def share_of_ceiling(accepted: list[float]) -> float:
    return bench.share_of_ceiling(accepted, LIMIT, WINDOW)


def start_service(pm: pluggy.PluginManager, config: Config, invoices: int, *,
                  finite: bool) -> tuple[Service, Any]:
    """The service, started in this process on ``invoices`` sample e-mails (memory source,
    queue and dead letters; the config's transport, returned to be closed)."""
    transport = pluginmanager.build(pm, config, "transport")
    transport.set_api_key(config.api_key)
    parts = Components(source=MemorySource((s.data for s in samples.generate(invoices)),
                                           finite=finite),
                       policy=pluginmanager.build(pm, config, "batch_policy"),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport)
    service = Service(config, pm, parts)
    service.start()
    return service, transport


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_share_of_the_ceiling_with_default_settings_at_any_latency() -> None:
    """ms1-bench --sweep: ms4-sim in its own process (as MS4 is), counting requests as they
    arrive; ms1 in-process with its default settings; 250 requests per latency (the
    window's budget at once, then 130 as it slides)."""
    latencies = "0.05,0.25,0.5,1.0" if os.environ.get("MS1_MEASURE_FULL") == "1" \
        else "0.05,1.0"  # CI: both ends (16 s each, alone)
    args = bench.parse_args(["--sweep", latencies, "--count", "12500", "--timeout", "60"])
    results = bench.sweep(args, args.sweep)
    for r in results:
        assert r["answers_429"] == 0, r
        assert r["max_in_window"] <= LIMIT, r
        assert r["lost"] == 0, r
        assert r["duplicates"] == 0, r  # nothing sent twice
        # 250 full batches; once in CI 251: the producer (its own process) lagged the
        # batcher's max_wait on a loaded machine and one batch went out part-full
        assert 250 <= r["requests"] <= 252, r
        assert r["share"] >= 0.95, r


@pytest.mark.slow
def test_failing_ms4_brings_concurrency_down_to_min(make_config: Any,
                                                    pm: pluggy.PluginManager,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    sim = Ms4Sim(SimConfig(api_key="k", rate_limit=0, latency=0.5)).start()
    config = make_config(f"[ms4]\ntransport = http\n[transport.http]\nbase_url = {sim.url}\n"
                         f"[send]\nrequests_per_minute = {LIMIT}\nrate_window = {WINDOW}\n"
                         "breaker_failures = 1000\nretry_initial = 0.05\nretry_max = 0.2\n")
    service, transport = start_service(pm, config, 5_000, finite=False)
    try:
        deadline = time.monotonic() + 30
        while service.concurrency.target < 16 and time.monotonic() < deadline:
            service.abort.wait(0.05)
        start = service.concurrency.target
        assert start >= 16  # ceil(20/s * 0.5 s * 1.5 + 1), latency a little over 0.5 s
        failures_before = service.stats.snapshot().get("send_failures", 0)
        sim.control(fail_500=1.0)
        deadline = time.monotonic() + 30
        while service.concurrency.target > 1 and time.monotonic() < deadline:
            service.abort.wait(0.05)
        failures = service.stats.snapshot().get("send_failures", 0) - failures_before
        assert service.concurrency.target == 1
        print(f"\nMS4 answering 500: concurrency {start} -> 1 after {failures} failures")
        assert failures <= start + 5  # halving per failure; those in flight fail too
        sim.control(fail_500=0.0)
    finally:
        service.shutdown(5)
        transport.close()
        sim.stop()


def test_status_says_when_the_backlog_drains_at_the_ceiling(make_config: Any) -> None:
    from ms1.cli.admin import _sending

    config = make_config("[send]\nrequests_per_minute = 120\n")
    redis_like = _sending(config, {"stream": "outbound", "length": 600})
    assert redis_like["drained_in_s"] == 300.0  # 600 requests at 2 per second
    assert redis_like["backlog_invoices"] == "at most 30000"
    memory = _sending(config, {"ready": 10, "in_flight": 2, "invoices": 500})
    assert memory["backlog_batches"] == 12 and memory["backlog_invoices"] == 500
    assert memory["ceiling_invoices_per_minute"] == 6000
    assert "drained_in_s" not in _sending(config, {"error": "unreachable"})


# --- why it is not sending faster: held-back seconds by cause ---------------------------

def admit_once(pacer: Pacer, within: float = 5.0) -> None:
    abort = threading.Event()
    timer = threading.Timer(within, abort.set)  # a bound, never the synchronisation
    timer.start()
    try:
        pacer.done(pacer.admit(abort), 202)
    finally:
        timer.cancel()


def test_pacer_counts_held_back_seconds_by_cause() -> None:
    budget = Pacer(SlidingWindowLimiter(1, 0.3), Breaker(100, 60))
    admit_once(budget)
    admit_once(budget)  # the one slot expires 0.3 s after the first request ended
    assert budget.held.snapshot()["rate_budget"] >= 0.2

    paused = Pacer(SlidingWindowLimiter(1000, 60), Breaker(100, 60), retry_after_cap=0.3)
    paused.done(paused.admit(threading.Event()), 429, "10")
    admit_once(paused)
    assert paused.held.snapshot()["429_pause"] >= 0.2

    broken = Pacer(SlidingWindowLimiter(1000, 60), Breaker(1, 0.3))
    broken.done(broken.admit(threading.Event()), 500)
    admit_once(broken)  # the probe after the breaker's reset timeout
    assert broken.held.snapshot()["breaker_open"] >= 0.2

    stopped = Pacer(SlidingWindowLimiter(1000, 60), Breaker(100, 60), auth_probe_interval=3600)
    stopped.done(stopped.admit(threading.Event()), 401)
    with pytest.raises(Aborted):
        admit_once(stopped, within=0.3)
    held = stopped.held.snapshot()
    assert held["401_spell"] >= 0.2
    assert held["rate_budget"] == held["429_pause"] == held["breaker_open"] == 0.0


def test_metrics_export_the_target_and_held_back_seconds() -> None:
    from prometheus_client import generate_latest

    from ms1.ops.metrics import Exporter, ServiceView
    from ms1.pipeline.outbound import QueueStats

    pacer = Pacer(SlidingWindowLimiter(1000, 60), Breaker(100, 60))
    pacer.held.add("empty_queue", 1.5)
    c = controller(rate=20.0)
    warm(c, 0.5)
    exporter = Exporter(ServiceView(
        counters=dict, alive=lambda: True, pacer=pacer,
        queue_stats=lambda: QueueStats(0, 0, 0), dead_letter_count=lambda: 0,
        in_flight=lambda: 3, concurrency=c), "127.0.0.1:0")
    try:
        text = generate_latest(exporter.registry).decode()
    finally:
        exporter.close()
    assert "ms1_concurrency_target 16.0" in text
    assert "ms1_requests_in_flight 3.0" in text
    assert 'ms1_held_back_seconds_total{cause="empty_queue"} 1.5' in text
    assert 'ms1_held_back_seconds_total{cause="rate_budget"} 0.0' in text


@pytest.mark.slow
@pytest.mark.alone  # 94.9 % once with the suite beside it (97.7 % alone)
def test_three_instances_sharing_the_redis_limiter_reach_the_ceiling_together(
        own_redis: Any, tmp_path: Any, procs: list[Any]) -> None:
    """Three ms1-service processes (default concurrency) on one Redis — inbound stream,
    outbound stream and rate limiter shared — against ms4-sim at 0.5 s latency, MS4's
    limit compressed to 120 per 6 s; every e-mail queued before they start."""
    from support import fleet_configs, start_instances, wait_until

    invoices = 12_500  # 250 requests of 50
    sim = Ms4Sim(SimConfig(api_key="k", rate_limit=LIMIT, window=WINDOW, latency=0.5)).start()
    try:
        configs = fleet_configs(tmp_path, own_redis.url, sim.url, {
            "requests_per_minute": LIMIT, "rate_window": WINDOW, "retry_initial": 0.5,
            "retry_max": 5})
        logs = start_instances(procs, tmp_path, configs, invoices,
                               {**os.environ, "MS1_MS4_API_KEY": "k"})
        delivered = wait_until(
            lambda: sim.stats()["unique_invoices_accepted"] >= invoices, timeout=90, interval=0.2)
        stats = sim.stats()
        accepted = sim.accepted_requests()
    finally:
        sim.stop()
    for proc in procs:
        proc.terminate()
    assert delivered, [log.read_text()[-2000:] for log in logs]
    share = share_of_ceiling(sorted(r.at for r in accepted))
    print(f"\nthree instances, latency 0.5 s: {len(accepted)} requests, share of the ceiling "
          f"{share:.1%}, most in a window {stats['max_in_window']}, answers "
          f"{stats['requests_by_status']}")
    assert stats["requests_by_status"].get("429", 0) == 0
    assert stats["max_in_window"] <= LIMIT
    assert stats["unique_invoices_accepted"] == invoices
    assert share >= 0.95


# --- an MS4 that counts requests late: the margin widens instead of 429s recurring --------

#: seconds without a new 429 (seen by two samples of MS4's count that far apart) that end
#: a spell of them: a spell's 429s answer the requests in flight with its first, all
#: within count_late + latency (0.35 s) of it, and the pause it begins lasts 1 s
QUIET = 0.8


def spells_of_429s(seen: list[tuple[float, int, int]], quiet: float) -> int:
    """Spells of 429s in samples of (when, accepted, 429s so far): a rise begins a spell
    when samples at least ``quiet`` s apart saw the count unchanged before it (a late
    sample alone never splits a spell; the count is unchanged since the start before the
    first rise)."""
    spells, count, first_seen, last_seen = 0, 0, -math.inf, -math.inf
    for when, _, now in seen:
        if now != count:
            if last_seen - first_seen >= quiet:
                spells += 1
            count, first_seen = now, when
        last_seen = when
    return spells


@pytest.mark.slow
def test_an_ms4_counting_requests_late_widens_the_margin_not_429s_each_window(
        make_config: Any, pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch,
        procs: list[Any], tmp_path: Any) -> None:
    """ms4-sim (its own process) counts requests 0.3 s after they arrive in every other
    half second — an MS4 whose rate limiter reads requests late while it is loaded — so a
    request counted on time a window after one counted late meets a window MS4 still holds
    full: beyond ms1's count_margin of 0.1 s. The old pacer kept its margin and drew
    spells of 429s (each pausing every sender) window after window: 7 and 8 spells in two
    runs of 300 requests (34 and 41 x 429, up to 20 in the second half); now each of the
    first spells widens the margin (0.1 -> 0.2 -> 0.4 s, 0.8 at times) and that is all:
    2-3 spells, all in the first half. The 429s a spell holds are the requests in flight
    with its first -- 2 to 10, more on a loaded machine (23 and 25 in all in some runs,
    22 in CI): the spells are what is bounded."""
    from support import SimProcess

    # 300 requests at 20 per second; a window is 3 spells, so a window after a late spell
    # comes one on time (and after one on time, a late one)
    limit, window, invoices = 30, 1.5, 15_000
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    sim = SimProcess(procs, tmp_path / "sim.log", "--api-key", "k", "--rate-limit",
                     str(limit), "--window", str(window), "--latency", "0.05",
                     "--count-late", "0.3", "--count-late-spell", "0.5")
    config = make_config(f"[ms4]\ntransport = http\n[transport.http]\nbase_url = {sim.url}\n"
                         f"[send]\nrequests_per_minute = {limit}\nrate_window = {window}\n"
                         "retry_initial = 0.05\nretry_max = 0.5\n[batch]\nmax_wait = 0.05\n")
    service, transport = start_service(pm, config, invoices, finite=True)
    seen: list[tuple[float, int, int]] = []  # (when, invoices accepted, 429s so far)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            stats = sim.stats()
            seen.append((time.monotonic(), stats["unique_invoices_accepted"],
                         stats["requests_by_status"].get("429", 0)))
            if seen[-1][1] >= invoices:
                break
            service.abort.wait(0.1)
        margin = service.pacer.margin
    finally:
        service.shutdown(5)
        transport.close()
    _, accepted, answers_429 = seen[-1]
    assert accepted == invoices, seen[-1]
    at_half = next(n for _, done, n in seen if done >= invoices // 2)
    spells = spells_of_429s(seen, quiet=QUIET)
    print(f"\nMS4 counting 0.3 s late every other 0.5 s: {answers_429} x 429 in {spells} "
          f"spells ({at_half} in the first half), margin in effect {margin:.2f} s")
    # every spell of 429s widens the margin once: from 0.1 s to the 1.5 s window takes four
    # doublings, and past them a slot is stamped when its answer came, which MS4 cannot be
    # ahead of. The old pacer drew them window after window: 7 and 8 spells (34 and 41
    # x 429) in two runs.
    # (How many 429s a spell holds is how many requests were in flight with its first:
    # 1-10, more on a loaded machine -- not a count to bound.)
    assert spells <= 4, seen
    assert margin >= 0.4  # counted up to 0.3 s late: 0.1 -> 0.2 -> 0.4
