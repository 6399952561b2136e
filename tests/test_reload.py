"""SIGHUP reload applies what it says (issue 12).

* retry settings and ``max_deliveries`` reach the running senders (they read one shared
  :class:`~ms1.pipeline.sending.sender.SendSettings`, swapped by the reload);
* ``log_format`` (and level) change at once, redaction kept;
* every option says whether it is reloadable where it is declared; plugins get
  ``ms1_config_reloaded`` after the core applied its part; every changed key that needs
  a restart is named in one log line;
* ``[send] threads`` 4 -> 16 -> 2 -> 16 under load: the concurrency follows, nothing is
  lost, released or sent twice.

The end-to-end tests run the service, ms4-sim and redis-server each in its own process.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pluggy
import pytest
from conftest import RedisServer, free_port
from support import service_ini, sim_control
from test_redis_durability import (
    DEAD_LETTERS,
    INBOUND,
    OUTBOUND,
    enqueue,
    make_emails,
    start_service,
    start_sim,
    stop_service,
    tail,
    wait_until,
    xlen,
)

from ms1.cli import command as cli
from ms1.config import CORE_OPTIONS, Config, Option
from ms1.hookspecs import hookimpl
from ms1.model import BATCH_PATH, Batch, Item
from ms1.ops.logs import add_secret, setup_logging
from ms1.pipeline.processor import Accepted, unified_email_processor
from ms1.pipeline.samples import generate
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service

ROOT = Path(__file__).resolve().parents[1]

#: what the README and ms1/hookspecs.py list as taking effect on SIGHUP
CORE_RELOADABLE = {
    ("ms1", "log_level"), ("ms1", "log_format"), ("ms1", "shutdown_timeout"),
    ("source", "read_chunk"),
    ("batch", "max_items"), ("batch", "max_bytes"), ("batch", "max_wait"),
    ("dead_letters", "max_payload_bytes"),
    ("send", "threads"), ("send", "min_concurrency"), ("send", "max_concurrency"),
    ("send", "retry_initial"), ("send", "retry_max"),
    ("send", "requests_per_minute"), ("send", "rate_window"),
    ("send", "ms4_counts_at"), ("send", "count_margin"),
    ("send", "retry_after_default"), ("send", "retry_after_max"),
    ("send", "breaker_failures"), ("send", "breaker_reset"),
    ("send", "auth_probe_interval"), ("send", "max_deliveries"),
    ("send", "refusal_json_details"), ("send", "refusal_index_pattern"),
    ("ms4", "api_key_env"), ("ms4", "api_key_file"),
}


# --- helpers ---------------------------------------------------------------------------


def write_config(path: Path, *, sim_url: str, redis_url: str, threads: int = 2,
                 retry_initial: float = 0.05, retry_max: float = 0.5, max_deliveries: int = 0,
                 log_format: str = "kv", log_level: str = "INFO", max_items: int = 50,
                 metrics_address: str = "", block_timeout: float = 0.2,
                 breaker_failures: int = 5) -> Path:
    path.write_text(service_ini(redis_url, ms4_url=sim_url, settings={
        "ms1": {"shutdown_timeout": 10, "log_format": log_format, "log_level": log_level},
        "metrics": {"address": metrics_address},
        "batch": {"max_items": max_items},
        "send": {"threads": threads, "retry_initial": retry_initial, "retry_max": retry_max,
                 "max_deliveries": max_deliveries, "breaker_failures": breaker_failures,
                 "rate_limiter": "redis"},
        "redis": {"consumer": "reload-test", "visibility_timeout": 10,
                  "block_timeout": block_timeout},
    }))
    return path


def records(log: Path) -> list[dict[str, str]]:
    """The service's kv or json log lines as dicts (other lines skipped)."""
    out: list[dict[str, str]] = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append({k: str(v) for k, v in json.loads(line).items()})
            except ValueError:
                continue
        elif line.startswith("ts="):
            out.append({m.group(1): (m.group(3) if m.group(3) is not None else m.group(2))
                        for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))', line)})
    return out


def seconds(ts: str) -> float:
    """``2026-11-23T09:30:00.123Z`` as seconds since the epoch."""
    import datetime as dt

    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.UTC).timestamp()


