"""The web console in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), against two real services on one Redis (``python -m ms1.cli``: the Redis
source, queue and dead letters; their own consumer names; the console on in the first)
and ``ms4-sim --reject-every`` so some objects are refused.

In this order (one stack for the module, on one xdist worker):

1. after a run the overview's numbers (invoices delivered, MS4's answers by status, dead
   letters, e-mails read), added up over both instances, are ms4-sim's counts, each
   instance has its row, and the streams are empty;
2. a replay without the token, and a replay posted from another origin (a page of another
   web server that submits the console's replay form, with the right token even), are
   refused and change nothing;
3. a dead letter found by a filter (its invoice id) is replayed with the token: it
   disappears from the list and reaches the sim (which was told to accept it again);
4. the other instance, stopped, leaves the overview at once (its snapshot withdrawn).

A screenshot of each page is taken (into ``docs/`` with ``MS1_CONSOLE_SCREENSHOTS=1``,
else into the test's temp dir).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, free_port
from support import service_ini, sim_control, tail, wait_until

from ms1.pipeline import samples

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("console-browser")]
ROOT = Path(__file__).parent.parent
CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token-0123456789"
API_KEY = "sim-key"
EMAILS = 600
REJECT_EVERY = 9


def sim_get(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}", timeout=5) as answer:
        return json.loads(answer.read())


@dataclass
class Stack:
    console: str
    sim: str
    redis: RedisServer
    log: Path
    shots: Path
    emails: list[samples.Sample]
    other: subprocess.Popen[Any]
    other_log: Path

    def overview(self) -> dict[str, Any]:
        return sim_get(self.console, "/api/overview")  # same JSON reader

    def counts(self) -> tuple[int, dict[str, int], int]:
        """Dead letters kept, MS4's answers by status, invoices MS4 accepted."""
        stats = sim_get(self.sim, "/stats")
        return self.letters(), stats["requests_by_status"], stats["invoices_accepted"]

    def letters(self) -> int:
        client = self.redis.client()
        try:
            return int(client.xlen("ms1:dead-letters"))
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    tmp = tmp_path_factory.mktemp("console")
    redis = RedisServer(tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    procs: list[subprocess.Popen[Any]] = []
    try:
        sim = subprocess.Popen(
            [sys.executable, "-m", "ms1_tools.sim", "--port", "0", "--rate-limit", "0",
             "--api-key", API_KEY, "--latency", "0.01", "--reject-every", str(REJECT_EVERY)],
            stdout=subprocess.PIPE, text=True)
        procs.append(sim)
        assert sim.stdout is not None
        line = sim.stdout.readline()
        assert line.startswith("ms4-sim listening on "), line
        sim_url = line.split()[-1]
        port = free_port()
        env = {**os.environ, "MS1_MS4_API_KEY": API_KEY, "MS1_CONSOLE_TOKEN": TOKEN}
        services = []
        for name in ("console-a", "console-b"):
            config = tmp / f"{name}.ini"
            config.write_text(service_ini(redis.url, ms4_url=sim_url, settings={
                "ms1": {"shutdown_timeout": 5, "log_format": "kv"},
                # MS4's real ceiling (the run needs 24 requests): what the screenshots show
                "send": {"threads": 2, "requests_per_minute": 120, "rate_window": 60,
                         "rate_limiter": "redis"},
                "batch": {"max_wait": 0.1},
                "redis": {"consumer": name},
                "console": {"address": f"127.0.0.1:{port}" if name == "console-a" else ""},
            }))
            log = tmp / f"{name}.log"
            service = subprocess.Popen(
                [sys.executable, "-m", "ms1.cli", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env)
            procs.append(service)
            services.append((service, log))
        console = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _instances(console) == 2, 30), \
            tail(services[0][1]) + tail(services[1][1])
        emails = list(samples.generate(EMAILS, invalid_every=40))
        data = tmp / "in.jsonl"
        data.write_bytes(b"".join(s.data + b"\n" for s in emails))
        subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(tmp / "console-a.ini"),
                        "enqueue", str(data)], check=True, capture_output=True, timeout=60,
                       env=env)
        shots = ROOT / "docs" if os.environ.get("MS1_CONSOLE_SCREENSHOTS") else tmp
        shots.mkdir(exist_ok=True)
        (service, log), (other, other_log) = services
        yield Stack(console, sim_url, redis, log, shots, emails, other, other_log)
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0, tail(log)
        for text in (log.read_text(), other_log.read_text()):
            assert TOKEN not in text and API_KEY not in text
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        redis.kill()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    yield tab
    context.close()


def _instances(console: str) -> int:
    try:
        return int(sim_get(console, "/api/overview")["totals"]["instances"])
    except OSError:
        return -1


def text_of(page: Any, selector: str) -> str:
    return str(page.locator(selector).inner_text()).strip()


def statuses(page: Any) -> dict[str, int]:
    found = {}
    for span in page.locator("#requests-by-status .status").all():
        found[span.get_attribute("data-status")] = int(span.locator("b").inner_text())
    return found


