"""Durability of ms1 on a real Redis, end to end, with every part in its own process.

The service (``python -m ms1.cli``), the MS4 simulator (``python -m ms1.sim``) and the
redis-server run as separate processes; the tests kill -9 the service, kill -9 or stop
Redis, run three instances side by side, and use the admin commands, and then count
what the simulator accepted: nothing may be lost, duplicates are measured.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import service_ini, tail, wait_until

from ms1.pipeline import samples
from ms1_tools.sim import REJECT_EVERY_REASON, is_rejected_by_sim

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "durability-test-key"
INBOUND, OUTBOUND, DEAD_LETTERS = "ms1:emails", "ms1:outbound", "ms1:dead-letters"


# --- helpers -------------------------------------------------------------------------


class Sim:
    """An ms4-sim process."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as answer:
            return json.loads(answer.read())

    def accepted(self) -> int:
        return int(self.stats()["unique_invoices_accepted"])

    def stop(self) -> dict[str, Any]:
        """SIGTERM; expects exit 0 and returns the stats line it prints."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, f"ms4-sim exited {self.proc.returncode}: {out!r}"
        found = re.search(rb"ms4-sim stats: (\{.*\})", out)
        assert found, out
        return json.loads(found.group(1))


def start_sim(procs: list[subprocess.Popen[bytes]], tmp_path: Path, *args: str,
              rate_limit: int = 0, window: float = 60, name: str = "sim") -> Sim:
    """An ms4-sim on a free port; unlimited rate unless ``rate_limit`` says otherwise
    (the sim's own default is 120 per 60 s)."""
    log = tmp_path / f"{name}.log"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ms1_tools.sim", "--port", "0", "--api-key", API_KEY,
             "--rate-limit", str(rate_limit), "--window", str(window), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    found = re.match(r"ms4-sim listening on (http://\S+)", line)
    assert found, f"ms4-sim did not start: {line!r}\n{tail(log)}"
    return Sim(proc, found.group(1), log)


def write_config(path: Path, *, sim_url: str, redis_url: str, consumer: str = "instance-1",
                 requests_per_minute: int = 100_000, rate_window: float = 60,
                 threads: int = 4, counts_at: str = "arrival") -> Path:
    path.write_text(service_ini(redis_url, ms4_url=sim_url, settings={
        "ms1": {"shutdown_timeout": 10},
        "send": {"threads": threads, "rate_limiter": "redis", "ms4_counts_at": counts_at,
                 "requests_per_minute": requests_per_minute, "rate_window": rate_window},
        "redis": {"consumer": consumer, "visibility_timeout": 10},
    }))
    return path


def service_env() -> dict[str, str]:
    return {**os.environ, "MS1_MS4_API_KEY": API_KEY}


def start_service(procs: list[subprocess.Popen[bytes]], config: Path,
                  log: Path) -> subprocess.Popen[bytes]:
    """The service in the foreground; its stdout and stderr (the logs) go to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                                cwd=ROOT, env=service_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc


def stop_service(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    """SIGTERM and wait for the exit status (kill -9 and fail if it does not exit)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the service did not exit {timeout} s after SIGTERM:\n{tail(log)}")


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One ms1-service command; output captured."""
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), *args],
                          cwd=ROOT, env=service_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def make_emails(tmp_path: Path, count: int, invalid_every: int
                ) -> tuple[Path, list[samples.Sample]]:
    generated = list(samples.generate(count, invalid_every=invalid_every))
    path = tmp_path / "emails.jsonl"
    samples.write_jsonl(str(path), iter(generated))
    return path, generated


def enqueue(config: Path, emails: Path, count: int) -> None:
    result = cli(config, "enqueue", str(emails), timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"enqueued {count} e-mails" in result.stdout, result.stdout


def xlen(client: Any, stream: str) -> int:
    return int(client.xlen(stream))


def streams_drained(client: Any) -> bool:
    return xlen(client, INBOUND) == 0 and xlen(client, OUTBOUND) == 0


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
def test_kill_9_service_five_times_loses_nothing(own_redis, tmp_path, procs, threads) -> None:
    """Lost 0. Duplicates: MS4 completes every request it fully received, even from a
    client killed meanwhile, so each kill can duplicate the batches in flight — at most
    one per sender thread, each identifiable by its Idempotency-Key. One sender: at most
    50 per kill; four: at most 4 x 50."""
    sim = start_sim(procs, tmp_path, "--latency", "0.03" if threads > 1 else "0.01")
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url,
                          threads=threads)
    path, emails = make_emails(tmp_path, 10_000, invalid_every=100)
    valid = sum(1 for e in emails if e.valid)
    invalid = len(emails) - valid
    enqueue(config, path, len(emails))
    client = own_redis.client()

    # kill when MS4 has accepted a random share of the invoices (not after a random time:
    # the kills must land mid-run however fast this machine delivers)
    rng = random.Random(1337)
    targets = sorted(rng.uniform(0.05, 0.9) * valid for _ in range(5))
    started = time.monotonic()
    log = tmp_path / "service-0.log"
    service = start_service(procs, config, log)
    dups_at_kill = [0]
    for kill, target in enumerate(targets, start=1):
        assert wait_until(lambda t=target: sim.accepted() >= t, 60, interval=0.005), \
            f"MS4 did not reach {target:.0f} accepted invoices:\n{tail(log)}"
        assert service.poll() is None, f"the service exited {service.returncode}:\n{tail(log)}"
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        stats = sim.stats()
        dups_at_kill.append(stats["duplicate_invoices"])
        print(f"\nkill -9 #{kill} at {time.monotonic() - started:.2f} s: "
              f"accepted {stats['unique_invoices_accepted']}/{valid}, "
              f"duplicates so far {stats['duplicate_invoices']}, "
              f"outbound {xlen(client, OUTBOUND)}, inbound {xlen(client, INBOUND)}")
        log = tmp_path / f"service-{kill}.log"
        service = start_service(procs, config, log)

    def done() -> bool:
        return (sim.accepted() >= valid and streams_drained(client)
                and xlen(client, DEAD_LETTERS) >= invalid)

    finished = wait_until(done, 60, interval=0.2)
    elapsed = time.monotonic() - started
    assert service.poll() is None, f"the service exited {service.returncode}:\n{tail(log)}"
    # SIGTERM before the handlers are installed (during start-up) would end it with -15
    assert wait_until(lambda: b"ready" in log.read_bytes(), 30), tail(log)
    status = stop_service(service, log)
    stats = sim.stop()
    dups = stats["duplicate_invoices"]
    per_kill = [b - a for a, b in zip(dups_at_kill, [*dups_at_kill[1:], dups], strict=True)][1:]
    print(f"accepted {stats['unique_invoices_accepted']}/{valid} valid, "
          f"lost {valid - stats['unique_invoices_accepted']}, "
          f"dead letters {xlen(client, DEAD_LETTERS)}/{invalid} invalid, "
          f"duplicate invoices {dups} (after each kill: {per_kill}), "
          f"duplicate batches {stats['duplicate_batches']}, "
          f"requests {stats['requests_by_status']}, elapsed {elapsed:.1f} s")
    assert finished, f"not done after 60 s: {stats}\n{tail(log)}"
    assert status == 0, tail(log)
    assert stats["unique_invoices_accepted"] == valid
    assert xlen(client, DEAD_LETTERS) == invalid
    assert xlen(client, INBOUND) == 0
    assert xlen(client, OUTBOUND) == 0
    # every duplicate is an invoice of a whole batch re-sent with its Idempotency-Key
    assert dups <= 50 * stats["duplicate_batches"], stats
    # A kill's re-sends happen after the restart (and after the next one, if that restart
    # was itself killed first), so they are bounded over the run, not per interval.
    assert dups <= 50 * threads * 5, f"{dups} duplicates after 5 kills (per interval: " \
                                     f"{per_kill})"
    client.close()


def _redis_outage_run(own_redis, tmp_path, procs, *, outage: Callable[[], None],
                      outage_seconds: float) -> tuple[Path, dict[str, Any], float]:
    """Service running, 5,000 e-mails enqueued, Redis down mid-run for a while, then back:
    the service must carry on by itself. Returns the log, the sim stats, elapsed."""
    sim = start_sim(procs, tmp_path, "--latency", "0.02")
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=own_redis.url)
    path, emails = make_emails(tmp_path, 5_000, invalid_every=100)
    valid = sum(1 for e in emails if e.valid)
    invalid = len(emails) - valid
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    started = time.monotonic()
    enqueue(config, path, len(emails))
    # mid-run: the 5,000 take about a second, so Redis goes once a fifth is accepted
    assert wait_until(lambda: sim.accepted() >= 1_000, 20, interval=0.02), tail(log)
    outage()
    before = sim.stats()
    print(f"\nRedis down at {time.monotonic() - started:.2f} s with "
          f"{before['unique_invoices_accepted']}/{valid} accepted")
    assert before["unique_invoices_accepted"] < valid, "the outage came after the run"
    time.sleep(outage_seconds)
    alive_during = service.poll() is None
    own_redis.start()
    client = own_redis.client()
    print(f"Redis back at {time.monotonic() - started:.2f} s with "
          f"{sim.accepted()}/{valid} accepted, inbound {xlen(client, INBOUND)}, "
          f"outbound {xlen(client, OUTBOUND)}")

    def done() -> bool:
        return (sim.accepted() >= valid and streams_drained(client)
                and xlen(client, DEAD_LETTERS) >= invalid)

    finished = wait_until(done, 60, interval=0.2)
    elapsed = time.monotonic() - started
    assert alive_during, f"the service exited during the outage:\n{tail(log)}"
    assert service.poll() is None, f"the service exited {service.returncode}:\n{tail(log)}"
    status = stop_service(service, log)
    stats = sim.stop()
    print(f"accepted {stats['unique_invoices_accepted']}/{valid}, "
          f"lost {valid - stats['unique_invoices_accepted']}, "
          f"dead letters {xlen(client, DEAD_LETTERS)}/{invalid}, "
          f"duplicate invoices {stats['duplicate_invoices']}, "
          f"requests {stats['requests_by_status']}, elapsed {elapsed:.1f} s")
    assert finished, f"not done 60 s after Redis came back: {stats}\n{tail(log)}"
    assert status == 0, tail(log)
    assert stats["unique_invoices_accepted"] == valid
    assert xlen(client, DEAD_LETTERS) == invalid
    assert streams_drained(client)
    client.close()
    return log, stats, elapsed


def test_kill_9_redis_mid_run_recovers(own_redis, tmp_path, procs) -> None:
    _redis_outage_run(own_redis, tmp_path, procs, outage=own_redis.kill, outage_seconds=2)


def test_redis_unreachable_10_seconds_no_thread_dies(own_redis, tmp_path, procs) -> None:
    log, _, _ = _redis_outage_run(own_redis, tmp_path, procs, outage=own_redis.stop,
                                  outage_seconds=10)
    text = log.read_text(errors="replace")
    assert re.search(r"retrying|cannot|waiting for it", text), tail(log)
    assert "died" not in text, tail(log)
    waits = [line for line in text.splitlines() if re.search(r"retrying|waiting for it", line)]
    print(f"{len(waits)} 'waiting/retrying' log lines, e.g. {waits[0][:200]!r}")


@pytest.mark.xdist_group("measure")
def test_three_instances_share_work_and_the_rate_limit(own_redis, tmp_path, procs) -> None:
    sim = start_sim(procs, tmp_path, rate_limit=60, window=2)
    # slots stamped at the answer: the shared count holds whenever the sim, on a machine the
    # suite loads, gets round to counting a request (stamping at arrival + 0.1 s drew 3
    # 429s of 203 once in CI with a 2 s window; the share of the ceiling three instances
    # reach counting at arrival is tests/test_concurrency.py's, run alone)
    configs = [write_config(tmp_path / f"ms1-{n}.ini", sim_url=sim.url,
                            redis_url=own_redis.url, consumer=f"instance-{n}",
                            requests_per_minute=60, rate_window=2, counts_at="answer")
               for n in (1, 2, 3)]
    path, emails = make_emails(tmp_path, 10_000, invalid_every=0)
    enqueue(configs[0], path, len(emails))
    client = own_redis.client()
    started = time.monotonic()
    logs = [tmp_path / f"service-{n}.log" for n in (1, 2, 3)]
    services = [start_service(procs, config, log)
                for config, log in zip(configs, logs, strict=True)]

    finished = wait_until(lambda: sim.accepted() >= len(emails) and streams_drained(client),
                          60, interval=0.2)
    elapsed = time.monotonic() - started
    for service, log in zip(services, logs, strict=True):
        assert service.poll() is None, f"an instance exited {service.returncode}:\n{tail(log)}"
    consumers = {c["name"].decode(): c for c in client.xinfo_consumers(OUTBOUND, "ms1")}
    statuses = [stop_service(service, log) for service, log in zip(services, logs, strict=True)]
    stats = sim.stop()
    delivered = []
    for log in logs:
        found = re.search(r"stopped: .*delivered: (\d+) batches \((\d+) invoices\)",
                          log.read_text(errors="replace"))
        assert found, f"no summary in {log}:\n{tail(log)}"
        delivered.append((int(found.group(1)), int(found.group(2))))
    print(f"\naccepted {stats['unique_invoices_accepted']}/{len(emails)}, "
          f"requests {stats['requests_total']} {stats['requests_by_status']}, "
          f"max_in_window {stats['max_in_window']} (limit 60 per 2 s), "
          f"duplicates {stats['duplicate_invoices']}, elapsed {elapsed:.1f} s, "
          f"per instance (batches, invoices): {delivered}, consumers {sorted(consumers)}")
    assert finished, f"not done after 60 s: {stats}"
    assert statuses == [0, 0, 0], [tail(log) for log in logs]
    assert stats["unique_invoices_accepted"] == len(emails)
    assert "429" not in stats["requests_by_status"]
    assert stats["max_in_window"] <= 60
    assert {"instance-1", "instance-2", "instance-3"} <= set(consumers)
    assert all(batches > 0 for batches, _ in delivered), delivered
    assert sum(invoices for _, invoices in delivered) >= len(emails)
    client.close()


def test_status_dlq_list_and_replay_against_real_redis(redis_url, tmp_path, procs) -> None:
    sim = start_sim(procs, tmp_path, "--reject-every", "7")
    config = write_config(tmp_path / "ms1.ini", sim_url=sim.url, redis_url=redis_url)
    path, emails = make_emails(tmp_path, 300, invalid_every=0)
    rejected = {e.invoice_id for e in emails if is_rejected_by_sim(e.invoice_id, 7)}
    assert 10 < len(rejected) < 100
    enqueue(config, path, len(emails))

    once = cli(config, "--once")
    assert once.returncode == 0, once.stdout + once.stderr
    first = sim.stop()
    assert first["unique_invoices_accepted"] == len(emails) - len(rejected)

    status = cli(config, "status", "--json", timeout=30)
    assert status.returncode == 0, status.stderr
    parts = json.loads(status.stdout)
    assert {"source", "queue", "dead_letters"} <= set(parts), parts
    assert parts["dead_letters"]["count"] == len(rejected), parts
    assert parts["source"]["length"] == 0 and parts["queue"]["length"] == 0, parts

    listed = cli(config, "dlq", "list", "--json", "--limit", "1000", timeout=30)
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert len(letters) == len(rejected)
    assert {letter["invoice_id"] for letter in letters} == rejected
    for letter in letters:
        assert letter["stage"] == "ms4", letter
        assert REJECT_EVERY_REASON in letter["reason"], letter

    sim = start_sim(procs, tmp_path, name="sim-2")
    config = write_config(tmp_path / "ms1-2.ini", sim_url=sim.url, redis_url=redis_url)
    replay = cli(config, "dlq", "replay", "--all", timeout=30)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"replayed {len(rejected)} dead letters" in replay.stdout, replay.stdout
    once = cli(config, "--once")
    assert once.returncode == 0, once.stdout + once.stderr
    second = sim.stop()
    status = cli(config, "status", "--json", timeout=30)
    parts = json.loads(status.stdout)
    print(f"\nrejected by the sim {len(rejected)} of {len(emails)}, dead letters listed "
          f"{len(letters)}, {replay.stdout.strip()!r}, accepted after replay "
          f"{second['unique_invoices_accepted']}, dead letters now "
          f"{parts['dead_letters']['count']}")
    assert second["unique_invoices_accepted"] == len(rejected)
    assert second["duplicate_invoices"] == 0
    assert parts["dead_letters"]["count"] == 0, parts


def test_a_5_second_redis_outage_is_two_lines_per_stage_not_one_per_sender(
        own_redis, tmp_path, procs) -> None:
    """Issue 21: an idle service with its default 64 senders, Redis stopped for 5 s: before,
    every sender logged its own ERROR and WARNING (130 lines); now the senders share one
    outage (ms1.pipeline.sending.sender.Outage) and every pipeline stage says it at most twice."""
    sim = start_sim(procs, tmp_path)
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(own_redis.url, ms4_url=sim.url,
                                  settings={"ms1": {"log_format": "text"}}))
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    assert wait_until(lambda: "ready" in log.read_text(errors="replace"), 30), tail(log)
    own_redis.stop()
    time.sleep(5)  # the outage itself
    own_redis.start()
    assert wait_until(lambda: "answers again" in log.read_text(errors="replace"), 30), tail(log)
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if re.search(r" (ERROR|WARNING|CRITICAL) ", line)]
    by_stage: dict[str, int] = {}
    for line in lines:
        found = re.search(r" \[([a-z-]+?)(?:-\d+)?\] ", line)
        stage = found.group(1) if found else "?"
        by_stage[stage] = by_stage.get(stage, 0) + 1
    print(f"\n5 s Redis outage, {len(lines)} lines by stage: {by_stage}")
    assert service.poll() is None, tail(log)
    assert by_stage.get("sender", 0) <= 2, lines
    assert all(count <= 2 for count in by_stage.values()), by_stage