def reload_with(service: Any, log: Path, before: int) -> None:
    """SIGHUP; wait until the log shows one more 'configuration reloaded' than ``before``."""
    service.send_signal(signal.SIGHUP)
    assert wait_until(lambda: log.read_text(errors="replace").count("configuration reloaded")
                      > before, 15), tail(log)


def ready(log: Path) -> bool:
    return bool(re.search(r'msg=ready\b|"msg": "ready"|\] ready$',
                          log.read_text(errors="replace"), re.M))


# --- defect 1: reloaded retry settings reach the running senders ----------------------


@pytest.mark.slow
def test_reloaded_retry_initial_reaches_running_senders(own_redis: RedisServer,
                                                        tmp_path: Path, procs: list) -> None:
    """retry_initial 0.5 -> 4 by SIGHUP: the first retry after a 500 waits >= 3 s (before
    the fix the senders kept the 0.5 s they were built with)."""
    sim = start_sim(procs, tmp_path)
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url,
                          threads=1, retry_initial=0.5, retry_max=30, breaker_failures=100)
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    assert wait_until(lambda: ready(log), 30), tail(log)
    write_config(config, sim_url=sim.url, redis_url=own_redis.url, threads=1,
                 retry_initial=4, retry_max=30, breaker_failures=100)
    reload_with(service, log, 0)
    sim_control(sim.url, fail_500=1.0)
    path, _ = make_emails(tmp_path, 1, invalid_every=0)
    enqueue(config, path, 1)

    def failures() -> list[dict[str, str]]:
        return [r for r in records(log) if r.get("msg", "").startswith("batch failed")]

    assert wait_until(lambda: len(failures()) >= 2, 30), tail(log)
    sim_control(sim.url, fail_500=0.0)
    assert wait_until(lambda: sim.accepted() == 1, 60), tail(log)
    first, second = failures()[:2]
    assert (first["attempt"], second["attempt"]) == ("1", "2"), (first, second)
    waited = seconds(second["ts"]) - seconds(first["ts"])
    assert waited >= 3.0, f"first retry after {waited:.2f} s, not after retry_initial 4 s"
    assert stop_service(service, log) == 0, tail(log)


def _hold_as_ghost(client: Any, batch_fields: dict[str, Any], times: int) -> str:
    """Add a batch to the outbound stream already handed to consumer 'ghost' (a dead
    instance) ``times`` times and idle for a minute: the next XAUTOCLAIM takes it over."""
    pipe = client.pipeline(transaction=True)
    pipe.xadd(OUTBOUND, batch_fields)
    pipe.xreadgroup("ms1", "ghost", {OUTBOUND: ">"}, count=1)
    entry_id, _ = pipe.execute()
    for _ in range(times - 2):
        client.xclaim(OUTBOUND, "ms1", "ghost", 0, [entry_id])
    client.xclaim(OUTBOUND, "ms1", "ghost", 0, [entry_id], idle=60_000)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


@pytest.mark.slow
def test_reloaded_max_deliveries_is_enforced(own_redis: RedisServer, tmp_path: Path,
                                             procs: list) -> None:
    """max_deliveries 0 -> 2 by SIGHUP: a batch taken over from a dead instance after its
    third delivery is dead-lettered, not sent (before the fix: sent, 0 kept)."""
    from plugins.redis.outbound import batch_fields

    sim = start_sim(procs, tmp_path)
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url)
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    assert wait_until(lambda: ready(log), 30), tail(log)
    client = own_redis.client()
    # the group exists once the queue was used: wait for it
    assert wait_until(lambda: any(g["name"] in (b"ms1", "ms1")
                                  for g in _groups(client)), 15), tail(log)
    write_config(config, sim_url=sim.url, redis_url=own_redis.url, max_deliveries=2)
    reload_with(service, log, 0)
    accepted = [unified_email_processor(s.data)
                for s in generate(2, invalid_every=0, prefix="MAXD")]
    items = [Item(a.payload, a.invoice_id, a.message_id, "") for a in accepted
             if isinstance(a, Accepted)]
    assert len(items) == 2
    _hold_as_ghost(client, batch_fields(Batch.of(BATCH_PATH, items)), times=3)
    assert wait_until(lambda: xlen(client, DEAD_LETTERS) >= 2 or sim.accepted() > 0, 30), \
        tail(log)
    assert wait_until(lambda: xlen(client, OUTBOUND) == 0, 10), tail(log)
    assert sim.accepted() == 0, "sent although delivered more than max_deliveries times"
    text = log.read_text(errors="replace")
    assert "max_deliveries = 2" in text, tail(log)
    assert xlen(client, DEAD_LETTERS) == 2
    assert stop_service(service, log) == 0, tail(log)
    client.close()


