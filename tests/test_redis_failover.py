"""Redis that fails over, with every part in its own process: nothing lost across a failover.

Topologies (``tests/redis_topologies.py``): a primary, a replica and three Sentinels; a
Redis Cluster of three primaries with one replica each. The service (``python -m
ms1.cli.command``) and ``ms4-sim`` run as processes; e-mails come in as the ingestor would send
them, through ``ms1-service enqueue`` and the ingestor's helper (:mod:`ms1.runtime.ingest`) with
``[redis] min_replicas_acked = 1``, retried under the same key when a submit is not
acknowledged. Mid-run the test kills the primary with SIGKILL; Sentinel (or the cluster)
promotes the replica; the killed server is started again and becomes a replica of the new
primary. Then every e-mail must reach MS4 (lost = 0), with at most ``senders x batch size``
duplicate invoices per failover, the service must say once which primary it now uses, and
``status`` must show it.

Also here: without ``min_replicas_acked`` an e-mail the old primary acknowledged is gone
after a failover (the loss window is real, so the setting matters), while with it the
same e-mail is reported as not safe and a retry under its key adds it once; the key rule,
the options' checks, idempotent submits and secrets with Sentinel.

The default run takes one failover per topology (2,500 invoices each). ``MS1_FAILOVER_FULL=1``
runs the acceptance figures: three Sentinel runs of 10,000 invoices, a failover during a
401 spell and one while the breaker is open, and 10,000 invoices through the cluster::

    MS1_FAILOVER_FULL=1 .venv/bin/python -m pytest -s tests/test_redis_failover.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis_topologies import (  # the fixtures too, for the tests here
    SERVICE,
    ClusterSetup,
    Node,
    SentinelSetup,
    cluster_setup_fixture,  # noqa: F401  # the fixture cluster_setup
    sentinel_setup_fixture,  # noqa: F401  # the fixture sentinel_setup
)
from support import SimProcess, service_ini, tail, wait_until
from test_redis_durability import stop_service as sigterm_and_wait

from ms1.errors import ConfigError
from ms1.pipeline import samples
from ms1.runtime import pluginmanager
from ms1.runtime.ingest import Inbound, SubmitError
from ms1_plugins.redis import link_for
from ms1_plugins.redis.link import key_names, tagged

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("MS1_FAILOVER_FULL") == "1"
API_KEY = "failover-test-key"
THREADS, BATCH = 4, 50
#: invoices per run: the acceptance figure with MS1_FAILOVER_FULL=1, else a CI-sized one
COUNT = 10_000 if FULL else 2_500
#: e-mails per helper call, and the pause between calls (a steady ingestor, some 330 a
#: second: a run of 2,500 lasts about 8 s, one of 10,000 about 30 s)
CHUNK, PAUSE = 50, 0.15
#: e-mails pushed with 'ms1-service enqueue' before the helper takes over, and again by an
#: 'enqueue' started as the primary is killed (it retries through the failover)
CLI_EMAILS = 500
#: the drain fails once nothing has moved for this long
STALL_TIMEOUT = 30.0


# --- ms4-sim and the service as processes ------------------------------------------------


class Sim(SimProcess):
    def __init__(self, procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
        super().__init__(procs, tmp_path / "sim.log", "--api-key", API_KEY, "--rate-limit",
                         "0", "--latency", "0.02")


def start_service(procs: list[subprocess.Popen[bytes]], config: Path,
                  log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MS1_MS4_API_KEY": API_KEY}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc


def stop_service(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    """SIGTERM once the service handles it; its exit status."""
    assert wait_until(lambda: "ready" in log.read_text(errors="replace")
                      or proc.poll() is not None, 60), f"never ready:\n{tail(log)}"
    return sigterm_and_wait(proc, log, timeout)


def cli(config: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), *args],
                          cwd=ROOT, env={**os.environ, "MS1_MS4_API_KEY": API_KEY},
                          capture_output=True, text=True, timeout=timeout, check=False)


# --- the topologies, as the run sees them ---------------------------------------------------


class Topo:
    """What a run needs of a topology: its [redis] settings, the primary, a failover."""

    name = "?"

    def settings(self) -> dict[str, object]:
        raise NotImplementedError

    def primary(self) -> Node:
        raise NotImplementedError

    def failover(self) -> tuple[Node, Node, float]:
        raise NotImplementedError

    def restart(self, node: Node) -> None:
        raise NotImplementedError


class SentinelTopo(Topo):
    name = "sentinel"

    def __init__(self, setup: SentinelSetup) -> None:
        self.setup = setup

    def settings(self) -> dict[str, object]:
        return {"url": "redis://127.0.0.1/0", "sentinels": self.setup.sentinel_addresses,
                "service_name": SERVICE}

    def primary(self) -> Node:
        return self.setup.primary()

    def failover(self) -> tuple[Node, Node, float]:
        return self.setup.failover()

    def restart(self, node: Node) -> None:
        self.setup.restart(node)


class ClusterTopo(Topo):
    name = "cluster"

    def __init__(self, setup: ClusterSetup) -> None:
        self.setup = setup

    def settings(self) -> dict[str, object]:
        return {"url": self.setup.url, "cluster": "yes",
                "cluster_nodes": self.setup.startup_nodes}

    def primary(self) -> Node:
        return self.setup.primary_for("{ms1}")

    def failover(self) -> tuple[Node, Node, float]:
        return self.setup.failover("{ms1}")

    def restart(self, node: Node) -> None:
        self.setup.restart(node)


# --- the ingestor ---------------------------------------------------------------------------


class Feeder(threading.Thread):
    """The ingestor: submits e-mails in chunks through :class:`ms1.runtime.ingest.Inbound`, and
    when a submit is not acknowledged, submits the same chunk again under the same key
    (the documented way: a retry adds nothing twice)."""

    def __init__(self, config: Path, emails: list[samples.Sample]) -> None:
        super().__init__(name="feeder", daemon=True)
        self.config, self.emails = config, emails
        self.done = 0
        self.retries = 0
        self.failure: BaseException | None = None
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with Inbound(str(self.config)) as inbound:
                for start in range(0, len(self.emails), CHUNK):
                    chunk = [s.data for s in self.emails[start:start + CHUNK]]
                    key: str | None = None
                    deadline = time.monotonic() + 120
                    while True:
                        try:
                            key = inbound.submit(chunk, key=key)
                            break
                        except SubmitError as exc:
                            key = exc.key
                            self.retries += 1
                            if len(self.errors) < 5:
                                self.errors.append(str(exc)[:300])
                            if time.monotonic() > deadline or self.stop.is_set():
                                raise
                            time.sleep(0.1)
                    self.done += len(chunk)
                    time.sleep(PAUSE)
        except BaseException as exc:  # reported by the test
            self.failure = exc


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Figures:
    topology: str
    mode: str
    count: int
    primary_before: str = ""
    primary_after: str = ""
    promoted_s: float = 0.0  # kill -9 -> the new primary serves
    resumed_s: float = 0.0  # kill -9 -> MS4 accepts again
    accepted: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0  # invoices MS4 accepted more than once
    duplicate_batches: int = 0  # requests with an Idempotency-Key MS4 had accepted before
    other_key_duplicates: int = 0  # invoices accepted under more than one key
    bound: int = THREADS * BATCH
    submit_retries: int = 0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.topology}/{self.mode}: {self.count} invoices, lost {len(self.lost)}, "
                f"duplicates {self.duplicates} (bound {self.bound}; same key "
                f"{self.duplicate_batches} requests, other key {self.other_key_duplicates} "
                f"invoices), primary {self.primary_before} -> {self.primary_after}, "
                f"promoted {self.promoted_s:.1f} s, MS4 accepting again {self.resumed_s:.1f} s "
                f"after the kill, submit retries {self.submit_retries}, run {self.elapsed_s:.1f} s")


def write_config(path: Path, topo: Topo, sim_url: str, **redis: object) -> Path:
    path.write_text(service_ini("redis://127.0.0.1/0", ms4_url=sim_url, settings={
        "ms1": {"shutdown_timeout": 10},
        "batch": {"max_items": BATCH, "max_wait": 0.2},
        "send": {"threads": THREADS, "rate_limiter": "redis", "breaker_failures": 5,
                 "breaker_reset": 1, "auth_probe_interval": 1},
        "redis": {"consumer": f"failover-{topo.name}", "visibility_timeout": 6,
                  "min_replicas_acked": 1, "replica_ack_timeout": 0.5,
                  **topo.settings(), **redis},
    }))
    return path


def stream_state(node: Node) -> tuple[int, int, int, int]:
    """Inbound and outbound length and pending, read on ``node`` (the primary)."""
    names = ("{ms1}:emails", "{ms1}:outbound") if "cluster" in str(node.dir) else \
        ("ms1:emails", "ms1:outbound")
    client = node.client(timeout=2)
    try:
        state = []
        for stream in names:
            state.append(int(client.xlen(stream)))
            try:
                state.append(int(client.xpending(stream, "ms1")["pending"]))
            except redis_py.ResponseError:
                state.append(0)
        return tuple(state)  # type: ignore[return-value]
    finally:
        client.close()


def failover_run(topo: Topo, tmp_path: Path, procs: list[subprocess.Popen[bytes]], *,
                 count: int = COUNT, mode: str = "plain") -> Figures:
    """Feed ``count`` e-mails (500 with ``enqueue`` first, then the helper) while the
    service runs; once the helper has submitted 40 % of its part, start another ``enqueue``
    of 500 and kill -9 the primary (during a 401 spell or with the breaker open, by
    ``mode``); restart it as a replica; drain; stop the service. Returns the figures."""
    figures = Figures(topology=topo.name, mode=mode, count=count)
    sim = Sim(procs, tmp_path)
    config = write_config(tmp_path / "ms1.ini", topo, sim.url)
    log = tmp_path / "service.log"
    emails = list(samples.generate(count, prefix=f"FO{mode[:1].upper()}"))
    started = time.monotonic()
    first, late = tmp_path / "first.jsonl", tmp_path / "late.jsonl"
    first.write_bytes(b"".join(s.data + b"\n" for s in emails[:CLI_EMAILS]))
    late.write_bytes(b"".join(s.data + b"\n" for s in emails[CLI_EMAILS:2 * CLI_EMAILS]))
    pushed = cli(config, "enqueue", str(first))
    assert pushed.returncode == 0, pushed.stderr
    service = start_service(procs, config, log)
    assert wait_until(lambda: "ready" in log.read_text(errors="replace"), 60), tail(log)
    feeder = Feeder(config, emails[2 * CLI_EMAILS:])
    feeder.start()
    try:
        assert wait_until(lambda: feeder.done >= len(feeder.emails) * 0.4 or
                          feeder.failure is not None, 120), "the feeder does not progress"
        assert wait_until(lambda: int(sim.stats()["invoices_accepted"]) > 0, 30), \
            f"nothing delivered:\n{tail(log)}"
        assert feeder.failure is None, f"feeder: {feeder.failure!r}"
        if mode == "401":
            sim.control(api_key="not-the-key")
            assert wait_until(lambda: "MS4 answered 401" in log.read_text(errors="replace"),
                              30), f"no 401 spell:\n{tail(log)}"
            figures.notes.append("401 spell begun before the kill")
        elif mode == "breaker":
            sim.control(fail_500=1.0)
            assert wait_until(lambda: "breaker open" in log.read_text(errors="replace"), 30), \
                f"the breaker did not open:\n{tail(log)}"
            figures.notes.append("breaker open before the kill")
        figures.primary_before = topo.primary().address
        accepted_before = int(sim.stats()["invoices_accepted"])
        late_enqueue = subprocess.Popen(
            [sys.executable, "-m", "ms1.cli", "--config", str(config), "enqueue", str(late)],
            cwd=ROOT, env={**os.environ, "MS1_MS4_API_KEY": API_KEY},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(late_enqueue)
        old, new, figures.promoted_s = topo.failover()
        killed_at = time.monotonic() - figures.promoted_s
        figures.primary_after = new.address
        if mode == "401":
            sim.control(api_key=API_KEY)  # the spell ends: the probe gets a 202
        elif mode == "breaker":
            sim.control(fail_500=0.0)
        topo.restart(old)
        out, err = late_enqueue.communicate(timeout=180)
        assert late_enqueue.returncode == 0, err.decode(errors="replace")
        assert f"enqueued {CLI_EMAILS} e-mails".encode() in out, out
        if b"retrying" in err:
            figures.notes.append("the enqueue started at the kill retried through the failover")
        assert wait_until(lambda: int(sim.stats()["invoices_accepted"]) > accepted_before,
                          60, 0.02), f"MS4 accepts nothing after the failover:\n{tail(log)}"
        figures.resumed_s = time.monotonic() - killed_at
        # Sentinel converges: the restarted old primary may answer as one for a moment
        shown: list[subprocess.CompletedProcess[str]] = []
        assert wait_until(lambda: shown.append(cli(config, "status")) is None and
                          f"primary {new.address}" in shown[-1].stdout, 20, 0.5), \
            shown[-1].stdout + shown[-1].stderr
        feeder.join(180)
        assert not feeder.is_alive(), "the feeder did not finish"
        assert feeder.failure is None, f"feeder: {feeder.failure!r} {feeder.errors}"
        figures.submit_retries = feeder.retries
        drained = _drain(sim, new, count, service, log)
    finally:
        feeder.stop.set()
    exit_status = stop_service(service, log)
    figures.elapsed_s = time.monotonic() - started
    _count(figures, emails, sim.accepted(), sim.stats())
    text = log.read_text(errors="replace")
    print(f"\n{figures.line()}" + "".join(f"\n  {note}" for note in figures.notes), flush=True)
    assert not figures.lost, f"LOST {len(figures.lost)}: {figures.lost[:10]}\n{tail(log)}"
    assert drained, f"not drained: {stream_state(new)}\n{tail(log)}"
    assert exit_status == 0, f"exit {exit_status}\n{tail(log)}"
    assert figures.duplicates <= figures.bound, figures.line()
    changes = re.findall(r"the primary is now (\S+)", text)
    assert changes == [new.address], f"primary changes logged: {changes}\n{tail(log)}"
    assert "Traceback" not in text, tail(log, 80)
    _ledger_is_as_complete_as_the_queue(config, emails, sim.accepted(), figures.elapsed_s)
    return figures


def _ledger_is_as_complete_as_the_queue(config: Path, emails: list[samples.Sample],
                                        accepted: list[dict[str, Any]], elapsed: float) -> None:
    """Issue 24: the ledger survives the failover as the queue does — every e-mail read
    once, every one accepted (``reconcile`` balances with nothing pending), and ``trace``
    names a key MS4 accepted the invoice under."""
    shown = cli(config, "reconcile", "--since", f"{elapsed + 120:.0f}s", "--csv")
    assert shown.returncode == 0, shown.stdout[-2000:] + shown.stderr
    rows = [line.split(",") for line in shown.stdout.splitlines()[1:]]
    assert sorted(row[1] for row in rows) == sorted(s.invoice_id for s in emails)
    assert {row[3] for row in rows} == {"accepted"}, [r for r in rows if r[3] != "accepted"][:5]
    keys: dict[str, set[str]] = {}
    for request in accepted:
        for invoice in request["invoice_ids"]:
            keys.setdefault(invoice, set()).add(str(request["idempotency_key"]))
    for sample in emails[::1000]:
        traced = cli(config, "trace", sample.invoice_id, "--json")
        assert traced.returncode == 0, traced.stderr
        record = json.loads(traced.stdout)
        assert record["outcome"] == "accepted", record
        assert {e["batch"] for e in record["events"] if e["kind"] == "accepted"} <= \
            keys[sample.invoice_id], record


def _drain(sim: Sim, primary: Node, count: int, service: subprocess.Popen[bytes],
           log: Path) -> bool:
    """Until MS4 has every invoice and both streams are empty with nothing pending (True),
    or nothing has moved for STALL_TIMEOUT s (False)."""
    moved = time.monotonic()
    last: object = None
    while True:
        assert service.poll() is None, f"the service died:\n{tail(log)}"
        unique = int(sim.stats()["unique_invoices_accepted"])
        state = stream_state(primary)
        if unique >= count and not any(state):
            return True
        if (unique, state) != last:
            last, moved = (unique, state), time.monotonic()
        if time.monotonic() - moved > STALL_TIMEOUT:
            return False
        time.sleep(0.2)


def _count(figures: Figures, emails: list[samples.Sample], accepted: list[dict[str, Any]],
           stats: dict[str, Any]) -> None:
    keys_of: dict[str, set[str]] = {}
    seen_keys: set[str] = set()
    for request in accepted:
        key = str(request["idempotency_key"])
        figures.duplicate_batches += key in seen_keys
        seen_keys.add(key)
        for invoice_id in request["invoice_ids"]:
            keys_of.setdefault(invoice_id, set()).add(key)
    figures.accepted = len(keys_of)
    figures.lost = [s.invoice_id for s in emails if s.invoice_id not in keys_of]
    figures.duplicates = int(stats["duplicate_invoices"])
    figures.other_key_duplicates = sum(1 for keys in keys_of.values() if len(keys) > 1)


# --- the failover runs ----------------------------------------------------------------------


@pytest.mark.parametrize("run", range(3 if FULL else 1))
def test_sentinel_failover_mid_run_loses_nothing(sentinel_setup: SentinelSetup, tmp_path: Path,
                                                 procs: list[subprocess.Popen[bytes]],
                                                 run: int) -> None:
    """kill -9 of the primary mid-run: Sentinel promotes the replica, the service carries
    on without a restart and says once which primary it now uses; lost 0, duplicates at
    most senders x batch size."""
    failover_run(SentinelTopo(sentinel_setup), tmp_path, procs)


@pytest.mark.skipif(not FULL, reason="acceptance run: MS1_FAILOVER_FULL=1")
@pytest.mark.parametrize("mode", ["401", "breaker"])
def test_sentinel_failover_while_sending_is_held_back(sentinel_setup: SentinelSetup,
                                                      tmp_path: Path,
                                                      procs: list[subprocess.Popen[bytes]],
                                                      mode: str) -> None:
    """The failover comes while every sender is stopped by a 401 spell, or while the
    breaker is open: once MS4 answers again, everything is delivered."""
    failover_run(SentinelTopo(sentinel_setup), tmp_path, procs, mode=mode)


def test_cluster_failover_of_ms1s_slot_loses_nothing(cluster_setup: ClusterSetup,
                                                     tmp_path: Path,
                                                     procs: list[subprocess.Popen[bytes]]
                                                     ) -> None:
    """The full pipeline through a three-primary cluster; kill -9 of the primary holding
    ms1's slot: its replica is promoted, lost 0."""
    failover_run(ClusterTopo(cluster_setup), tmp_path, procs)


