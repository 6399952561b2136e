"""Every MS4 answer against its row of the answer table (``ms1/pipeline/sending/answers.py``), one
by one: the real pipeline (Components + Service, the ``http`` transport) against an
in-process ``ms4-sim`` that answers every request with one status for a spell
(``answer_status``), then 202s again.

Times are compressed: ``breaker_reset`` and ``auth_probe_interval`` 1 s, retries 0.05 ..
0.2 s, no rate limit (so that an answer counted as a success is resent at full rate and
shows). A spell lasts :data:`SPELL` s: five probe intervals, enough to tell a probe a
second (at most ``threads + 5 + 1`` requests in the spell, ``+ breaker_failures`` for a
breaker) from the retry loop the old code ran into 403/409/408/302 (4 senders, 0.05 ..
0.2 s backoff: over 100 requests), while the seven spells stay under a minute.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pluggy
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until

from ms1.config import Config
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.sending.answers import Answer, Kind, classify
from ms1.pipeline.sending.pacer import Stop
from ms1.pipeline.source import MemorySource
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service, Summary
from ms1_tools.sim import Ms4Sim, SimConfig, is_rejected_by_sim

pytestmark = pytest.mark.slow

SPELL = 5.0
THREADS = 4
BREAKER_FAILURES = 5
PROBE_INTERVAL = 1.0  # breaker_reset and auth_probe_interval
SEND = (f"threads = {THREADS}\nretry_initial = 0.05\nretry_max = 0.2\n"
        f"breaker_failures = {BREAKER_FAILURES}\nbreaker_reset = {PROBE_INTERVAL}\n"
        f"auth_probe_interval = {PROBE_INTERVAL}\nrequests_per_minute = 1000000\n")


@dataclass(frozen=True)
class Row:
    """What the answer table promises for a status, as a test can see it."""

    kind: str        # "stop" (every sender stops, slow probes) or "breaker" (retry, counted)
    alert: str       # in the alert line (ERROR or above) and in /readyz's reason
    level: int       # the alert line's level


ROWS = {
    403: Row("stop", "403", logging.CRITICAL),
    404: Row("stop", "[transport.http] base_url", logging.CRITICAL),
    302: Row("stop", "[transport.http] base_url", logging.CRITICAL),
    409: Row("breaker", "409", logging.ERROR),
    408: Row("breaker", "408", logging.ERROR),
    503: Row("breaker", "503", logging.ERROR),
}


@pytest.fixture
def sim() -> Iterator[Ms4Sim]:
    with Ms4Sim(SimConfig(api_key="right-key", rate_limit=0)) as running:
        yield running


@dataclass
class Run:
    service: Service
    parts: Components
    ids: set[str]
    metrics: str

    def finish(self, timeout: float = 30) -> Summary:
        try:
            return self.service.run_once(timeout)
        finally:
            self.parts.transport.close()


def start(make_config: Callable[[str], Config], pm: pluggy.PluginManager,
          monkeypatch: pytest.MonkeyPatch, sim: Ms4Sim, count: int = 500) -> Run:
    monkeypatch.setenv("MS1_MS4_API_KEY", "right-key")
    metrics = f"127.0.0.1:{free_port()}"
    config = make_config(f"[ms4]\ntransport = http\n[transport.http]\nbase_url = {sim.url}\n"
                         f"[metrics]\naddress = {metrics}\n[send]\n{SEND}")
    transport = pluginmanager.build(pm, config, "transport")
    emails = list(samples.generate(count))
    parts = Components(source=MemorySource((e.data for e in emails), finite=True),
                       policy=SizeBatchPolicy(50, 1_048_576, 3600), queue=MemoryQueue(),
                       dead_letters=MemoryDeadLetters(), transport=transport)
    transport.set_api_key(config.api_key)
    service = Service(config, pm, parts, once=True)
    service.start()
    return Run(service, parts, {e.invoice_id for e in emails}, metrics)


def answered(sim: Ms4Sim, status: int) -> int:
    return int(sim.stats()["requests_by_status"].get(str(status), 0))


def readiness(run: Run) -> str | None:
    assert run.service.exporter is not None
    return run.service.exporter.readiness()


@pytest.mark.parametrize("status", list(ROWS))
def test_a_spell_of_one_answer(status: int, make_config: Callable[[str], Config],
                               pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch,
                               sim: Ms4Sim, caplog: pytest.LogCaptureFixture) -> None:
    row = ROWS[status]
    sim.control(answer_status=status)
    caplog.set_level(logging.INFO)
    run = start(make_config, pm, monkeypatch, sim)
    reasons: set[str] = set()
    try:
        assert wait_until(lambda: answered(sim, status) > 0, 10)
        spell_end = time.monotonic() + SPELL
        while (left := spell_end - time.monotonic()) > 0:  # watch /readyz through the spell
            why = readiness(run)
            if why is not None:
                reasons.add(why)
            threading.Event().wait(min(0.05, left))
        during = answered(sim, status)
        sim.control(answer_status=0)
        recovered = time.monotonic()
        summary = run.finish()
    except BaseException:
        run.service.shutdown(1)
        raise
    # the rate during the spell: a probe a second, not a retry loop
    bound = THREADS + SPELL / PROBE_INTERVAL + 1
    if row.kind == "breaker":
        bound += BREAKER_FAILURES
    print(f"\n{status}: {during} requests in a {SPELL:.0f} s spell ({during / SPELL:.1f}/s, "
          f"bound {bound:.0f}); readiness {sorted(reasons)}")
    assert during <= bound, f"{during} requests answered {status} in {SPELL} s"
    # /readyz said why, naming the answer or the setting to fix
    assert any(row.alert in why for why in reasons), reasons
    if row.kind == "breaker":
        assert any("circuit breaker open" in why for why in reasons), reasons
    else:
        assert any(str(status) in why for why in reasons), reasons
    # an alert line at its level, once per spell for a stop
    alerts = [r for r in caplog.records if r.levelno >= row.level
              and row.alert in r.getMessage() and r.name.startswith("ms1.pipeline.sending")]
    assert alerts, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if row.kind == "stop":
        assert len(alerts) == 1, [r.getMessage() for r in alerts]
    # nothing lost: every batch delivered after the spell, none dead-lettered
    assert summary.ok, summary.render()
    assert sim.accepted_ids() == run.ids
    assert run.parts.dead_letters.all() == []
    assert time.monotonic() - recovered < 10
    assert readiness(run) is None or "shut" in (readiness(run) or "")


def test_a_spell_of_422_dead_letters_what_it_refused_with_ms4s_text(
        make_config: Callable[[str], Config], pm: pluggy.PluginManager,
        monkeypatch: pytest.MonkeyPatch, sim: Ms4Sim) -> None:
    """422 refuses objects: split to isolate them, dead-letter each with MS4's text, never
    resend an unchanged batch. A spell of 422 to everything therefore dead-letters every
    object sent during it (``dlq replay`` brings them back), at most 2n - 1 requests per
    batch of n: bounded, not a loop."""
    sim.control(answer_status=422)
    run = start(make_config, pm, monkeypatch, sim, count=100)  # 2 batches of 50
    try:
        assert wait_until(lambda: len(run.parts.dead_letters.all()) > 0, 10)
        sim.control(answer_status=0)
        summary = run.finish()
    except BaseException:
        run.service.shutdown(1)
        raise
    letters = run.parts.dead_letters.all()
    dead = {letter.invoice_id for letter in letters}
    accepted = sim.accepted_ids()
    assert dead and not dead & accepted and dead | accepted == run.ids  # lost 0
    for letter in letters:
        assert letter.stage == "ms4" and letter.ms4_answer is not None
        assert letter.ms4_answer.startswith("422 ") and "answer_status 422" in letter.ms4_answer
    assert answered(sim, 422) <= 2 * 100 - 2  # 2 batches of 50: 2 x (2 x 50 - 1)
    assert summary.ok, summary.render()


def test_422_for_refused_objects_isolates_them_and_delivers_the_rest(
        make_config: Callable[[str], Config], pm: pluggy.PluginManager,
        monkeypatch: pytest.MonkeyPatch, sim: Ms4Sim) -> None:
    """An MS4 that refuses single objects with 422 (as 400): only those are dead-lettered."""
    sim.control(refuse_status=422, reject_every=50)
    run = start(make_config, pm, monkeypatch, sim)
    summary = run.finish()
    refused = {i for i in run.ids if is_rejected_by_sim(i, 50)}
    assert refused
    assert {letter.invoice_id for letter in run.parts.dead_letters.all()} == refused
    assert sim.accepted_ids() == run.ids - refused
    assert all("rejected by sim" in letter.reason for letter in run.parts.dead_letters.all())
    assert summary.ok, summary.render()


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise KeyError(name)


def test_requests_in_flight_gauge(make_config: Callable[[str], Config],
                                  pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch,
                                  sim: Ms4Sim) -> None:
    sim.control(latency=0.3)
    run = start(make_config, pm, monkeypatch, sim, count=1000)
    seen: list[float] = []

    def scrape() -> bool:
        with urllib.request.urlopen(f"http://{run.metrics}/metrics", timeout=5) as answer:
            seen.append(metric(answer.read().decode(), "ms1_requests_in_flight"))
        return seen[-1] == THREADS

    try:
        assert wait_until(scrape, 10), seen
    finally:
        summary = run.finish()
    assert summary.ok
    assert max(seen) <= THREADS


@pytest.mark.parametrize(("answer", "restart"), [
    (Answer(None, Kind.MISCONFIGURED), True),  # TLS on ms1's side: "fix and restart"
    (classify(404), False), (classify(302), False), (classify(405), False),  # a redeploy
    (classify(401), False), (classify(403), False)])  # fixed at MS4, or by a reload
def test_only_a_stop_on_ms1s_side_ends_a_once_run_early(answer: Answer, restart: bool) -> None:
    """``--once`` ends at once on a stop only a restart ends; a 404 or a redirect from a
    front while MS4 is redeployed ends with a probe, and the run waits for it (it gave up
    on those at first: a review found it)."""
    assert Stop(answer, "why").needs_restart is restart
    assert not Stop(answer, "why", storm=True).needs_restart