def _groups(client: Any) -> list[dict[str, Any]]:
    try:
        return list(client.xinfo_groups(OUTBOUND))
    except Exception:  # no stream yet
        return []


# --- defect 2: log_format, plugin sections, restart-only keys -------------------------


@pytest.mark.slow
def test_log_format_change_on_sighup_applies_at_once(own_redis: RedisServer, tmp_path: Path,
                                                     procs: list) -> None:
    """kv -> json by SIGHUP: the reload's own lines are JSON already; a restart-only
    change ([redis] block_timeout) is named in one WARNING line, log_format is not."""
    sim = start_sim(procs, tmp_path)
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url)
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    assert wait_until(lambda: ready(log), 30), tail(log)
    write_config(config, sim_url=sim.url, redis_url=own_redis.url, log_format="json",
                 block_timeout=0.3)
    reload_with(service, log, 0)
    # the restart line is written right after the reload's: wait for it (a loaded
    # machine read the log between the two, twice in CI)
    wait_until(lambda: "need a restart" in log.read_text(errors="replace"), 10)
    lines = log.read_text(errors="replace").splitlines()
    reloaded = next(i for i, line in enumerate(lines) if "configuration reloaded" in line)
    assert lines[reloaded].startswith("{"), lines[reloaded]
    assert json.loads(lines[reloaded])["level"] == "INFO"
    restart = [line for line in lines if "need a restart" in line]
    assert len(restart) == 1, restart
    assert "[redis] block_timeout" in restart[0] and "log_format" not in restart[0]
    assert json.loads(restart[0])["level"] == "WARNING"
    path, _ = make_emails(tmp_path, 60, invalid_every=0)
    enqueue(config, path, 60)
    assert wait_until(lambda: sim.accepted() == 60, 30), tail(log)
    sent = [r for r in records(log) if r.get("msg") == "batch sent"]
    assert sent and all(r["ts"] for r in sent)
    assert all(line.startswith("{") for line in
               log.read_text(errors="replace").splitlines()[reloaded:]), tail(log)
    assert stop_service(service, log) == 0, tail(log)


class TunablePlugin:
    """A third-party plugin with one reloadable option and one that needs a restart."""

    def __init__(self) -> None:
        self.level = 0
        self.calls: list[tuple[Config, Config, list[tuple[str, str]], str]] = []

    @hookimpl
    def ms1_config_options(self) -> Sequence[Option]:
        return [Option("tunable", "level", "int", 1, "applied on reload", reloadable=True),
                Option("tunable", "endpoint", "str", "a", "needs a restart")]

    @hookimpl
    def ms1_config_reloaded(self, old: Config, new: Config,
                            changed: Sequence[tuple[str, str]]) -> None:
        self.calls.append((old, new, list(changed), threading.current_thread().name))
        if ("tunable", "level") in changed:
            self.level = new.get_int("tunable", "level")


def test_every_option_says_whether_a_reload_applies_it(pm: pluggy.PluginManager) -> None:
    """Core and built-in plugins declare ``reloadable`` with each option; the core's list
    is the documented one; no built-in plugin option is reloadable."""
    core = {(o.section, o.key) for o in CORE_OPTIONS if o.reloadable}
    assert core == CORE_RELOADABLE
    plugin_options = [o for o in pluginmanager.all_options(pm)
                      if (o.section, o.key) not in {(c.section, c.key) for c in CORE_OPTIONS}]
    assert plugin_options and not [o for o in plugin_options if o.reloadable]