# --- the loss window, and what min_replicas_acked does about it ---------------------------------


def inbound_config(path: Path, redis: dict[str, object]) -> Path:
    """A config the ingestor's helper can open (the service's, with the memory MS4)."""
    path.write_text(service_ini("redis://127.0.0.1/0", settings={"redis": redis}))
    return path


def inbound_emails(node: Node, stream: str = "ms1:emails") -> list[bytes]:
    client = node.client()
    try:
        return [fields[b"email"] for _, fields in client.xrange(stream)]
    finally:
        client.close()


def test_without_min_replicas_acked_an_acknowledged_email_is_lost_in_a_failover(
        sentinel_setup: SentinelSetup, tmp_path: Path) -> None:
    """The loss window is real: the replica loses its link (and cannot get it back), the
    ingestor adds an e-mail, the primary acknowledges it and dies, the replica is promoted
    without it. With ``min_replicas_acked = 0`` the ingestor was told "added": the e-mail is
    lost. With ``min_replicas_acked = 1`` the same submit fails (not acknowledged by a
    replica), and the retry under its key, once a replica is back, adds it exactly once. An
    e-mail submitted with ``min_replicas_acked = 1`` while the replica was healthy
    survives."""
    setup = sentinel_setup
    where = {"sentinels": setup.sentinel_addresses, "service_name": SERVICE,
             "replica_ack_timeout": 0.3}
    unsafe = Inbound(str(inbound_config(tmp_path / "unsafe.ini", where)))
    safe = Inbound(str(inbound_config(tmp_path / "safe.ini", {**where,
                                                              "min_replicas_acked": 1})))
    kept, lost, refused = (s.data for s in samples.generate(3, prefix="WINDOW"))
    try:
        safe.submit([kept])  # the replica is healthy: acknowledged
        primary, replica = setup.primary(), setup.replica()
        _cut_replication(primary, replica)
        unsafe.submit([lost])  # the primary alone has it, and says so
        with pytest.raises(SubmitError) as caught:
            safe.submit([refused])
        assert caught.value.added is True and "only 0 of 1 replicas" in str(caught.value)
        assert inbound_emails(primary) == [kept, lost, refused]

        old, new, _ = setup.failover()
        assert new is replica
        _mend_replication(new)
        after = inbound_emails(new)
        assert kept in after  # acknowledged by a replica: kept
        assert lost not in after  # acknowledged by the old primary only: LOST
        assert refused not in after  # ... but the ingestor was told, and still has it

        setup.restart(old)  # a replica again: WAITs can succeed
        assert safe.submit([refused], key=caught.value.key) == caught.value.key
        assert safe.submit([refused], key=caught.value.key) == caught.value.key  # again: no-op
        assert inbound_emails(new) == [kept, refused]
    finally:
        unsafe.close()
        safe.close()


