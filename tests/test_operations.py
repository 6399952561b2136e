"""Operations, with the real service as a subprocess: SIGTERM drain, SIGHUP reload after
a 401 spell, systemd notifications, metrics and health, the unit file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from support import service_ini, wait_until

from ms1.pipeline import samples

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def start_sim(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0", "--rate-limit",
                             "0", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ms4-sim listening on "), line
    return proc, line.split()[-1]


def sim_stats(url: str) -> dict:
    import json

    with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
        return json.loads(answer.read())


def write_config(tmp_path: Path, *, sim_url: str, redis_url: str, max_wait: float = 0.2,
                 api_key_file: Path | None = None, auth_probe_interval: float = 60,
                 metrics_address: str = "") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text(service_ini(redis_url, ms4_url=sim_url, settings={
        "ms1": {"shutdown_timeout": 5, "log_format": "kv"},
        "metrics": {"address": metrics_address},
        "batch": {"max_wait": max_wait},
        "send": {"threads": 2, "retry_max": 0.2, "auth_probe_interval": auth_probe_interval},
        "ms4": {"api_key_file": api_key_file or ""},
        "redis": {"consumer": "ops-test", "visibility_timeout": max(60, max_wait * 2 + 10)},
    }))
    return path


def enqueue(config: Path, count: int, tmp_path: Path, **kw) -> list[samples.Sample]:
    emails = list(samples.generate(count, **kw))
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in emails))
    subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "enqueue",
                    str(data)], check=True, capture_output=True, timeout=60)
    return emails


def start_service(config: Path, log: Path, env: dict[str, str] | None = None
                  ) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, **(env or {})})


@pytest.fixture
def sim(tmp_path: Path):
    procs = []

    def start(*args: str) -> str:
        proc, url = start_sim(tmp_path, *args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_sigterm_mid_run_drains_the_partial_batch_and_exits_0(redis_url, tmp_path, sim,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    url = sim("--api-key", "k")
    # max_wait of an hour: only the drain can send the last, partial batch
    config = write_config(tmp_path, sim_url=url, redis_url=redis_url, max_wait=3600)
    emails = enqueue(config, 130, tmp_path)
    log = tmp_path / "service.log"
    service = start_service(config, log)
    try:
        assert wait_until(lambda: sim_stats(url)["unique_invoices_accepted"] == 100, 30)
        time.sleep(0.3)
        assert sim_stats(url)["unique_invoices_accepted"] == 100  # 30 wait in an open batch
        signalled = time.monotonic()
        service.send_signal(signal.SIGTERM)
        status = service.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if service.poll() is None:
            service.kill()
    assert status == 0, log.read_text()[-2000:]
    assert took < 5, f"exit took {took:.1f} s (shutdown_timeout 5)"
    stats = sim_stats(url)
    assert stats["unique_invoices_accepted"] == len(emails)  # the partial batch was sent
    assert stats["duplicate_invoices"] == 0
    text = log.read_text()
    assert "received SIGTERM: draining" in text
    assert 'msg="batch sent"' in text and "size=30" in text  # the drained partial batch


def test_sighup_with_a_new_key_ends_a_401_spell(redis_url, tmp_path, sim) -> None:
    url = sim("--api-key", "new-key")
    key_file = tmp_path / "ms4.key"
    key_file.write_text("old-key\n")
    config = write_config(tmp_path, sim_url=url, redis_url=redis_url, api_key_file=key_file,
                          auth_probe_interval=3600)
    emails = enqueue(config, 300, tmp_path)
    log = tmp_path / "service.log"
    service = start_service(config, log)
    try:
        assert wait_until(lambda: "401" in log.read_text(), 30), log.read_text()
        time.sleep(1.0)
        before = sim_stats(url)
        assert before["unique_invoices_accepted"] == 0
        assert before["requests_by_status"].get("401", 0) <= 2  # no retry storm
        key_file.write_text("new-key\n")
        service.send_signal(signal.SIGHUP)
        assert wait_until(lambda: sim_stats(url)["unique_invoices_accepted"] == len(emails), 30)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
    finally:
        if service.poll() is None:
            service.kill()
    text = log.read_text()
    assert text.count("level=CRITICAL") == 1  # once per spell
    assert "configuration reloaded" in text and "API key reloaded: sending resumes" in text
    assert "old-key" not in text and "new-key" not in text
    assert sim_stats(url)["duplicate_invoices"] == 0


def test_systemd_notifications_ready_watchdog_stopping(redis_url, tmp_path, sim,
                                                       monkeypatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    url = sim("--api-key", "k")
    config = write_config(tmp_path, sim_url=url, redis_url=redis_url)
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    received: list[str] = []
    log = tmp_path / "service.log"
    service = start_service(config, log, env={"NOTIFY_SOCKET": str(path),
                                              "WATCHDOG_USEC": "200000"})

    def drain() -> None:
        until = time.monotonic() + 0.5  # pings keep coming: read for a bounded time
        try:
            while time.monotonic() < until:
                received.append(sock.recv(4096).decode())
        except TimeoutError:
            pass

    try:
        assert wait_until(lambda: drain() or any("READY=1" in m for m in received), 30)
        assert wait_until(lambda: drain() or sum("WATCHDOG=1" in m for m in received) >= 3, 10)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
        drain()
    finally:
        if service.poll() is None:
            service.kill()
        sock.close()
    ready = next(m for m in received if "READY=1" in m)
    assert "STATUS=" in ready
    assert any(m.startswith("STOPPING=1") for m in received)
    assert received.index(ready) < max(i for i, m in enumerate(received) if "STOPPING=1" in m)


def scrape(address: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_metrics_scraped_during_a_run_match_the_simulator(redis_url, tmp_path, sim,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    url = sim("--api-key", "k", "--latency", "0.02", "--reject-every", "50")
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, sim_url=url, redis_url=redis_url, metrics_address=address)
    emails = enqueue(config, 2000, tmp_path, invalid_every=40)
    log = tmp_path / "service.log"
    service = start_service(config, log)
    try:
        assert wait_until(lambda: scrape(address, "/healthz")[0] == 200, 30)
        during = scrape(address)[1]  # a scrape while the run goes on
        assert metric(during, "ms1_up") == 1
        valid = sum(1 for e in emails if e.valid)
        assert wait_until(lambda: metric(scrape(address)[1], "ms1_queue_ready_batches") == 0
                          and metric(scrape(address)[1], "ms1_queue_in_flight_batches") == 0
                          and metric(scrape(address)[1], "ms1_emails_read_total") == 2000, 60)
        time.sleep(0.3)
        status, text = scrape(address)
        ready = scrape(address, "/readyz")
        stats = sim_stats(url)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
    finally:
        if service.poll() is None:
            service.kill()
    assert status == 200 and ready == (200, "ready\n")
    accepted = stats["unique_invoices_accepted"]
    rejected_by_sim = valid - accepted
    assert rejected_by_sim > 0
    assert metric(text, "ms1_invoices_delivered_total") == stats["invoices_accepted"] == accepted
    by_status = stats["requests_by_status"]
    assert metric(text, "ms1_ms4_responses_total", status="202") == by_status["202"]
    assert metric(text, "ms1_ms4_responses_total", status="400") == by_status["400"]
    assert metric(text, "ms1_payloads_rejected_total", stage="ms4", field="ms4") == rejected_by_sim
    assert metric(text, "ms1_dead_letters") == len(emails) - valid + rejected_by_sim
    assert metric(text, "ms1_batch_size_count") == stats["requests_by_status"]["202"]
    assert metric(text, "ms1_breaker_state") == 0


def test_unit_file() -> None:
    from ms1.ops import deploy

    unit = deploy.read(deploy.UNIT)  # rendered for /etc/ms1 and this installation
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "User=ms1"):
        assert line in unit
    for key in ("ExecStart=", "WatchdogSec=", "EnvironmentFile="):
        assert f"\n{key}" in unit
    assert "--config /etc/ms1/prod.ini" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the key checks above are all a machine without systemd can do
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ms1-unit-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "ms1-service.service").write_text(unit)
    proc = subprocess.run([analyze, "verify", str(tmp / "ms1-service.service")],
                          capture_output=True, text=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr


def test_reload_applies_limits_rate_and_senders_and_refuses_a_bad_file(
        pm, write_config, caplog) -> None:
    import logging

    from ms1.cli import command as cli
    from ms1.runtime import pluginmanager
    from ms1.runtime.components import Components
    from ms1.runtime.service import Service

    path = write_config("[send]\nthreads = 2\nrequests_per_minute = 120\n[batch]\nmax_items = 50\n")
    config = pluginmanager.load(pm, str(path))
    parts = Components.build(pm, config.with_values({("source", "name"): "memory"}))
    service = Service(config, pm, parts)
    service.start()
    try:
        path.write_text("[send]\nthreads = 5\nrequests_per_minute = 600\n"
                        "[batch]\nmax_items = 20\nmax_wait = 0.3\n[queue]\nbackend = redis\n")
        with caplog.at_level(logging.INFO):
            cli._reload(service, pm)
        assert parts.policy.max_items == 20 and parts.policy.max_wait == 0.3
        assert service.pacer.limiter.limit == 600
        assert sum(1 for _, t in service._senders if t.is_alive()) == 5
        assert "need a restart were not applied: [queue] backend" in caplog.text
        path.write_text("[send]\nthreads = 1\n")
        cli._reload(service, pm)
        assert wait_until(lambda: sum(1 for _, t in service._senders if t.is_alive()) == 1, 5)
        assert service.alive()
        path.write_text("[send]\nthreads = lots\n")
        cli._reload(service, pm)
        assert "reload refused, keeping the running configuration" in caplog.text
        assert "[send] threads: expected an integer" in caplog.text
        assert service.config.get_int("send", "threads") == 1
    finally:
        service.shutdown(5)
        parts.close()


def test_a_call_that_may_outlast_the_watchdog_is_warned_of_by_the_part_not_its_name(
        pm, write_config, caplog, monkeypatch) -> None:
    """Issue 23: the watchdog cross-check asks each part how long one call may take
    (``longest_call``: the http transport's request_timeout, a Redis part's socket +
    connect timeouts) instead of reading [transport.http] and [redis] by name."""
    import logging

    from ms1.runtime import pluginmanager
    from ms1.runtime.components import Components
    from ms1.runtime.service import Service

    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    path = write_config("[ms1]\nwatchdog_timeout = 30\n[ms4]\ntransport = http\n"
                        "[transport.http]\nrequest_timeout = 45\n")
    config = pluginmanager.load(pm, str(path))
    parts = Components.build(pm, config.with_values({("source", "name"): "memory"}))
    assert parts.transport.longest_call == 45
    service = Service(config, pm, parts)
    try:
        with caplog.at_level(logging.WARNING):
            service._check_watchdog_timeout()
        assert "[ms1] watchdog_timeout (30 s) is not above the longest call the transport " \
            "'http' may make by design (45 s" in caplog.text
    finally:
        service.shutdown(1)