def test_reload_applies_core_and_plugin_options_and_names_restart_keys_in_one_line(
        write_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The hook gets (old, new, changed) on the main thread after the core applied its
    part; one WARNING names every changed key needing a restart, plugin keys included;
    the running config keeps the old values of those (named again on the next reload)."""
    plugin = TunablePlugin()
    pm = pluginmanager.make_plugin_manager(plugins=[plugin])
    path = write_config("[send]\nthreads = 2\nretry_initial = 0.5\nmax_deliveries = 0\n")
    config = pluginmanager.load(pm, str(path))
    parts = Components.build(pm, config.with_values({("source", "name"): "memory"}))
    service = Service(config, pm, parts)
    service.start()
    try:
        path.write_text("[send]\nthreads = 3\nretry_initial = 4\nretry_max = 60\n"
                        "max_deliveries = 7\nbreaker_failures = 9\nbreaker_reset = 2\n"
                        "[tunable]\nlevel = 5\nendpoint = b\n"
                        "[metrics]\naddress = 127.0.0.1:1\n[queue]\nbackend = redis\n")
        with caplog.at_level(logging.INFO):
            cli._reload(service, pm)
        settings = service.send_settings.current
        assert (settings.retry_initial, settings.retry_max, settings.max_deliveries) == \
            (4.0, 60.0, 7)
        assert service.pacer.breaker.fail_max == 9
        assert service.pacer.breaker.reset_timeout == 2.0
        assert plugin.level == 5
        [(old, new, changed, thread)] = plugin.calls
        assert thread == threading.current_thread().name
        assert old is config and new is service.config
        assert ("tunable", "level") in changed and ("send", "retry_initial") in changed
        assert ("tunable", "endpoint") not in changed and ("queue", "backend") not in changed
        assert new.get_str("tunable", "endpoint") == "a"  # still running with the old one
        assert new.get_str("queue", "backend") == "memory"
        restart = [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]
        assert restart == ["changes that need a restart were not applied: [metrics] address, "
                           "[queue] backend, [tunable] endpoint"]
        caplog.clear()
        with caplog.at_level(logging.INFO):
            cli._reload(service, pm)  # the same file: nothing new applied, still pending
        assert len(plugin.calls) == 2 and plugin.calls[1][2] == []
        assert [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()] \
            == restart
        path.write_text("[send]\nthreads = lots\n")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            cli._reload(service, pm)
        assert "reload refused, keeping the running configuration" in caplog.text
        assert len(plugin.calls) == 2 and service.send_settings.current.retry_initial == 4.0
    finally:
        service.shutdown(5)
        parts.close()


def test_log_format_and_level_switch_at_once_keeping_redaction(write_config: Any) -> None:
    """logs.apply_log_settings swaps the formatter of the handler setup_logging made (no
    moment without one) and keeps its redaction filter."""
    from ms1.ops import logs

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "text", stream=stream)
        secret = "reload-secret-0123456789"
        add_secret(secret)
        logs.apply_log_settings("DEBUG", "json")
        logging.getLogger("ms1.test").debug("key is %s", secret)
        line = stream.getvalue().splitlines()[-1]
        assert json.loads(line)["msg"] == "key is ***"
        logs.apply_log_settings("WARNING", "kv")
        logging.getLogger("ms1.test").info("not shown")
        logging.getLogger("ms1.test").warning("shown %s", secret)
        last = stream.getvalue().splitlines()[-1]
        assert last.startswith("ts=") and 'msg="shown ***"' in last
        assert "not shown" not in stream.getvalue()
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


# --- defect 3: [send] threads 4 -> 16 -> 2 -> 16 under load --------------------------


class GatedMs4:
    """MS4 answering 202 once ``gate`` is open; counts the requests in flight itself."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.batch_ids: list[str] = []

    def __call__(self, request: Any) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            self.gate.wait(30)
            with self.lock:
                self.batch_ids.append(request.idempotency_key)
            return 202
        finally:
            with self.lock:
                self.now -= 1

    def in_flight(self) -> int:
        with self.lock:
            return self.now


def test_threads_lowered_then_raised_mid_flight_never_exceeds_the_count(
        pm: pluggy.PluginManager, write_config: Any) -> None:
    """16 senders all inside a request; SIGHUP to 2, then at once back to 16: the 14
    retiring senders are kept, not doubled by 14 new ones (before the fix: 30 requests in
    flight). Lowering to 2 retires senders after their current batch: every batch sent
    once, none released, the count settles at 2."""
    import dataclasses

    from ms1.pipeline.transport import MemoryTransport

    path = write_config("[send]\nthreads = 16\nrequests_per_minute = 100000\n")
    config = pluginmanager.load(pm, str(path))
    ms4 = GatedMs4()
    built = Components.build(pm, config.with_values({("source", "name"): "memory"}))
    parts = dataclasses.replace(built, transport=MemoryTransport(ms4))
    built.transport.close()
    batches = [Batch.of(BATCH_PATH, [Item(b"{}", f"T-{n}", f"<T-{n}>", "")])
               for n in range(200)]
    parts.queue.put_many(batches)
    service = Service(config, pm, parts)
    released: list[str] = []

    class Watch:
        @hookimpl
        def ms1_batch_failed(self, batch: Batch, error: str) -> None:
            released.append(f"{batch.id}: {error}")

    pm.register(Watch())
    service.start()
    try:
        assert wait_until(lambda: ms4.in_flight() == 16, 10), ms4.in_flight()

        def alive() -> int:
            return sum(1 for _, t in service._senders if t.is_alive())

        for threads in (2, 16):
            path.write_text(f"[send]\nthreads = {threads}\nrequests_per_minute = 100000\n")
            cli._reload(service, pm)
        assert alive() == 16
        assert not wait_until(lambda: ms4.most > 16, 1.0, interval=0.02), ms4.most
        path.write_text("[send]\nthreads = 2\nrequests_per_minute = 100000\n")
        cli._reload(service, pm)
        ms4.gate.set()  # the 14 retiring senders finish their batch, then leave
        assert wait_until(lambda: alive() == 2, 10), alive()
        assert wait_until(lambda: parts.queue.stats().empty, 30)
        assert ms4.most == 16
        assert sorted(ms4.batch_ids) == sorted(b.id for b in batches)  # each once
        assert released == []
        assert service.alive()
    finally:
        ms4.gate.set()
        service.shutdown(5)
        parts.close()


#: runs the service with a thread that writes, every 50 ms, the most requests in flight
#: since the last line (Service.in_flight, what ms1_requests_in_flight will export)
SAMPLER = """\
import sys, threading, time
from ms1.cli import command as cli
from ms1.runtime.service import Service
from ms1.pipeline.samples import generate

out_path = sys.argv.pop(1)
start = Service.start


def sampled_start(self):
    start(self)

    def sample():
        with open(out_path, "a") as out:
            while not self.senders_stop.is_set():
                out.write(f"{time.monotonic():.3f} {self.in_flight.take_peak()}\\n")
                out.flush()
                self.senders_stop.wait(0.05)

    threading.Thread(target=sample, name="sampler", daemon=True).start()


Service.start = sampled_start
sys.exit(cli.main(sys.argv[1:]))
"""


def readyz(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.mark.slow
def test_send_threads_4_16_2_16_under_load(own_redis: RedisServer, tmp_path: Path,
                                            procs: list) -> None:
    """8,000 invoices, Redis source/queue/rate limiter, ms4-sim answering in 0.2 s.
    SIGHUP: threads 4 -> 16 -> 2 -> 16. After each raise 16 requests are in flight
    (never more); after the lowering at most 2 once the retiring senders finished their
    batch; /readyz 200 throughout; nothing lost, nothing sent twice, no takeover, no
    batch released, no pool error. (The phases take some 4,700 invoices -- 1,000, 3,000
    more at 16, 300 more at 2, and what is sent while each reload lands -- so the last
    raise still finds a backlog of about 330 requests to keep 16 in flight.)"""
    import subprocess

    sim = start_sim(procs, tmp_path, "--latency", "0.2")
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "ms1.ini"

    def configure(threads: int) -> None:
        write_config(config, sim_url=sim.url, redis_url=own_redis.url, threads=threads,
                     max_items=10, metrics_address=metrics)

    configure(4)
    path, emails = make_emails(tmp_path, 8_000, invalid_every=0)
    enqueue(config, path, len(emails))
    client = own_redis.client()
    log = tmp_path / "service.log"
    samples = tmp_path / "in-flight.txt"
    script = tmp_path / "sampled_ms1.py"
    script.write_text(SAMPLER)
    from test_redis_durability import service_env

    with log.open("ab") as out:
        service = subprocess.Popen([sys.executable, str(script), str(samples), "--config",
                                    str(config)], cwd=ROOT, env=service_env(), stdout=out,
                                   stderr=subprocess.STDOUT)
    procs.append(service)
    assert wait_until(lambda: ready(log), 30), tail(log)

    not_ready: list[int] = []
    polling = threading.Event()

    def poll_readyz() -> None:
        while not polling.wait(0.1):
            status = readyz(metrics)
            if status != 200:
                not_ready.append(status)

    poller = threading.Thread(target=poll_readyz, daemon=True)
    poller.start()

    def peaks_since(since: float) -> list[int]:
        found = []
        for line in samples.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and float(fields[0]) >= since:
                found.append(int(fields[1]))
        return found

    def peak_reached(most: int, since: float) -> bool:
        return max(peaks_since(since), default=0) >= most

    def accepted_at_least(count: int) -> bool:
        return sim.accepted() >= count

    def settled_at_most(most: int, since: float) -> bool:
        recent = peaks_since(since)[-10:]
        return len(recent) == 10 and max(recent) <= most

    reloads = 0
    phases: list[str] = []
    try:
        assert wait_until(lambda: sim.accepted() >= 1_000, 60, interval=0.05), tail(log)
        assert max(peaks_since(0)) <= 4
        for threads in (16, 2, 16):
            configure(threads)
            reload_with(service, log, reloads)
            reloads += 1
            changed_at = time.monotonic()
            before = sim.accepted()
            if threads == 16:
                assert wait_until(partial(peak_reached, 16, changed_at), 20,
                                  interval=0.05), (peaks_since(changed_at), tail(log))
                if reloads == 1:
                    assert wait_until(partial(accepted_at_least, before + 3_000), 60,
                                      interval=0.05), tail(log)
            else:  # the retiring senders finish their batch (0.2 s), then at most 2
                assert wait_until(partial(settled_at_most, 2, changed_at), 20,
                                  interval=0.05), (peaks_since(changed_at), tail(log))
                settled = time.monotonic()
                assert wait_until(partial(accepted_at_least, before + 300), 30,
                                  interval=0.05), tail(log)
                assert max(peaks_since(settled)) <= 2, peaks_since(settled)
            phases.append(f"{threads} threads: most in flight {max(peaks_since(changed_at))}"
                          f" ({sim.accepted()} accepted)")
        finished = wait_until(lambda: sim.accepted() >= len(emails)
                              and xlen(client, INBOUND) == 0 and xlen(client, OUTBOUND) == 0,
                              120, interval=0.1)
    finally:
        polling.set()
        poller.join(10)
    assert service.poll() is None, f"the service exited {service.returncode}:\n{tail(log)}"
    all_peaks = peaks_since(0)
    status = stop_service(service, log)
    stats = sim.stop()
    text = log.read_text(errors="replace")
    print(f"\n{'; '.join(phases)}; most in flight {max(all_peaks)}; accepted "
          f"{stats['unique_invoices_accepted']}, duplicates {stats['duplicate_invoices']} "
          f"invoices / {stats['duplicate_batches']} batches, requests "
          f"{stats['requests_by_status']}, HTTP connections {stats['connections_opened']}")
    assert finished, f"not done: {stats}\n{tail(log)}"
    assert status == 0, tail(log)
    assert max(all_peaks) <= 16, all_peaks
    assert not_ready == [], f"/readyz not 200: {not_ready[:10]}"
    assert not re.search(r"No connection available|ConnectionError|pool", text), tail(log, 60)
    assert "took over" not in text and "released back" not in text, tail(log, 60)
    assert "cannot" not in text, tail(log, 60)
    assert stats["unique_invoices_accepted"] == len(emails)
    assert stats["duplicate_invoices"] == 0 and stats["duplicate_batches"] == 0
    client.close()