def _cut_replication(primary: Node, replica: Node) -> None:
    """The replica's link drops, and its next handshake is refused (AUTH as nobody): from
    here on the primary's writes reach no replica."""
    replica_client, primary_client = replica.client(), primary.client()
    try:
        replica_client.config_set("masteruser", "ms1-test-nobody")
        replica_client.config_set("masterauth", "no-such-password")
        primary_client.client_kill_filter(_type="replica")
    finally:
        replica_client.close()
        primary_client.close()
    assert wait_until(lambda: primary.info("replication")["connected_slaves"] == 0, 10)


def _mend_replication(node: Node) -> None:
    client = node.client()
    try:
        client.config_set("masteruser", "")
        client.config_set("masterauth", "")
    finally:
        client.close()


def test_consumer_group_positions_going_back_lose_nothing(sentinel_setup: SentinelSetup,
                                                          tmp_path: Path, pm: Any) -> None:
    """A failover can take back the group's reads and acks (the new primary never got
    them): e-mails ms1 read, batched and acked on the old primary are undelivered again on
    the new one. The batch the committer still holds is not stored there (none of its
    e-mails is pending: the script skips it), the e-mails are read again and stored once;
    an outbound batch whose delivery went back is acked once (its sender had its 202)."""
    from ms1.model import BATCH_PATH, Batch, Item

    setup = sentinel_setup
    config = pluginmanager.load(pm, str(inbound_config(tmp_path / "ms1.ini", {
        "sentinels": setup.sentinel_addresses, "service_name": SERVICE,
        "visibility_timeout": 30})))
    emails = [s.data for s in samples.generate(3, prefix="BACK")]
    source = pluginmanager.build_source(pm, config)
    queue = pluginmanager.build_queue(pm, config)
    try:
        assert source.read(10, 0.05) == []  # the groups exist (and are replicated)
        queue.put(Batch.of(BATCH_PATH, [Item(b'{"invoice_id":"OUT-1"}', "OUT-1", "<o>", "")]))
        source.push(emails)
        assert acknowledged_by_replica(setup)
        primary, replica = setup.primary(), setup.replica()
        _cut_replication(primary, replica)
        # on the old primary only: the reads, the batch stored with its e-mails acked, and
        # the outbound batch handed out
        read = source.read(10, 1.0)
        assert [m.data for m in read] == emails
        batch = Batch.of(BATCH_PATH, [Item(m.data, f"BACK-{n}", f"<{n}>", m.ref)
                                      for n, m in enumerate(read)])
        queue.put_many([batch], source)
        out = queue.get("s", 1.0)  # (the batch of the three is prefetched with it)
        assert out is not None and out.batch.invoice_ids == ("OUT-1",)
        assert stream_state(primary) == (0, 0, 2, 2)

        old, new, _ = setup.failover()
        _mend_replication(new)
        setup.restart(old)
        # the new primary: the e-mails are there and undelivered, no batch holds them
        assert stream_state(new) == (3, 0, 1, 0)
        # the committer retries its batch: skipped (none of its e-mails is pending here)
        queue.put_many([batch], source)
        assert stream_state(new) == (3, 0, 1, 0)
        # the e-mails come back to the reader, and are stored once
        again = source.read(10, 1.0)
        assert [m.data for m in again] == emails
        queue.put_many([Batch.of(BATCH_PATH, [Item(m.data, f"BACK-{n}", f"<{n}>", m.ref)
                                              for n, m in enumerate(again)])], source)
        # the sender of the batch handed out before the failover had its 202: it acks it
        queue.ack(out)
        # what is left: the batch of the three, stored again; the copy prefetched from the
        # old primary may go out too, but under the same Idempotency-Key (same content)
        left = []
        while (delivery := queue.get("s", 0.3)) is not None:
            left.append(delivery)
            queue.ack(delivery)
        assert {d.batch.invoice_ids for d in left} == {("BACK-0", "BACK-1", "BACK-2")}
        assert {d.batch.id for d in left} == {batch.id}
        assert stream_state(new) == (0, 0, 0, 0)
    finally:
        queue.close()
        source.close()