def test_the_overview_shows_the_simulators_counts_after_a_run(stack: Stack, page: Any) -> None:
    valid = sum(1 for e in stack.emails if e.valid)

    def settled() -> bool:
        o = stack.overview()
        return (o["totals"].get("emails_read") == EMAILS
                and all(s["backlog"] == 0 for s in o["streams"]) and len(o["streams"]) == 2
                and o["totals"]["in_flight"] == 0)

    assert wait_until(settled, 60, 0.25), tail(stack.log)
    sim = sim_get(stack.sim, "/stats")
    rejected = valid - sim["unique_invoices_accepted"]
    assert rejected > 0 and sim["duplicate_invoices"] == 0
    page.goto(f"{stack.console}/")
    expected = {"#total-invoices-delivered": str(sim["invoices_accepted"]),
                "#total-emails-read": str(EMAILS),
                "#dead-letters": str(EMAILS - valid + rejected),
                "#total-requests": str(sum(sim["requests_by_status"].values()))}
    # the page refreshes itself (console.js): wait for the last snapshot to show
    assert wait_until(lambda: all(text_of(page, k) == v for k, v in expected.items())
                      and statuses(page) == {k: int(v) for k, v in
                                             sim["requests_by_status"].items()}, 20, 0.5), \
        ({k: text_of(page, k) for k in expected}, expected, statuses(page),
         sim["requests_by_status"])
    assert text_of(page, "#instances") == "2"
    rows = stack.overview()["instances"]
    assert {row["label"] for row in rows} == {"console-a", "console-b"}
    assert sum(row["emails_read"] for row in rows) == EMAILS, rows
    assert "console-a@" in text_of(page, "#instance-rows")
    assert "console-b@" in text_of(page, "#instance-rows")
    assert text_of(page, "#stream-inbound .backlog") == "0"
    assert text_of(page, "#stream-outbound .backlog") == "0"
    assert "Nothing holds every sender back" in text_of(page, "#held-now")
    page.screenshot(path=str(stack.shots / "console-overview.png"), full_page=True)


def test_replay_without_the_token_is_refused_and_changes_nothing(stack: Stack,
                                                                 page: Any) -> None:
    before = stack.counts()
    page.goto(f"{stack.console}/dead-letters?stage=ms4")
    page.screenshot(path=str(stack.shots / "console-dead-letters.png"), full_page=True)
    # the browser would not send an empty token field: the form is changed first
    page.eval_on_selector("#replay-all input[name=token]",
                          "e => e.removeAttribute('required')")
    page.click("#replay-all-button")
    assert "no admin token given" in text_of(page, "#refused")
    page.goto(f"{stack.console}/dead-letters?stage=ms4")
    page.fill("#replay-all input[name=token]", TOKEN[::-1])
    page.click("#replay-all-button")
    assert "wrong admin token" in text_of(page, "#refused")
    assert stack.counts() == before


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Another web site: its page posts the console's replay form at once."""

    target = ""

    def do_GET(self) -> None:
        body = (f'<html><body><form id="f" method="post" action="{self.target}/dead-letters/'
                f'replay"><input name="all" value="1"><input name="token" value="{TOKEN}">'
                '</form><script>document.getElementById("f").submit()</script></body></html>'
                ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_replay_from_another_origin_is_refused_even_with_the_token(stack: Stack,
                                                                  page: Any) -> None:
    before = stack.counts()
    handler = type("Attacker", (_Attacker,), {"target": stack.console})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://localhost:{server.server_port}/")  # another origin
        page.wait_for_url(f"{stack.console}/dead-letters/replay")
        assert "cross-origin request" in text_of(page, "#refused")
    finally:
        server.shutdown()
        server.server_close()
    assert stack.counts() == before


def test_a_letter_found_by_a_filter_is_replayed_and_reaches_the_sim(stack: Stack,
                                                                   page: Any) -> None:
    accepted = {i for r in sim_get(stack.sim, "/accepted") for i in r["invoice_ids"]}
    refused = sorted(e.invoice_id for e in stack.emails if e.valid
                     and e.invoice_id not in accepted)
    invoice = refused[len(refused) // 2]
    sim_control(stack.sim, reject_every=0)  # MS4 now takes what it refused
    letters_before = stack.letters()
    page.goto(f"{stack.console}/dead-letters")
    page.fill("#filter input[name=invoice]", invoice)
    page.click("#filter button[type=submit]")
    rows = page.locator("#letters tr[data-id]")
    assert rows.count() == 1 and rows.first.get_attribute("data-invoice") == invoice
    letter_id = rows.first.get_attribute("data-id")
    page.click(f"#letters a[href$='/dead-letters/{letter_id}']")
    assert text_of(page, "#letter-invoice") == invoice
    assert text_of(page, "#letter-stage") == "ms4"
    assert invoice in text_of(page, "#letter-payload")
    assert "rejected by sim" in text_of(page, "#letter-answer")
    page.screenshot(path=str(stack.shots / "console-letter.png"), full_page=True)
    page.go_back()
    page.check(f"#letters input[value='{letter_id}']")
    page.fill("#replay-selected input[name=token]", TOKEN)
    page.click("#replay-selected-button")
    assert "Replayed 1 of 1 dead letters in 1 batches" in text_of(page, "#replayed")
    page.click("#back")
    page.fill("#filter input[name=invoice]", invoice)
    page.click("#filter button[type=submit]")
    assert text_of(page, "#no-letters") == "no dead letter matches"
    assert stack.letters() == letters_before - 1
    assert wait_until(lambda: invoice in {i for r in sim_get(stack.sim, "/accepted")
                                          for i in r["invoice_ids"]}, 20), tail(stack.log)


@pytest.mark.skipif(shutil.which("chromium") is None and not Path(CHROMIUM).exists(),
                    reason="no chromium")
def test_chromium_is_debians(browser: Any) -> None:
    assert browser.version


def test_a_stopped_instance_leaves_the_overview(stack: Stack, page: Any) -> None:
    stack.other.send_signal(signal.SIGTERM)
    assert stack.other.wait(30) == 0, tail(stack.other_log)
    assert wait_until(lambda: _instances(stack.console) == 1, 3)
    page.goto(f"{stack.console}/")
    assert text_of(page, "#instances") == "1"
    assert "console-b@" not in text_of(page, "#instance-rows")
