"""The fleet (ms1/ops/fleet.py, plugins/redis/fleet.py): the contract over the memory fleet
and the Redis one (a real redis-server), the sampler's snapshot, the publisher's thread
(a fleet that fails only makes it skip), and how [fleet] backend is resolved."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pluggy
import pytest
from support import wait_until

from ms1.config import Config
from ms1.errors import ConfigError, Ms1Error
from ms1.ops import publisher as fleet_module
from ms1.ops.fleet import Fleet, MemoryFleet, instance_id
from ms1.ops.metrics import ServiceView
from ms1.ops.publisher import Publisher, RateMeter, Sampler
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.concurrency import Controller
from ms1.pipeline.stats import RunStats
from ms1.runtime import pluginmanager
from ms1.runtime.components import make_pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the contract, over every fleet ------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
def fleet_and_clock(request: pytest.FixtureRequest, make_config) -> Iterator[
        tuple[Fleet, Clock | None]]:
    if request.param == "memory":
        clock = Clock()
        yield MemoryFleet(clock=clock), clock
        return
    redis_url = request.getfixturevalue("redis_url")
    pm = pluginmanager.make_plugin_manager()
    config = make_config(f"[queue]\nbackend = redis\n[redis]\nurl = {redis_url}\n"
                         "consumer = fleet-test\n")
    fleet = pluginmanager.build_fleet(pm, config)
    yield fleet, None
    fleet.close()


def test_fleet_contract_publish_replace_read_withdraw(fleet_and_clock) -> None:
    fleet, _ = fleet_and_clock
    with fleet:
        assert fleet.snapshots() == []
        fleet.publish("a@h:1", {"id": "a@h:1", "n": 1}, ttl=30)
        fleet.publish("b@h:2", {"id": "b@h:2", "n": 1}, ttl=30)
        fleet.publish("a@h:1", {"id": "a@h:1", "n": 2}, ttl=30)  # replaces a's
        got = sorted(fleet.snapshots(), key=lambda s: s["id"])
        assert got == [{"id": "a@h:1", "n": 2}, {"id": "b@h:2", "n": 1}]
        fleet.withdraw("a@h:1")
        assert [s["id"] for s in fleet.snapshots()] == ["b@h:2"]
        fleet.withdraw("never-there")  # no error


def test_a_snapshot_vanishes_after_its_ttl(fleet_and_clock) -> None:
    fleet, clock = fleet_and_clock
    fleet.publish("short", {"id": "short"}, ttl=0.3)
    fleet.publish("long", {"id": "long"}, ttl=30)
    if clock is not None:
        clock.now += 0.31
    else:
        time.sleep(0.4)
    assert [s["id"] for s in fleet.snapshots()] == ["long"]


def test_redis_fleet_keys_carry_the_hash_tag_and_the_index_cleans_itself(
        redis_url: str, make_config, redis_server) -> None:
    pm = pluginmanager.make_plugin_manager()
    config = make_config(f"[queue]\nbackend = redis\n[redis]\nurl = {redis_url}\n"
                         "key_tag = ms1\nconsumer = c1\n")
    with pluginmanager.build_fleet(pm, config) as fleet:
        assert fleet.name == "redis" and fleet.label == "c1"
        fleet.publish("c1@h:7", {"id": "c1@h:7"}, ttl=0.2)
        client = redis_server.client()
        keys = sorted(k.decode() for k in client.keys("*"))
        assert keys == ["{ms1}:outbound:instances", "{ms1}:outbound:instances:c1@h:7"]
        assert 0 < client.pttl("{ms1}:outbound:instances:c1@h:7") <= 200
        time.sleep(0.3)
        assert fleet.snapshots() == []
        assert client.smembers("{ms1}:outbound:instances") == set()  # dropped by the read
        client.sadd("{ms1}:outbound:instances", "junk")
        client.set("{ms1}:outbound:instances:junk", b"\xff not json")
        assert fleet.snapshots() == []  # skipped, not an error
        client.close()


def test_redis_fleet_unreachable_raises_ms1_error(make_config) -> None:
    pm = pluginmanager.make_plugin_manager()
    config = make_config("[queue]\nbackend = redis\n[redis]\nurl = redis://127.0.0.1:9/0\n"
                         "connect_timeout = 0.2\nsocket_timeout = 0.5\nblock_timeout = 0.1\n")
    with pluginmanager.build_fleet(pm, config) as fleet:
        with pytest.raises(Ms1Error, match="publish to ms1:outbound:instances"):
            fleet.publish("x", {}, ttl=1)
        with pytest.raises(Ms1Error):
            fleet.snapshots()


# --- [fleet] backend ---------------------------------------------------------------------

@pytest.mark.parametrize(("ini", "queue_built", "expected"), [
    ("", None, "memory"),
    ("[queue]\nbackend = redis\n", None, "redis"),
    ("[queue]\nbackend = auto\n", None, "redis"),
    ("[queue]\nbackend = auto\n", "memory", "memory"),  # auto fell back to memory
    ("[queue]\nbackend = redis\n[fleet]\nbackend = memory\n", None, "memory"),
    ("[fleet]\nbackend = redis\n", None, "redis"),
])
def test_fleet_backend_auto_follows_the_queue(ini: str, queue_built: str | None,
                                              expected: str, make_config,
                                              pm: pluggy.PluginManager) -> None:
    config = make_config(ini)
    assert pluginmanager.fleet_name(pm, config, queue_built) == expected


def test_unknown_fleet_is_refused_at_load_naming_the_key(make_config) -> None:
    with pytest.raises(ConfigError, match=r"\[fleet\] backend: no installed plugin provides "
                                          r"fleet 'nope'; installed: auto, memory, redis"):
        make_config("[fleet]\nbackend = nope\n")


def test_build_fleet_checks_what_the_plugin_built(make_config) -> None:
    class Wrong:
        @pluginmanager.hookspecs.hookimpl(tryfirst=True)
        def ms1_make_fleet(self, name: str, config: Config) -> object:
            return object()

    pm = pluginmanager.make_plugin_manager(plugins=[Wrong()])
    with pytest.raises(ConfigError, match=r"not a ms1\.ops\.fleet\.Fleet"):
        pluginmanager.build_fleet(pm, make_config(""))


# --- the snapshot ------------------------------------------------------------------------

def test_instance_id() -> None:
    assert instance_id("c1", "host", 42) == "c1@host:42"
    assert instance_id("", "host", 42) == "host:42"
    assert instance_id("host", "host", 42) == "host:42"


def test_rate_meter_measures_over_the_window() -> None:
    meter = RateMeter(window=10)
    assert meter.add(0, {"n": 0}) == {"n": 0.0}
    assert meter.add(1, {"n": 100}) == {"n": 100.0}
    for t in range(2, 30):
        rates = meter.add(t, {"n": 100 * t})
    assert rates["n"] == pytest.approx(100)
    rates = meter.add(30, {"n": 100 * 29})  # stopped: the rate falls as the window moves
    assert 80 < rates["n"] < 100
    for t in range(31, 45):
        rates = meter.add(t, {"n": 100 * 29})
    assert rates["n"] == 0


def make_view(stats: RunStats, config: Config, *, health: str | None = None) -> ServiceView:
    pacer = make_pacer(config)
    queue = MemoryQueue()
    controller = Controller(rate=lambda: 2.0, held_back=pacer.holding, max_concurrency=8)
    return ServiceView(counters=stats.snapshot, alive=lambda: True, pacer=pacer,
                       queue_stats=queue.stats, dead_letter_count=lambda: 0,
                       health=lambda: health, in_flight=lambda: 3, concurrency=controller)


def test_sampler_snapshot_is_json_and_holds_what_the_overview_needs(make_config) -> None:
    config = make_config("")
    stats = RunStats()
    clock, wall = Clock(), Clock()
    view = make_view(stats, config)
    sampler = Sampler(view, label="c1", clock=clock, wall=wall)
    first = sampler.sample()
    stats.add("emails_read", 100)
    stats.add("invoices_delivered", 50)
    stats.add("responses_202", 1)
    view.pacer.held.add("rate_budget", 2.0)
    clock.now += 2
    wall.now += 2
    snap = sampler.sample()
    json.dumps(snap)  # JSON-able
    assert first["rates"]["emails_in_per_s"] == 0
    assert snap["id"] == instance_id("c1") and snap["label"] == "c1"
    assert snap["schema"] == 1 and snap["updated"] == wall.now
    assert snap["counters"]["invoices_delivered"] == 50
    assert snap["counters"]["responses_202"] == 1
    assert snap["rates"]["emails_in_per_s"] == 50 and snap["rates"][
        "invoices_delivered_per_s"] == 25
    assert snap["in_flight"] == 3 and snap["concurrency_target"] >= 1
    assert snap["held"] == {"pause_429_s": 0.0, "stop": None, "stop_status": None,
                            "auth_blocked": False, "breaker": "closed", "reason": None}
    assert snap["held_seconds"]["rate_budget"] == 2.0
    assert snap["held_recent"]["rate_budget"] == 1.0
    assert snap["health"]["ok"] is True and snap["health"]["problem"] is None
    assert set(snap["health"]["threads"]) == {"reader", "batcher", "committer", "sender"}


def test_sampler_reports_a_429_pause_and_a_problem(make_config) -> None:
    config = make_config("")
    view = make_view(RunStats(), config, health="sender-1: no progress for 130 s (x)")
    admission = view.pacer.admit(threading.Event())
    view.pacer.done(admission, 429, retry_after="30")
    snap = Sampler(view).sample()
    assert 29 <= snap["held"]["pause_429_s"] <= 30
    assert snap["held"]["reason"].startswith("paused by a 429")
    assert snap["health"] == {"ok": False, "problem": "sender-1: no progress for 130 s (x)",
                              "threads": snap["health"]["threads"]}


# --- the publisher -----------------------------------------------------------------------

class Flaky(MemoryFleet):
    def __init__(self) -> None:
        super().__init__()
        self.failing = True
        self.calls = 0

    def publish(self, instance_id: str, snapshot: Any, ttl: float) -> None:
        self.calls += 1
        if self.failing:
            raise Ms1Error("Redis down")
        super().publish(instance_id, snapshot, ttl)


def test_publisher_skips_while_the_fleet_fails_logs_once_and_withdraws_at_close(
        caplog: pytest.LogCaptureFixture) -> None:
    fleet = Flaky()
    publisher = Publisher(fleet, "me", lambda: {"id": "me"}, interval=0.05, ttl=5)
    publisher.start()
    assert wait_until(lambda: fleet.calls >= 4, 5)
    assert fleet.snapshots() == []
    fleet.failing = False
    assert wait_until(lambda: fleet.snapshots() == [{"id": "me"}], 5)
    publisher.close(timeout=5)
    assert fleet.snapshots() == []  # withdrawn
    warnings = [r.getMessage() for r in caplog.records if r.name == "ms1.ops.fleet"]
    assert len(warnings) == 2, warnings
    assert "cannot publish" in warnings[0] and "Redis down" in warnings[0]
    assert "publishing again" in warnings[1]


def test_publisher_never_holds_the_caller_when_the_fleet_hangs() -> None:
    release = threading.Event()

    class Frozen(MemoryFleet):
        def publish(self, instance_id: str, snapshot: Any, ttl: float) -> None:
            release.wait(10)

    publisher = Publisher(Frozen(), "me", lambda: {}, interval=0.05)
    publisher.start()
    time.sleep(0.1)
    started = time.monotonic()
    publisher.close(timeout=0.2)
    assert time.monotonic() - started < 1
    release.set()


def test_an_idle_instance_publishes_a_heartbeat_and_a_change_at_once() -> None:
    """Issue 20 (idle costs nothing): while the snapshot does not change (time stamp, rates
    and held seconds aside) the publisher writes every ttl / 3 s, not every beat; a change
    goes up at the next beat."""
    fleet = Flaky()
    fleet.failing = False
    state = {"id": "me", "counters": {"emails_read": 0}, "updated": 0.0, "rates": {"x": 0.0}}

    def sample() -> dict[str, Any]:
        state["updated"] = time.time()
        state["rates"] = {"x": time.monotonic()}  # moves with time alone
        return {**state, "counters": dict(state["counters"])}

    publisher = Publisher(fleet, "me", sample, interval=0.1, ttl=3)
    assert publisher.heartbeat == 1.0
    assert publisher.beat()  # the first always goes up
    for _ in range(3):
        assert not publisher.beat()  # nothing changed
    state["counters"]["emails_read"] = 5
    assert publisher.beat()  # a change: at once
    assert not publisher.beat()
    assert fleet.calls == 2
    assert fleet.snapshots()[0]["counters"] == {"emails_read": 5}
    publisher.start()
    time.sleep(0.55)  # about five beats of the thread, none of them changed anything
    assert fleet.calls == 2
    assert wait_until(lambda: fleet.calls == 3, 3)  # the heartbeat
    publisher.close(timeout=5)


def test_disagreements_name_both_instances_and_the_figures() -> None:
    own = {"id": "a@h:1", "shares": {"limiter": "ms1:rate-limit", "limit": 12, "window": 6.0,
                                     "consumer": "c"}}
    same = {"id": "b@h:2", "shares": {"limiter": "ms1:rate-limit", "limit": 12, "window": 6.0,
                                      "consumer": "d"}}
    other_key = {"id": "c@h:3", "shares": {"limiter": "other", "limit": 60, "window": 6.0,
                                           "consumer": "e"}}
    assert fleet_module.disagreements(own, [own, same, other_key, {"id": "old"}]) == []
    clash = {"id": "b@h:2", "shares": {"limiter": "ms1:rate-limit", "limit": 60,
                                       "window": 6.0, "consumer": "c"}}
    limit, consumer = fleet_module.disagreements(own, [clash])
    assert "a@h:1 and b@h:2" in limit and "12 per 6.0 s here, 60 per 6.0 s there" in limit
    assert "'c'" in consumer and "[redis] consumer" in consumer
    # a process's own limiter (None) is shared with nobody
    alone = {"id": "a@h:1", "shares": {"limiter": None, "limit": 12, "window": 6.0,
                                       "consumer": None}}
    assert fleet_module.disagreements(alone, [clash]) == []


@pytest.mark.slow
def test_two_instances_disagreeing_on_the_shared_limiter_or_consumer_each_warn_once(
        own_redis: Any, tmp_path: Any, procs: list[Any]) -> None:
    """Issue 21: two instances sharing the Redis limiter with 12 vs 60 requests per 6 s, and
    with the same consumer name, ran without a word (22 x 429 of 82 requests, the warning
    pointing at count_margin). Now each says both problems, once, naming the other."""
    import os

    from support import fleet_configs, start_instances

    configs = fleet_configs(tmp_path, own_redis.url, "http://127.0.0.1:9", {
        "requests_per_minute": 12, "rate_window": 6}, count=2)
    second = configs[1].read_text().replace("requests_per_minute = 12",
                                            "requests_per_minute = 60")
    configs[1].write_text(second.replace("consumer = fleet-1", "consumer = fleet-0"))
    logs = start_instances(procs, tmp_path, configs, 0,
                           {**os.environ, "MS1_MS4_API_KEY": "k"})

    def said(log: Any) -> list[str]:
        return [line for line in log.read_text(errors="replace").splitlines()
                if "fleet: instances" in line]

    assert wait_until(lambda: all(len(said(log)) >= 2 for log in logs), 30), \
        [log.read_text()[-2000:] for log in logs]
    time.sleep(6)  # another cross-check: nothing said twice
    for log in logs:
        lines = said(log)
        print("\n".join(lines))
        assert len(lines) == 2, lines
        assert any("12 per 6.0 s" in line and "60 per 6.0 s" in line for line in lines)
        assert any("consumer name 'fleet-0'" in line for line in lines)