def test_a_consumer_group_lost_in_a_failover_is_created_again(sentinel_setup: SentinelSetup,
                                                              tmp_path: Path, pm: Any) -> None:
    """A group created just before a failover may not be on the new primary: Redis then
    answers NOGROUP, ms1 creates its groups again (from the first entry) and goes on; the
    e-mails read before are read again and stored once."""
    from ms1.errors import QueueError
    from ms1.model import BATCH_PATH, Batch, Item

    setup = sentinel_setup
    config = pluginmanager.load(pm, str(inbound_config(tmp_path / "ms1.ini", {
        "sentinels": setup.sentinel_addresses, "service_name": SERVICE})))
    emails = [s.data for s in samples.generate(2, prefix="NOGROUP")]
    source = pluginmanager.build_source(pm, config)
    queue = pluginmanager.build_queue(pm, config)
    try:
        source.push(emails)
        assert acknowledged_by_replica(setup)
        _cut_replication(setup.primary(), setup.replica())
        read = source.read(10, 1.0)  # creates the group: on the old primary only
        batch = Batch.of(BATCH_PATH, [Item(m.data, f"NG-{n}", f"<{n}>", m.ref)
                                      for n, m in enumerate(read)])
        old, new, _ = setup.failover()
        _mend_replication(new)
        setup.restart(old)
        with pytest.raises(QueueError, match="NOGROUP"):
            queue.put_many([batch], source)  # the committer: fails, and will retry
        again = source.read(10, 1.0)  # the reader makes the group again: all re-read
        assert [m.data for m in again] == emails
        queue.put_many([batch], source)  # the committer's retry: stored now
        queue.put_many([Batch.of(BATCH_PATH, [Item(m.data, f"NG-{n}", f"<{n}>", m.ref)
                                              for n, m in enumerate(again)])], source)
        got = queue.get("s", 1.0)
        assert got is not None and got.batch.invoice_ids == ("NG-0", "NG-1")
        queue.ack(got)
        assert queue.get("s", 0.3) is None
        assert stream_state(new) == (0, 0, 0, 0)
    finally:
        queue.close()
        source.close()


