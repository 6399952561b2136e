"""ms1 against ms4-sim over real HTTP: faults, rate limit, sender scaling, 401 and reload."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import zlib
from collections import defaultdict

import pytest

from ms1.config import Secret
from ms1.hookspecs import hookimpl
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service
from ms1_tools.sim import Ms4Sim, SimConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def sim_factory():
    sims: list[Ms4Sim] = []

    def start(**kw) -> Ms4Sim:
        sim = Ms4Sim(SimConfig(api_key="right-key", **kw)).start()
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        sim.stop()


def run(make_config, pm, monkeypatch, sim, emails, *, send: str, key: str = "right-key",
        timeout: float = 120, before_wait=None):
    monkeypatch.setenv("MS1_MS4_API_KEY", key)
    config = make_config(f"[ms4]\ntransport = http\n[transport.http]\nbase_url = {sim.url}\n"
                         f"[send]\n{send}")
    transport = pluginmanager.build(pm, config, "transport")  # the real plugin factory
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(50, 1_048_576, 3600), queue=MemoryQueue(),
                       dead_letters=MemoryDeadLetters(), transport=transport)
    transport.set_api_key(config.api_key)
    service = Service(config, pm, parts, once=True)
    started = time.perf_counter()
    service.start()
    if before_wait is not None:
        before_wait(service)
    summary = service.run_once(timeout)
    elapsed = time.perf_counter() - started
    transport.close()
    return summary, parts, elapsed


def test_faults_lose_nothing_and_duplicates_come_only_from_drops(
        make_config, pm, monkeypatch, sim_factory) -> None:
    sim = sim_factory(rate_limit=0, fail_500=0.10, fail_429=0.05, drop=0.04, reject_every=500,
                      seed=11)
    emails = list(samples.generate(5000))
    ids = {s.invoice_id for s in emails}
    summary, parts, _ = run(make_config, pm, monkeypatch, sim, emails,
                            send="threads = 4\nretry_initial = 0.01\nretry_max = 0.05\n"
                                 "retry_after_max = 0.1\nbreaker_reset = 0.05\n"
                                 "requests_per_minute = 1000000\n")
    assert summary.ok, summary.render()
    rejected_by_sim = {i for i in ids if zlib.crc32(i.encode()) % 500 == 0}
    assert rejected_by_sim, "the seed data must contain objects the sim rejects"
    letters = parts.dead_letters.all()
    assert {letter.invoice_id for letter in letters} == rejected_by_sim
    assert all("rejected by sim" in letter.reason for letter in letters)
    # lost = 0: everything either accepted by the sim or dead-lettered with its message
    assert sim.accepted_ids() == ids - rejected_by_sim
    # duplicates: only re-sends of a batch whose accepted request was dropped, same key
    stats = sim.stats()
    by_key: dict[str | None, list] = defaultdict(list)
    for request in sim.accepted_requests():
        by_key[request.idempotency_key].append(request)
    assert None not in by_key
    # issue 24: W3C Trace Context: the trace is the batch (its Idempotency-Key), each
    # attempt a span of its own, so MS4's log joins ms1's
    for key, requests in by_key.items():
        parents = [str(r.traceparent).split("-") for r in requests]
        assert all(len(p) == 4 and (p[0], p[1], p[3]) == ("00", key, "01") for p in parents)
        assert len({p[2] for p in parents}) == len(parents), "a re-send reused a span id"
    explained = 0
    for requests in by_key.values():
        for earlier in requests[:-1]:
            assert earlier.dropped, "a batch was accepted twice without a dropped answer"
            explained += len(earlier.invoice_ids)
    print(f"\nfaults: requests by status {stats['requests_by_status']}, accepted "
          f"{stats['unique_invoices_accepted']} unique invoices, dead-lettered {len(letters)}, "
          f"duplicates {stats['duplicate_invoices']} invoices in "
          f"{stats['duplicate_batches']} batches (all re-sends of dropped answers)")
    assert stats["requests_by_status"].get("dropped", 0) >= 1
    assert stats["duplicate_invoices"] == explained
    assert stats["duplicate_batches"] == sum(len(r) - 1 for r in by_key.values())
    assert stats["requests_by_status"].get("500", 0) > 0
    assert stats["requests_by_status"].get("429", 0) > 0


@pytest.fixture
def sim_process():
    """ms4-sim in its own process (as in production, MS4 does not share ms1's GIL)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                                 "--api-key", "right-key", *args],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ms4-sim listening on "), line
        return line.split()[-1]

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


class SendTimes:
    """An observer plugin: when each batch's successful request started and ended."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    @hookimpl
    def ms1_batch_sent(self, batch, status: int, attempt: int, latency: float) -> None:
        now = time.perf_counter()
        self.spans.append((now - latency, now))


@pytest.mark.alone
@pytest.mark.xdist_group("measure")
def test_four_senders_at_least_3_5x_one_sender(make_config, pm, monkeypatch,
                                               sim_process) -> None:
    url = sim_process("--rate-limit", "0", "--latency", "0.05")

    class Url:
        def __init__(self, url: str) -> None:
            self.url = url

    emails = list(samples.generate(4000))  # 80 batches
    rates = {}
    for threads in (1, 4):
        times = SendTimes()
        pm.register(times)
        summary, _, _ = run(make_config, pm, monkeypatch, Url(url), emails,
                            send=f"threads = {threads}\nrequests_per_minute = 1000000\n")
        pm.unregister(times)
        assert summary.ok and len(times.spans) == 80
        first = min(start for start, _ in times.spans)
        last = max(end for _, end in times.spans)
        rates[threads] = 4000 / (last - first)
    ratio = rates[4] / rates[1]
    print(f"\n1 sender {rates[1]:,.0f} invoices/s, 4 senders {rates[4]:,.0f} invoices/s: "
          f"{ratio:.2f}x")
    assert ratio >= 3.5


def test_401_spell_ends_with_a_new_key_nothing_lost(make_config, pm, monkeypatch,
                                                    sim_factory, caplog) -> None:
    sim = sim_factory(rate_limit=0)
    emails = list(samples.generate(500))

    def reload_key_later(service: Service) -> None:
        deadline = time.monotonic() + 10
        while service.stats.get("responses_401") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the spell goes on: senders wait, nothing is sent
        before = sim.stats()["requests_total"]
        time.sleep(0.3)
        assert sim.stats()["requests_total"] == before  # no retry storm
        service.set_api_key(Secret("right-key"))

    summary, _, _ = run(make_config, pm, monkeypatch, sim, emails, key="wrong-key",
                        send="threads = 4\nauth_probe_interval = 3600\n",
                        before_wait=reload_key_later)
    assert summary.ok
    assert sim.accepted_ids() == {s.invoice_id for s in emails}
    assert sim.stats()["requests_by_status"]["401"] <= 4
    assert "wrong-key" not in caplog.text and "right-key" not in caplog.text