def acknowledged_by_replica(setup: SentinelSetup) -> bool:
    from redis_topologies import acknowledged

    return wait_until(lambda: acknowledged(setup.primary()), 10)


# --- submits, keys, options (one server) ---------------------------------------------------------


def test_a_submit_retried_under_its_key_adds_nothing_twice(redis_url: str,
                                                          tmp_path: Path) -> None:
    config = inbound_config(tmp_path / "ms1.ini", {"url": redis_url})
    emails = [s.data for s in samples.generate(1_200, prefix="KEYED")]  # three chunks
    client = redis_py.Redis.from_url(redis_url)
    with Inbound(str(config)) as inbound:
        key = inbound.submit(emails)
        assert inbound.submit(emails, key=key) == key
        assert inbound.submit(emails[:10], key="another-key") == "another-key"
        assert inbound.submit(emails[:10], key="another-key") == "another-key"
    stored = [fields[b"email"] for _, fields in client.xrange("ms1:emails")]
    assert stored == [*emails, *emails[:10]]
    client.close()


def test_min_replicas_acked_without_a_replica_fails_the_submit_and_says_it_was_added(
        redis_url: str, tmp_path: Path) -> None:
    config = inbound_config(tmp_path / "ms1.ini", {"url": redis_url, "min_replicas_acked": 1,
                                                   "replica_ack_timeout": 0.05})
    client = redis_py.Redis.from_url(redis_url)
    with Inbound(str(config)) as inbound:
        with pytest.raises(SubmitError) as caught:
            inbound.submit([b'{"n": 1}'])
        assert caught.value.added is True
        assert "retry with key" in str(caught.value)
        with pytest.raises(SubmitError):
            inbound.submit([b'{"n": 1}'], key=caught.value.key)
    assert client.xlen("ms1:emails") == 1  # on the primary once, however often retried
    client.close()


REFUSALS = {  # how Redis refuses for good: set up on the test's server, then undone
    "WRONGTYPE": (lambda admin: admin.set("ms1:emails", "not a stream"),
                  lambda admin: admin.delete("ms1:emails")),
    "can't run this command": (  # the script's XADD, for an ACL user without it
        lambda admin: admin.acl_setuser("ms1-noxadd", enabled=True, commands=["-xadd"]),
        lambda admin: admin.acl_setuser("ms1-noxadd", enabled=True, commands=["+xadd"])),
    "no permissions": (  # the script itself
        lambda admin: admin.acl_setuser("ms1-noxadd", enabled=True, commands=["-evalsha"]),
        lambda admin: admin.acl_setuser("ms1-noxadd", enabled=True, commands=["+evalsha"])),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_submit_redis_refuses_for_good_fails_at_once_not_after_its_retries(
        redis_url: str, tmp_path: Path, refusal: str) -> None:
    """A key of another type, or an ACL that forbids the command: no wait clears it, so a
    submit retried for 60 s says so at once (the old code retried it for all 60 s) --
    SubmitError.permanent, Redis's words, the stream; once the cause is fixed, the same
    key adds the e-mails, once."""
    admin = redis_py.Redis.from_url(redis_url)
    admin.acl_setuser("ms1-noxadd", enabled=True, passwords=["+pw-noxadd-9"], keys=["*"],
                      commands=["+@all"])
    refuse, undo = REFUSALS[refusal]
    url = redis_url.replace("redis://", "redis://ms1-noxadd:pw-noxadd-9@")
    config = inbound_config(tmp_path / "ms1.ini", {"url": url})
    try:
        with Inbound(str(config)) as inbound:
            refuse(admin)
            began = time.monotonic()
            with pytest.raises(SubmitError) as caught:
                inbound.submit([b'{"n": 1}'], retry_for=60)
            took = time.monotonic() - began
            assert took < 5, took
            assert caught.value.permanent, caught.value
            text = str(caught.value)
            assert refusal in text and "ms1:emails" in text and "pw-noxadd-9" not in text
            undo(admin)
            assert inbound.submit([b'{"n": 1}'], key=caught.value.key) == caught.value.key
            assert inbound.submit([b'{"n": 1}'], key=caught.value.key) == caught.value.key
        assert admin.xlen("ms1:emails") == 1
    finally:
        admin.acl_deluser("ms1-noxadd")
        admin.close()


def test_a_passing_failure_is_still_retried_and_not_called_permanent(
        redis_url: str, tmp_path: Path) -> None:
    """Replicas short of ``min_replicas_acked`` may come back: the submit is retried for
    its whole ``retry_for`` and its error is not permanent."""
    config = inbound_config(tmp_path / "ms1.ini", {"url": redis_url, "min_replicas_acked": 1,
                                                   "replica_ack_timeout": 0.05})
    with Inbound(str(config)) as inbound:
        began = time.monotonic()
        with pytest.raises(SubmitError) as caught:
            inbound.submit([b'{"n": 1}'], retry_for=1.5)
        assert time.monotonic() - began >= 1.0  # retried, RETRY_PAUSE 0.5 s apart
        assert not caught.value.permanent and caught.value.added is True


def test_enqueue_says_at_once_when_redis_refuses_for_good(redis_url: str,
                                                          tmp_path: Path) -> None:
    """``enqueue`` with ``min_replicas_acked`` submits chunk by chunk, each retried for
    120 s through a failover; a WRONGTYPE stream ends it at once, naming the e-mails not
    added and Redis's words (the old code: after 120 s)."""
    admin = redis_py.Redis.from_url(redis_url)
    admin.set("ms1:emails", "not a stream")
    path = inbound_config(tmp_path / "cli.ini", {"url": redis_url, "min_replicas_acked": 1,
                                                 "replica_ack_timeout": 0.05})
    emails = tmp_path / "in.jsonl"
    emails.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(20)))
    began = time.monotonic()
    result = cli(path, "enqueue", str(emails), timeout=200)
    took = time.monotonic() - began
    assert result.returncode != 0 and took < 30, (took, result.stderr)
    assert "e-mails 1-20 of 20" in result.stderr and "WRONGTYPE" in result.stderr, \
        result.stderr
    assert "retries" not in result.stderr, result.stderr
    admin.close()


def test_one_server_keeps_its_key_names_and_plain_xadds(redis_url: str, tmp_path: Path,
                                                        make_config: Any, pm: Any) -> None:
    """Nothing changes for a single Redis: the keys are named as configured, and
    ``enqueue`` adds e-mails as plain XADDs (no submit keys are kept)."""
    config = make_config(f"[redis]\nurl = {redis_url}\n")
    assert key_names(config) == {"inbound_stream": "ms1:emails",
                                 "outbound_stream": "ms1:outbound",
                                 "dead_letter_stream": "ms1:dead-letters",
                                 "rate_limit_key": "ms1:rate-limit",
                                 "ledger_key": "ms1:ledger"}
    path = inbound_config(tmp_path / "cli.ini", {"url": redis_url})
    emails = tmp_path / "in.jsonl"
    emails.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(20)))
    result = cli(path, "enqueue", str(emails))
    assert result.returncode == 0, result.stderr
    client = redis_py.Redis.from_url(redis_url)
    assert sorted(client.keys()) == [b"ms1:emails"]
    client.close()


def test_the_key_rule_gives_every_key_one_hash_tag(make_config: Any) -> None:
    assert tagged("ms1:emails", "") == "ms1:emails"
    assert tagged("ms1:emails", "ms1") == "{ms1}:emails"
    assert tagged("orders:in", "ms1") == "{ms1}:orders:in"
    assert tagged("{ms1}:emails", "ms1") == "{ms1}:emails"
    with pytest.raises(ValueError, match="one slot"):
        tagged("{other}:emails", "ms1")
    names = key_names(make_config("[redis]\ncluster = yes\n"))
    assert names == {"inbound_stream": "{ms1}:emails", "outbound_stream": "{ms1}:outbound",
                     "dead_letter_stream": "{ms1}:dead-letters",
                     "rate_limit_key": "{ms1}:rate-limit", "ledger_key": "{ms1}:ledger"}
    assert key_names(make_config("[redis]\nkey_tag = eu\ninbound_stream = in\n"))[
        "inbound_stream"] == "{eu}:in"
    from redis_topologies import key_slot
    assert len({key_slot(name) for name in names.values()}) == 1
    assert len({key_slot(f"{names['inbound_stream']}:submitted"),
                key_slot(names["inbound_stream"])}) == 1


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("sentinels = 127.0.0.1:1\ncluster = yes", "[redis] cluster", "no Sentinels"),
    ("cluster_nodes = 127.0.0.1:1", "[redis] cluster_nodes", "only with cluster"),
    ("cluster = yes\nurl = redis://127.0.0.1:1/2", "[redis] url", "database 0"),
    ("sentinels = 127.0.0.1:1\nurl = unix:///tmp/x.sock", "[redis] url", "not unix"),
    ("cluster = yes\ninbound_stream = {x}:in", "[redis] inbound_stream", "one slot"),
    ("sentinels = 127.0.0.1:1\nservice_name =", "[redis] service_name", "needed"),
    ("min_replicas_acked = 1\nreplica_ack_timeout = 10", "[redis] replica_ack_timeout",
     "shorter than socket_timeout"),
])
def test_topology_options_are_checked_together(make_config: Any, text: str, where: str,
                                               problem: str) -> None:
    config = make_config(f"[redis]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        link_for(config).release()
    assert where in str(caught.value) and problem in str(caught.value)


@pytest.mark.parametrize(("text", "where"), [
    ("sentinels = 127.0.0.1", "[redis] sentinels"),
    ("sentinels = 127.0.0.1:1, :", "[redis] sentinels"),
    ("cluster_nodes = a:0", "[redis] cluster_nodes"),
    ("key_tag = {ms1}", "[redis] key_tag"),
    ("min_replicas_acked = -1", "[redis] min_replicas_acked"),
])
def test_topology_options_are_checked_at_load(make_config: Any, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        make_config(f"[redis]\n{text}\n")


# --- secrets with Sentinel ------------------------------------------------------------------------


def test_sentinel_and_redis_passwords_work_and_are_never_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    redis_secret, sentinel_secret = "r3dis-pass-word-1", "s3ntinel-pass-word-2"
    setup = SentinelSetup(tmp_path / "auth", password=redis_secret,
                          sentinel_password=sentinel_secret)
    try:
        setup.start()
        monkeypatch.setenv("MS1_TEST_REDIS_PASSWORD", redis_secret)
        monkeypatch.setenv("MS1_TEST_SENTINEL_PASSWORD", sentinel_secret)
        where = {"sentinels": setup.sentinel_addresses, "service_name": SERVICE,
                 "password_env": "MS1_TEST_REDIS_PASSWORD",
                 "sentinel_password_env": "MS1_TEST_SENTINEL_PASSWORD"}
        config = inbound_config(tmp_path / "ms1.ini", where)
        with caplog.at_level("DEBUG"), Inbound(str(config)) as inbound:
            inbound.submit([b'{"n": 1}'])
            shown = [repr(inbound._source.link), str(inbound._source.link.topology),  # type: ignore[attr-defined]
                     repr(inbound._source.link.topology)]  # type: ignore[attr-defined]
        assert inbound_emails(setup.primary()) == [b'{"n": 1}']
        wrong = inbound_config(tmp_path / "wrong.ini", {**where, "service_name": "nope"})
        with Inbound(str(wrong)) as inbound, pytest.raises(SubmitError) as caught:
            inbound.submit([b"x"])
        shown += [str(caught.value), repr(caught.value)]
        result = cli(config, "check")
        shown += [result.stdout, result.stderr]
        status = cli(config, "status")
        assert status.returncode == 0, status.stderr
        assert f"primary {setup.primary().address}" in status.stdout
        shown += [status.stdout, status.stderr, caplog.text]
        for text in shown:
            assert redis_secret not in text and sentinel_secret not in text, text
    finally:
        setup.stop()


# --- what waiting for a replica costs ---------------------------------------------------------


#: e-mails in the backlog of a throughput measurement
BACKLOG = 50_000


def _call_latencies(setup: SentinelSetup, min_replicas: int, calls: int) -> dict[str, float]:
    """p50/p99 in ms of ms1's two own scripts, enqueue (a batch stored) and finish (its ack
    after a 202), each followed by a WAIT when ``min_replicas`` is set."""
    from ms1.model import BATCH_PATH, Batch, Item
    from ms1_plugins.redis import RedisLink, RedisQueue
    from ms1_plugins.redis.link import Topology, parse_addresses

    topology = Topology(sentinels=parse_addresses(setup.sentinel_addresses),
                        service_name=SERVICE)
    link = RedisLink("redis://127.0.0.1/0", topology=topology, min_replicas=min_replicas,
                     replica_timeout=1.0).use()
    queue = RedisQueue(link, stream=f"cost:{min_replicas}:out", group="g", consumer="c",
                       visibility_timeout=60, block_timeout=0.05, prefetch=1)
    payload = json.dumps(samples.invoice(1)).encode()
    enqueue: list[float] = []
    finish: list[float] = []
    try:
        for n in range(calls):
            items = [Item(payload, f"C-{n}-{k}", f"<{n}.{k}>", "") for k in range(BATCH)]
            batch = Batch.of(BATCH_PATH, items)
            started = time.perf_counter()
            queue.put(batch)
            enqueue.append(time.perf_counter() - started)
            delivery = queue.get("s", 1.0)
            assert delivery is not None
            started = time.perf_counter()
            queue.ack(delivery)
            finish.append(time.perf_counter() - started)
    finally:
        queue.close()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"enqueue_p50": pct(enqueue, 0.5), "enqueue_p99": pct(enqueue, 0.99),
            "finish_p50": pct(finish, 0.5), "finish_p99": pct(finish, 0.99)}


def _backlog_throughput(setup: SentinelSetup, tmp_path: Path,
                        procs: list[subprocess.Popen[bytes]], min_replicas: int,
                        count: int) -> float:
    """Invoices per second the service delivers from a backlog of ``count`` e-mails
    already in the inbound stream (ms4-sim without latency or limit)."""
    topo = SentinelTopo(setup)
    sim = Sim(procs, tmp_path)
    sim.control(latency=0.0)
    config = write_config(tmp_path / "ms1.ini", topo, sim.url,
                          min_replicas_acked=min_replicas)
    client = setup.primary().client()
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for sample in samples.generate(min(1000, count - start), prefix="COST", start=start):
            pipe.xadd("ms1:emails", {"email": sample.data})
        pipe.execute()
    client.close()
    log = tmp_path / "service.log"
    service = start_service(procs, config, log)
    assert wait_until(lambda: int(sim.stats()["invoices_accepted"]) > 0, 60), tail(log)
    started = time.monotonic()
    first = int(sim.stats()["invoices_accepted"])
    assert wait_until(lambda: int(sim.stats()["unique_invoices_accepted"]) >= count, 300,
                      0.02), tail(log)
    elapsed = time.monotonic() - started
    assert stop_service(service, log) == 0
    return (count - first) / elapsed


@pytest.mark.xdist_group("measure")
@pytest.mark.skipif(not FULL, reason="measurement: MS1_FAILOVER_FULL=1")
def test_what_waiting_for_a_replica_costs(sentinel_setup: SentinelSetup, tmp_path: Path,
                                          procs: list[subprocess.Popen[bytes]]) -> None:
    """Latency of ms1's own scripts and end-to-end throughput from a backlog, with and
    without ``min_replicas_acked = 1`` (primary and replica on loopback), alternating to
    even out the machine's noise."""
    calls: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    rates: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(3):
        for replicas in (0, 1):
            calls[replicas].append(_call_latencies(sentinel_setup, replicas, 2_000))
            run_dir = tmp_path / f"run-{round_}-{replicas}"
            run_dir.mkdir()
            rates[replicas].append(_backlog_throughput(sentinel_setup, run_dir, procs,
                                                       replicas, BACKLOG))
            client = sentinel_setup.primary().client()
            client.flushall()
            client.close()
    for replicas in (0, 1):
        merged = {k: sorted(c[k] for c in calls[replicas])[len(calls[replicas]) // 2]
                  for k in calls[replicas][0]}
        print(f"\nmin_replicas_acked = {replicas}: enqueue p50 {merged['enqueue_p50']:.3f} ms "
              f"p99 {merged['enqueue_p99']:.3f} ms, finish p50 {merged['finish_p50']:.3f} ms "
              f"p99 {merged['finish_p99']:.3f} ms; backlog of {BACKLOG:,}: "
              f"{', '.join(f'{r:,.0f}' for r in rates[replicas])} invoices/s", flush=True)


# --- every Redis call ms1 makes, on a cluster ----------------------------------------------------


def test_every_redis_component_works_on_a_cluster(cluster_setup: ClusterSetup, tmp_path: Path,
                                                  pm: Any) -> None:
    """Source, queue (group commit, prefetch, release, takeover, split), dead letters and
    the shared rate limiter through RedisCluster: every multi-key script and pipeline runs
    in ms1's one slot, on the primary serving it."""
    from ms1.model import BATCH_PATH, Batch, DeadLetter, Item

    settings = {"url": cluster_setup.url, "cluster": "yes",
                "cluster_nodes": cluster_setup.startup_nodes}
    path = tmp_path / "ms1.ini"
    path.write_text(service_ini("redis://127.0.0.1/0", settings={
        "redis": settings, "send": {"rate_limiter": "redis", "requests_per_minute": 3}}))
    config = pluginmanager.load(pm, str(path))
    source = pluginmanager.build_source(pm, config)
    queue = pluginmanager.build_queue(pm, config)
    letters = pluginmanager.build_dead_letters(pm, config)
    limiter = pluginmanager.build_rate_limiter(pm, config)
    # another instance, quick to take over what looks idle for 1 s
    other = pluginmanager.build_queue(pm, config.with_values({
        ("redis", "visibility_timeout"): 1.0, ("redis", "consumer"): "other"}))
    try:
        source.push([b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
        read = source.read(10, 1.0)
        assert len(read) == 3
        batches = [Batch.of(BATCH_PATH, [Item(b'{"invoice_id":"%d"}' % n, str(n), "<m>",
                                              m.ref)]) for n, m in enumerate(read[:2])]
        queue.put_many(batches, source)  # the group commit, e-mails acked in the same step
        letters.add([DeadLetter(reason="test", stage="processor", payload=read[2].data,
                                source_ref=read[2].ref)], source)
        assert source.describe()["length"] == 0 and letters.count() == 1
        assert [x.reason for x in letters.list()] == ["test"]
        first = queue.get("s", 1.0)
        assert first is not None
        queue.release(first)  # back at once, delivered again
        deliveries = []
        while (got := queue.get("s", 0.5)) is not None:
            deliveries.append(got)
        assert sorted(d.batch.id for d in deliveries) == sorted(b.id for b in batches)
        assert max(d.attempts for d in deliveries if d.token == first.token) >= 2
        halves = [Batch.of(BATCH_PATH, [Item(b'{"invoice_id":"h%d"}' % n, f"h{n}", "<m>", "")])
                  for n in range(2)]
        queue.replace(deliveries[0], halves)  # a split: the halves in the same step
        # held batches that look idle long enough are taken over by another instance
        while (got := queue.get("s", 0.3)) is not None:
            deliveries.append(got)
        assert len(deliveries) == 4
        taken: list[Any] = []
        assert wait_until(lambda: bool(taken.append(other.get("s", 0.2)) or
                                       len([t for t in taken if t]) == 3), 15)
        for delivery in taken:
            if delivery is not None:
                other.ack(delivery)
        assert queue.stats().empty
        assert letters.remove([letters.list()[0].id]) == 1
        # the pace (its learned shape beside the window, in the same slot): two at once
        tokens = [limiter.try_acquire()[0] for _ in range(4)]
        assert tokens[:2] == [t for t in tokens[:2] if t] and tokens[2:] == [None, None]
        limiter.finish(tokens[0])  # type: ignore[arg-type]
        limiter.cancel(tokens[1])  # type: ignore[arg-type]
        client = cluster_setup.primary_for("{ms1}").client()
        keys = [k for k in client.scan_iter() if not k.startswith(b"redis-topologies:")]
        client.close()
        assert sorted(keys) == [b"{ms1}:dead-letters", b"{ms1}:emails", b"{ms1}:emails:submitted",
                                b"{ms1}:outbound", b"{ms1}:rate-limit",
                                b"{ms1}:rate-limit:shape"], keys
    finally:
        for part in (source, queue, letters, limiter, other):
            part.close()


# --- without servers ---------------------------------------------------------------------------


def test_no_primary_to_be_found_is_an_outage_not_a_crash() -> None:
    """Sentinels or cluster nodes that do not answer: every call fails with ms1's own
    error (the loops wait and retry, as for one server that is down), nothing else."""
    from ms1.errors import SourceError
    from ms1_plugins.redis import RedisLink, RedisSource
    from ms1_plugins.redis.link import Topology

    for topology in (Topology(sentinels=(("127.0.0.1", 1), ("127.0.0.1", 2)),
                              service_name="nowhere"),
                     Topology(cluster=True, cluster_nodes=(("127.0.0.1", 2),))):
        link = RedisLink("redis://127.0.0.1:1/0", topology=topology, connect_timeout=0.2,
                         socket_timeout=0.5, min_replicas=1).use()
        source = RedisSource(link, stream="{ms1}:emails", group="g", consumer="c",
                             visibility_timeout=30, delete_acked=True)
        assert not link.ping()
        with pytest.raises(SourceError):
            source.read(10, 0.1)
        with pytest.raises(SubmitError) as caught:
            source.submit([b"x"])
        assert caught.value.added is None  # not known
        assert link.primary() is None
        source.close()


def test_waitaof_is_sent_and_read_when_the_primary_has_it(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Redis 7.2+ (not in Debian, so faked here): the writes are followed by ``WAITAOF 0 n
    timeout`` on the same pipeline, and its second figure (replicas that fsynced) counts."""
    from ms1_plugins.redis import RedisLink

    sent: list[tuple[object, ...]] = []

    class Pipe:
        def __init__(self) -> None:
            self.stack: list[tuple[object, ...]] = []

        def __len__(self) -> int:
            return len(self.stack)

        def execute_command(self, *args: object) -> None:
            self.stack.append(args)

        def xadd(self, *args: object) -> None:
            self.stack.append(("XADD", *args))

        def execute(self) -> list[object]:
            sent.extend(self.stack)
            return ["1-0" if c[0] == "XADD" else [0, 2] for c in self.stack]

        def reset(self) -> None:
            self.stack = []

    class Node:
        def pipeline(self, transaction: bool) -> Pipe:
            return Pipe()

        def info(self, section: str) -> dict[str, str]:
            return {"redis_version": "7.2.4"}

    link = RedisLink("redis://127.0.0.1:1/0", min_replicas=2, replica_timeout=0.25)
    monkeypatch.setattr(link, "_node_client", lambda: Node())
    replies, acked = link.replicated(lambda pipe: pipe.xadd("s", {"email": "x"}))
    assert replies == ["1-0"] and acked == 2 and link.uses_waitaof
    assert sent == [("XADD", "s", {"email": "x"}), ("WAITAOF", 0, 2, 250)]
