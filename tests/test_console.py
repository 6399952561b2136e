"""The web console (ms1/console/): pages through Flask's test client, the admin token and
same-origin rules for replay (403, nothing changed), the dead-letter filter and pages, the
search and timeline over the invoice ledger, the token's sources, the trusted hosts, the
file-descriptor budget, and the console served by waitress inside a running service."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from flask.testing import FlaskClient
from support import run_in_process, wait_until

from ms1.config import Secret
from ms1.console import trusted_hosts
from ms1.console.app import ConsoleContext, OverviewCache, create_app
from ms1.console.browse import FilterError, LetterFilter, find, matching_ids
from ms1.console.run import Console
from ms1.console.timeline import iso
from ms1.errors import ConfigError, QueueError
from ms1.model import DeadLetter
from ms1.ops.fleet import MemoryFleet
from ms1.ops.httpserver import BoundedServer, may_accept
from ms1.ops.overview import Ceiling, gather
from ms1.pipeline import samples
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.ledger import Attempt, Ledger, LedgerEvent, MemoryLedger, Trace
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.runtime import pluginmanager
from ms1.runtime import settings as from_config
from ms1.runtime.components import Components
from ms1.runtime.service import Service
from ms1.runtime.settings import read_admin_token

TOKEN = "console-token-0123456789"
ORIGIN = "http://localhost"
DAY = dt.datetime(2025, 11, 1, 12, tzinfo=dt.UTC).timestamp()


def obj(invoice: str) -> bytes:
    return json.dumps({"invoice_id": invoice, "vendor_name": "Vendor A",
                       "invoice_date": "2025-11-01", "total_amount": 10.0, "currency": "USD",
                       "line_items": []}).encode()


def some_letters() -> list[DeadLetter]:
    letters = []
    for n in range(6):
        letters.append(DeadLetter(
            reason="MS4 answered 400: item 0: rejected by sim (reject_every)", stage="ms4",
            payload=obj(f"INV-{n}"), invoice_id=f"INV-{n}", message_id=f"<{n}@mail>",
            source_ref=f"1700000000000-{n}", ms4_answer='400 {"error": "rejected", '
            '"details": [{"index": 0}]}', at=DAY + n * 86400))
    letters.append(DeadLetter(reason="raw_json.currency: not an ISO 4217 currency: 'XXX'",
                              stage="processor", payload=b'{"raw_json": "broken"}',
                              message_id="<bad@mail>", source_ref="in.jsonl:7", at=DAY))
    return letters


class World:
    def __init__(self, token: str | None = TOKEN, ledger: Ledger | None = None) -> None:
        self.store = MemoryDeadLetters()
        self.store.add(some_letters())
        self.queue = MemoryQueue()
        self.fleet = MemoryFleet()
        self.ctx = ConsoleContext(
            overview=lambda: gather(self.fleet, ceiling=Ceiling(), queue=self.queue,
                                    dead_letters=self.store),
            store=self.store, queue=self.queue, max_items=50, max_bytes=1 << 20,
            token=Secret(token) if token else None, trusted_hosts=trusted_hosts(
                "127.0.0.1", ()), ledger=ledger)
        self.app = create_app(self.ctx)
        self.client: FlaskClient = self.app.test_client()

    def ids(self) -> list[str]:
        return [letter.id for letter in self.store.all()]

    def post(self, data: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post("/dead-letters/replay", data=data,
                                headers={"Origin": ORIGIN, **(headers or {})})


@pytest.fixture
def world() -> World:
    return World()


# --- pages --------------------------------------------------------------------------------

def test_overview_page_fragment_and_json(world: World) -> None:
    world.fleet.publish("a@h:1", {"id": "a@h:1", "counters": {"invoices_delivered": 7,
                                                               "responses_202": 1},
                                  "health": {"ok": True}}, ttl=30)
    page = world.client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'id="total-invoices-delivered">7<' in html and "a@h:1" in html
    assert "console.js" in html
    part = world.client.get("/overview.part").get_data(as_text=True)
    assert 'id="total-invoices-delivered">7<' in part and "<html" not in part
    data = world.client.get("/api/overview").get_json()
    assert data["totals"]["invoices_delivered"] == 7
    assert data["dead_letters"]["count"] == 7


def test_security_headers(world: World) -> None:
    headers = world.client.get("/").headers
    assert headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_a_request_naming_another_host_is_refused(world: World) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 names its own host."""
    assert world.client.get("/", headers={"Host": "evil.example:8000"}).status_code == 400
    assert world.client.get("/", headers={"Host": "localhost:9465"}).status_code == 200
    assert world.client.get("/", headers={"Host": "127.0.0.1:9465"}).status_code == 200


def test_dead_letter_list_filters(world: World) -> None:
    def shown(query: str) -> list[str]:
        answer = world.client.get(f"/dead-letters?{query}")
        assert answer.status_code == 200, answer.get_data(as_text=True)
        html = answer.get_data(as_text=True)
        return [part.split('"', 1)[0] for part in html.split('data-invoice="')[1:]]

    assert len(shown("")) == 7
    assert shown("stage=processor") == [""]
    assert shown("invoice=INV-3") == ["INV-3"]
    assert shown("invoice=inv-") == [f"INV-{n}" for n in range(6)]
    assert shown("reason=REJECTED+BY+SIM&stage=ms4") == [f"INV-{n}" for n in range(6)]
    assert shown("from=2025-11-02&to=2025-11-03") == ["INV-1", "INV-2"]
    assert shown("reason=nothing-like-this") == []
    bad = world.client.get("/dead-letters?from=yesterday")
    assert bad.status_code == 400 and "expected a date" in bad.get_data(as_text=True)
    assert world.client.get("/dead-letters?stage=nope").status_code == 400


def test_dead_letter_pages(world: World) -> None:
    world.store.add([DeadLetter(reason="r", stage="ms4", payload=b"{}", invoice_id=f"P-{n}")
                     for n in range(60)])
    html = world.client.get("/dead-letters").get_data(as_text=True)
    assert html.count('type="checkbox" name="id"') == 50
    link = html.split('id="next-page" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    rest = world.client.get(link).get_data(as_text=True)
    assert rest.count('type="checkbox" name="id"') == 17 and 'id="next-page"' not in rest


def test_letter_detail_shows_object_reference_and_answer(world: World) -> None:
    letter = world.store.all()[2]
    html = world.client.get(f"/dead-letters/{letter.id}").get_data(as_text=True)
    assert "INV-2" in html and "&#34;vendor_name&#34;: &#34;Vendor A&#34;" in html
    assert "message id &lt;2@mail&gt;" in html and "1700000000000-2" in html
    assert "&#34;details&#34;" in html  # MS4's answer, pretty-printed
    assert world.client.get("/dead-letters/999").status_code == 404
    assert world.client.get("/dead-letters/not-an-id").status_code == 404


def test_pages_escape_what_letters_hold(world: World) -> None:
    world.store.add([DeadLetter(reason="<script>alert(1)</script>", stage="ms4",
                                payload=b"<img src=x onerror=alert(1)>", invoice_id="<b>x")])
    html = world.client.get("/dead-letters").get_data(as_text=True)
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    letter = world.store.all()[-1]
    detail = world.client.get(f"/dead-letters/{letter.id}").get_data(as_text=True)
    assert "<img src=x" not in detail


# --- replay -------------------------------------------------------------------------------

def test_replay_selected_with_the_token(world: World) -> None:
    ids = world.ids()[:2]
    answer = world.post({"id": ids, "token": TOKEN})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert "Replayed 2 of 2 dead letters in 1 batches" in answer.get_data(as_text=True)
    assert not set(ids) & set(world.ids())
    assert world.queue.stats().ready == 1 and world.queue.stats().invoices == 2


def test_replay_with_the_token_in_a_header_and_a_referer(world: World) -> None:
    answer = world.client.post("/dead-letters/replay", data={"id": world.ids()[0]},
                               headers={"X-Admin-Token": TOKEN,
                                        "Referer": "http://localhost/dead-letters?x=1"})
    assert answer.status_code == 200
    assert world.store.count() == 6


def test_replay_all_that_match_a_filter(world: World) -> None:
    answer = world.post({"all": "1", "invoice": "INV-", "from": "2025-11-03",
                         "token": TOKEN})
    assert answer.status_code == 200
    left = [letter.invoice_id for letter in world.store.all()]
    assert left == ["INV-0", "INV-1", None]


def test_a_processor_letter_still_invalid_is_kept_and_said(world: World) -> None:
    processor = world.store.all()[-1]
    answer = world.post({"id": processor.id, "token": TOKEN})
    assert answer.status_code == 200
    assert "Kept as dead letters" in answer.get_data(as_text=True)
    assert processor.id in world.ids()


@pytest.mark.parametrize(("data", "headers", "why"), [
    ({}, {}, "no admin token given"),
    ({"token": "wrong-token-0123456789"}, {}, "wrong admin token"),
    ({"token": TOKEN[:-1]}, {}, "wrong admin token"),
    ({"token": TOKEN}, {"Origin": "http://evil.example"}, "cross-origin request"),
    ({"token": TOKEN}, {"Origin": "null"}, "cross-origin request"),
    ({"token": TOKEN}, {"Origin": "http://localhost:1"}, "cross-origin request"),
])
def test_replay_refused_changes_nothing(world: World, data: dict[str, str],
                                        headers: dict[str, str], why: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    before = world.ids()
    answer = world.post({"all": "1", **data}, headers)
    assert answer.status_code == 403
    assert why in answer.get_data(as_text=True)
    assert world.ids() == before and world.queue.stats().empty
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_wrong_admin_tokens_are_throttled_per_address(world: World,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Issue 21: 5,000 wrong tokens took 4.8 s, two log lines each. Now an address gets
    five tries; then each try waits (1 s, doubling), answered 429 with Retry-After without
    the token being looked at (the right one included), and one WARNING says so."""
    caplog.set_level(logging.INFO)
    answers = [world.post({"all": "1", "token": f"guess-{n:04d}-0123456789"}).status_code
               for n in range(200)]
    assert answers[:5] == [403] * 5 and set(answers[5:]) == {429}
    late = world.post({"all": "1", "token": TOKEN})
    assert late.status_code == 429 and int(late.headers["Retry-After"]) >= 1
    assert world.store.count() == 7  # nothing replayed
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    print(f"\n201 tries: {len(lines)} log lines at INFO or above")
    assert len(lines) <= 5 * 2 + 2, [r.getMessage() for r in lines]
    assert sum("wrong admin tokens in a row" in r.getMessage() for r in lines) == 1


def test_the_throttle_waits_double_and_a_right_token_clears_the_address() -> None:
    from ms1.console.throttle import FIRST_WAIT, FREE_GUESSES, Throttle

    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    for _ in range(FREE_GUESSES - 1):
        throttle.failed("a")
    assert throttle.wait("a") == 0
    throttle.failed("a")
    assert throttle.wait("a") == FIRST_WAIT and throttle.wait("b") == 0
    now[0] += FIRST_WAIT
    throttle.failed("a")
    assert throttle.wait("a") == 2 * FIRST_WAIT
    throttle.succeeded("a")
    assert throttle.wait("a") == 0


def test_replay_without_origin_or_referer_is_refused(world: World) -> None:
    answer = world.client.post("/dead-letters/replay", data={"all": "1", "token": TOKEN})
    assert answer.status_code == 403
    assert world.store.count() == 7


def test_a_console_without_a_token_is_read_only() -> None:
    world = World(token=None)
    assert "Replaying is off" in world.client.get("/dead-letters").get_data(as_text=True)
    answer = world.post({"all": "1", "token": "anything-at-all-here"})
    assert answer.status_code == 403 and "no admin token is configured" in \
        answer.get_data(as_text=True)
    assert world.store.count() == 7


def test_replay_refuses_a_get(world: World) -> None:
    assert world.client.get("/dead-letters/replay").status_code in (404, 405)


def test_access_log_holds_no_query_no_form_no_token(world: World,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ms1.console")
    world.client.get("/dead-letters?reason=secret-reason-text&invoice=INV-3")
    world.post({"id": world.ids()[0], "token": TOKEN})
    lines = [r.getMessage() for r in caplog.records if r.name == "ms1.console"]
    assert any("GET /dead-letters 200" in line for line in lines), lines
    assert any("POST /dead-letters/replay 200" in line for line in lines), lines
    text = "\n".join(lines)
    assert "secret-reason-text" not in text and "INV-3" not in text and TOKEN not in text


# --- the filter, pure ---------------------------------------------------------------------

def test_filter_args_round_trip_and_errors() -> None:
    flt = LetterFilter.from_args({"reason": " x ", "stage": "ms4", "from": "2025-11-01",
                                  "to": "2025-11-02", "invoice": "INV"})
    assert LetterFilter.from_args(flt.args()) == flt
    assert LetterFilter().empty and not flt.empty
    with pytest.raises(FilterError, match="to: before from"):
        LetterFilter.from_args({"from": "2025-11-02", "to": "2025-11-01"})


def test_find_stops_at_its_scan_budget_and_says_where_to_go_on() -> None:
    store = MemoryDeadLetters()
    store.add([DeadLetter(reason="r", stage="ms4", payload=b"", invoice_id=f"I-{n}")
               for n in range(100)])
    store.add([DeadLetter(reason="needle", stage="ms4", payload=b"", invoice_id="X")])
    flt = LetterFilter(reason="needle")
    first = find(store, flt, budget=40)
    assert first.letters == [] and first.scanned == 40 and first.next_after == "40"
    assert find(store, flt, first.next_after, budget=100).letters[0].invoice_id == "X"
    assert matching_ids(store, flt) == ["101"]


# --- where the token comes from -----------------------------------------------------------

def test_admin_token_from_env_or_file(make_config, tmp_path: Path) -> None:
    config = make_config("")
    assert read_admin_token(config, {}) is None
    token = read_admin_token(config, {"MS1_CONSOLE_TOKEN": f" {TOKEN}\n"})
    assert token is not None and token.reveal() == TOKEN and TOKEN not in repr(token)
    path = tmp_path / "token"
    path.write_text("from-the-file-0123456789\n")
    config = make_config(f"[console]\nadmin_token_file = {path}\n")
    token = read_admin_token(config, {"MS1_CONSOLE_TOKEN": TOKEN})
    assert token is not None and token.reveal() == "from-the-file-0123456789"


@pytest.mark.parametrize(("ini", "env", "message"), [
    ("", {"MS1_CONSOLE_TOKEN": "x7Kq2"},
     r"\[console\] admin_token_env: \$MS1_CONSOLE_TOKEN is shorter than 16"),
    ("[console]\nadmin_token_env = MY_TOKEN\n", {"MY_TOKEN": "two\nlines-0123456789"},
     r"\[console\] admin_token_env: \$MY_TOKEN holds more than one line"),
    ("[console]\nadmin_token_file = /nonexistent/token\n", {},
     r"\[console\] admin_token_file: cannot read admin token file"),
])
def test_bad_tokens_are_refused_naming_the_key(make_config, ini: str, env: dict[str, str],
                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        read_admin_token(make_config(ini), env)
    for value in env.values():
        assert value not in str(caught.value)


@pytest.mark.parametrize("key", ["admin_token", "token", "password"])
def test_a_token_in_the_ini_is_refused_at_load(make_config, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"ms1.ini: \[console\] {key}: the console's admin "
                                          r"token is never read from the INI file: set "
                                          r"\$MS1_CONSOLE_TOKEN") as caught:
        make_config(f"[console]\n{key} = hunter2-hunter2-hunter2\n")
    assert "hunter2" not in str(caught.value)


def test_origins_are_checked_at_load(make_config) -> None:
    config = make_config("[console]\norigins = https://Ms1.Example.com, http://[::1]:9000\n")
    assert config.get_str("console", "origins")
    with pytest.raises(ConfigError, match=r"\[console\] origins: expected an origin"):
        make_config("[console]\norigins = ms1.example.com/path\n")


def test_trusted_hosts() -> None:
    assert set(trusted_hosts("127.0.0.1", ())) == {"127.0.0.1", "localhost", "::1", "[::1]"}
    assert trusted_hosts("10.0.0.5", ("https://ms1.example.com",)) == \
        ["10.0.0.5", "ms1.example.com"]
    assert trusted_hosts("0.0.0.0", ()) is None
    assert "ms1.example.com" in (trusted_hosts("::", ("http://ms1.example.com:8080",)) or [])
    # an IPv6 origin, with or without a port (was cut to "[:" and ""): both spellings
    for origin in ("http://[2001:db8::7]", "https://[2001:db8::7]:8443"):
        assert {"2001:db8::7", "[2001:db8::7]"} <= set(trusted_hosts("10.0.0.5", (origin,))
                                                       or [])


# --- the server ---------------------------------------------------------------------------

def test_fd_budget_rule() -> None:
    # limit 256: reserve 32; the rest of ms1 holds 40 and may need up to 100
    assert may_accept(open_fds=40, limit=256, connections=0, pipeline_fds=100)
    assert may_accept(open_fds=163, limit=256, connections=123, pipeline_fds=100)
    assert not may_accept(open_fds=164, limit=256, connections=124, pipeline_fds=100)
    # once the pipeline holds what it needs, only the reserve is kept
    assert may_accept(open_fds=222, limit=256, connections=100, pipeline_fds=100)
    assert not may_accept(open_fds=224, limit=256, connections=100, pipeline_fds=100)


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served(make_config, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Console, World]]:
    monkeypatch.setenv("MS1_CONSOLE_TOKEN", TOKEN)
    port = free_port()
    config = make_config(f"[console]\naddress = 127.0.0.1:{port}\nmax_connections = 3\n")
    world = World()
    console = Console(from_config.console(config), fleet=world.fleet, source=None,
                      queue=world.queue,
                      dead_letters=world.store)
    console.start()
    yield console, world
    console.close()


def test_console_served_by_waitress(served: tuple[Console, World]) -> None:
    console, _ = served
    base = f"http://{console.address}"
    status, html = get(f"{base}/")
    assert status == 200 and "ms1 console" in html
    assert get(f"{base}/static/console.js")[0] == 200
    assert get(f"{base}/", host="evil.example")[0] == 400


def test_waitress_holds_at_most_max_connections(served: tuple[Console, World]) -> None:
    console, _ = served
    host, port = console.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=2) for _ in range(6)]
    try:
        assert wait_until(lambda: console.server.server.connections == 3, 5)
        time.sleep(0.3)
        assert console.server.server.connections == 3  # the others wait in the backlog
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: get(f"http://{console.address}/")[0] == 200, 10)


def test_the_listener_is_not_polled_inside_the_fd_budget(make_config) -> None:
    from waitress.adjustments import Adjustments

    usage = [(40, 256)]
    adj = Adjustments(host="127.0.0.1", port=0, connection_limit=100)
    server = BoundedServer(lambda environ, start: [], adj, label="console",
                           logger=logging.getLogger("ms1.console"), request_timeout=10,
                           pipeline_fds=100, usage=lambda: usage[0])
    try:
        assert server.readable()
        usage[0] = (224, 256)  # one more would eat into the reserve (256 // 8)
        server._checked_at = -1.0
        assert not server.readable()
    finally:
        server.close()


def test_overview_cache_builds_once_and_serves_the_last_when_slow() -> None:
    calls = []

    def build() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            time.sleep(1.0)
        return {"n": len(calls)}

    cache = OverviewCache(build, max_age=0.1, wait=0.2)
    assert cache.get() == {"n": 1}
    assert cache.get() == {"n": 1}  # fresh enough
    time.sleep(0.15)
    assert cache.get()["n"] == 1  # the second build is slow: the last one, at once
    assert wait_until(lambda: cache.get()["n"] == 2, 3)
    assert len(calls) == 2


def test_a_service_with_a_console_shows_itself(make_config, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    monkeypatch.setenv("MS1_CONSOLE_TOKEN", TOKEN)
    port = free_port()
    pm = pluginmanager.make_plugin_manager()
    config = make_config(f"[console]\naddress = 127.0.0.1:{port}\n[batch]\nmax_wait = 0.05\n")
    emails = [s.data for s in samples.generate(300, invalid_every=10)]
    service = run_in_process(pm, config, emails)
    assert service.console is not None
    # run_in_process shut the service down: the console is closed, the snapshot withdrawn
    assert service.fleet.snapshots() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_replay_failing_midway_says_what_was_replayed(world: World,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The queue goes away after the first chunk: the page and the log say how many were
    replayed before (they are on the queue and gone from the dead letters), not 0."""
    from ms1.console import app as console_app
    from ms1.errors import QueueError

    monkeypatch.setattr(console_app, "REPLAY_CHUNK", 2)
    put = world.queue.put
    calls = []

    def put_until_the_queue_goes(batch: Any) -> None:
        calls.append(batch)
        if len(calls) > 1:
            raise QueueError("queue unreachable")
        put(batch)

    monkeypatch.setattr(world.queue, "put", put_until_the_queue_goes)
    answer = world.post({"all": "1", "invoice": "INV-", "token": TOKEN})
    assert answer.status_code == 503
    page = answer.get_data(as_text=True)
    assert "Replayed 2 of 6 dead letters in 1 batches" in page, page
    assert "queue unreachable" in page
    assert len(world.ids()) == 5  # 7 - the 2 replayed


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_every_interface_without_origins_is_refused_at_start(make_config: Any, host: str
                                                              ) -> None:
    """Issue 21: [console] address on every interface with no origins answered a request
    naming any host (DNS rebinding: a page on attacker.example resolving here got the dead
    letters) with one WARNING; now the console refuses to start, naming the key. With
    origins it starts and refuses other hosts."""
    world = World()
    config = make_config(f"[console]\naddress = {host}:{free_port()}\n")
    with pytest.raises(ConfigError, match=r"\[console\] address: .* every interface.*origins"):
        from_config.console(config)
    config = make_config(f"[console]\naddress = {host}:{free_port()}\n"
                         "origins = https://ms1.example.com\n")
    console = Console(from_config.console(config), fleet=world.fleet, source=None,
                      queue=world.queue,
                      dead_letters=world.store)
    try:
        assert console.context.trusted_hosts is not None
        assert "ms1.example.com" in console.context.trusted_hosts
        assert "attacker.example" not in console.context.trusted_hosts
    finally:
        console.close()


# --- search and timeline (issue 24) -------------------------------------------------------

#: MS4's text and ids are hostile: markup, a terminal escape, a bell
HOSTILE = '400 {"error": "<script>alert(1)</script>"} \x1b[31mred\x07 bell'
HOSTILE_ID = "INV-<img src=x onerror=alert(1)>\x1b[2J"
TP = "00-{:032x}-{:016x}-01"


def record_history(ledger: Ledger) -> float:
    """INV-A and INV-B batched together (b-1), refused together (split into b-2, b-3);
    INV-A accepted at its second attempt (the first got no answer), INV-B and HOSTILE_ID
    dead-lettered with HOSTILE; an e-mail refused by the processor. Returns the start."""
    t0 = time.time() - 3600
    pair = dict(invoice_ids=("INV-A", "INV-B"), message_ids=("<a@mail>", "<b@mail>"),
                refs=("1-0", "1-1"))
    ledger.record([LedgerEvent("batched", "b-1", **pair, at=t0)])
    ledger.record([
        LedgerEvent("split", "b-1", **pair, at=t0 + 1, detail="400 refused, naming nothing",
                    parts=("b-2", "b-3"),
                    attempts=(Attempt(t0 + 0.5, 400, 0.25, TP.format(1, 1)),)),
        LedgerEvent("batched", "b-2", ("INV-A",), ("<a@mail>",), ("1-0",), at=t0 + 1.1,
                    detail="a half of b-1"),
        LedgerEvent("batched", "b-3", ("INV-B", HOSTILE_ID), ("<b@mail>", "<h@mail>"),
                    ("1-1", "1-2"), at=t0 + 1.2, detail="a half of b-1")])
    ledger.record([LedgerEvent(
        "accepted", "b-2", ("INV-A",), ("<a@mail>",), ("1-0",), at=t0 + 5,
        attempts=(Attempt(t0 + 2, None, 3.0, TP.format(2, 2)),
                  Attempt(t0 + 4.9, 202, 0.0456, TP.format(2, 3))))])
    ledger.record([LedgerEvent(
        "dead_lettered", "b-3", ("INV-B", HOSTILE_ID), ("<b@mail>", "<h@mail>"),
        ("1-1", "1-2"), at=t0 + 6, detail=HOSTILE,
        attempts=(Attempt(t0 + 5.9, 400, 0.1, TP.format(3, 3)),))])
    ledger.record([LedgerEvent("rejected", "e-1-9", (), ("<bad@mail>",), ("1-9",), at=t0 + 7,
                               detail="raw_json.currency: not an ISO 4217 currency: 'XXX'")])
    return t0


@pytest.fixture
def traced() -> World:
    ledger = MemoryLedger(retention_days=7)
    record_history(ledger)
    return World(ledger=ledger)


def page(world: World, id: str, status: int) -> str:
    answer = world.client.get("/trace", query_string={"id": id})
    html = answer.get_data(as_text=True)
    assert answer.status_code == status, html
    return html


def kinds(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('data-kind="')[1:]]


def test_every_page_has_the_search_box(traced: World) -> None:
    for path in ("/", "/dead-letters", f"/dead-letters/{traced.ids()[0]}", "/trace"):
        html = traced.client.get(path).get_data(as_text=True)
        form = html.split('id="search"', 1)[1].split("</form>", 1)[0]
        assert 'action="/trace"' in html.split('id="search"', 1)[0].rsplit("<form", 1)[1]
        assert 'method="get"' in html.split('id="search"', 1)[0].rsplit("<form", 1)[1]
        assert 'name="id"' in form and 'maxlength="512"' in form, path


def test_the_search_box_leads_to_the_timeline(traced: World) -> None:
    html = traced.client.get("/").get_data(as_text=True)
    action = html.split('id="search"', 1)[0].rsplit('action="', 1)[1].split('"', 1)[0]
    answer = traced.client.get(action, query_string={"id": "INV-A"})
    assert answer.status_code == 200 and 'id="trace-outcome"' in answer.get_data(as_text=True)


def test_an_invoice_id_shows_its_outcome_and_timeline(traced: World) -> None:
    assert traced.ctx.ledger is not None
    found = traced.ctx.ledger.trace("INV-A")
    assert found is not None
    t0 = found.events[0].at
    html = page(traced, "INV-A", 200)
    outcome = html.split('id="trace-outcome"', 1)[1].split("</div>", 1)[0]
    assert "<strong>accepted</strong>" in outcome and "MS4 accepted it" in outcome
    # oldest first: b-1's events, then b-2's; nothing of b-3 (INV-A was never in it)
    assert kinds(html) == ["batched", "split", "batched", "accepted"]
    assert 'id="trace-id">INV-A<' in html
    assert "Idempotency-Key" in html and "<code>b-2</code>" in html and "b-1" in html
    assert "split into" in html and "<code>b-3</code>" in html  # a part, named
    assert "dead lettered" not in html and "&lt;script&gt;" not in html
    accepted = html.split('data-kind="accepted"', 1)[1]
    rows = accepted.split("</table>", 2)[1].split("<tr>")[2:]
    assert "no answer" in rows[0] and "3000.0" in rows[0] and TP.format(2, 2) in rows[0]
    assert ">202<" in rows[1] and "45.6" in rows[1] and TP.format(2, 3) in rows[1]
    assert iso(t0 + 4.9) in rows[1] and iso(t0 + 4.9).endswith("Z") and "T" in iso(t0)
    assert html.index(iso(t0)) < html.index(iso(t0 + 5))  # the times shown, in order
    assert 'href="/trace?id=INV-B"' in html  # every id of a batch leads to its own trace


def test_a_message_id_shows_the_same_history_and_ms4s_text_escaped(traced: World) -> None:
    html = page(traced, "<b@mail>", 200)
    assert 'id="trace-id">&lt;b@mail&gt;<' in html
    assert "<strong>dead lettered</strong>" in html
    assert kinds(html) == ["batched", "split", "batched", "dead_lettered"]
    assert "A message id" in html and 'id="trace-letters"' not in html
    text = html.split('data-kind="dead_lettered"', 1)[1].split('class="detail">', 1)[1]
    text = text.split("</pre>", 1)[0]
    assert text == ('400 {&#34;error&#34;: &#34;&lt;script&gt;alert(1)&lt;/script&gt;&#34;}'
                    " \\u001b[31mred\\u0007 bell")
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "\x1b" not in html and "\x07" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;\\u001b[2J" in html  # the hostile id, shown


def test_a_hostile_id_is_searched_and_shown_escaped(traced: World) -> None:
    html = page(traced, HOSTILE_ID, 200)
    assert 'id="trace-id">INV-&lt;img src=x onerror=alert(1)&gt;\\u001b[2J<' in html
    assert "\x1b" not in html and "<img" not in html
    assert 'id="trace-letters" href="/dead-letters?invoice=INV-%3Cimg' in html
    json_link = html.split('id="trace-json" href="', 1)[1].split('"', 1)[0]
    assert json_link.startswith("/api/trace?id=INV-%3Cimg") and "%1B" in json_link
    assert traced.client.get(json_link.replace("&amp;", "&")).get_json()["id"] == HOSTILE_ID


def test_a_rejected_email_shows_why(traced: World) -> None:
    html = page(traced, "<bad@mail>", 200)
    assert "<strong>rejected</strong>" in html and kinds(html) == ["rejected"]
    assert "not an ISO 4217 currency: &#39;XXX&#39;" in html and "<code>1-9</code>" in html
    assert "Idempotency-Key" not in html.split('id="timeline"', 1)[1]


def test_an_unknown_id_is_404_naming_the_retention(traced: World) -> None:
    html = page(traced, "INV-NOPE", 404)
    assert "INV-NOPE: not found (retention 7 days)" in html
    assert 'id="timeline"' not in html
    answer = traced.client.get("/api/trace?id=INV-NOPE")
    assert answer.status_code == 404
    assert answer.get_json() == {"id": "INV-NOPE", "found": False, "retention_days": 7,
                                 "error": "INV-NOPE: not found (retention 7 days)"}
    half = World(ledger=MemoryLedger(retention_days=0.5))
    assert "not found (retention 0.5 days)" in page(half, "INV-A", 404)


def test_no_id_gives_the_search_page(traced: World) -> None:
    for html in (page(traced, "", 200), page(traced, "   ", 200),
                 traced.client.get("/trace").get_data(as_text=True)):
        assert 'id="trace-help"' in html and "It keeps 7 days" in html
        assert 'id="trace-error"' not in html and 'id="timeline"' not in html
    answer = traced.client.get("/api/trace")
    assert answer.status_code == 400 and "give an invoice id" in answer.get_json()["error"]


def test_ids_are_stripped_and_capped(traced: World) -> None:
    assert kinds(page(traced, "  INV-A\n", 200)) == ["batched", "split", "batched", "accepted"]
    html = page(traced, "x" * 513, 400)
    assert "id longer than 512 characters" in html and "x" * 513 not in html
    assert traced.client.get("/api/trace", query_string={"id": "x" * 5000}).status_code == 400
    assert "not found" in page(traced, "x" * 512, 404)


def test_with_the_ledger_off_the_search_says_so(world: World) -> None:
    assert world.ctx.ledger is None
    for id in ("INV-A", ""):
        html = page(world, id, 404)
        assert "the ledger is off ([ledger] backend = off)" in html
        assert 'id="search"' in html and 'id="timeline"' not in html
    answer = world.client.get("/api/trace?id=INV-A")
    assert answer.status_code == 404 and "the ledger is off" in answer.get_json()["error"]


class BrokenLedger(MemoryLedger):
    """A ledger whose store is gone."""

    def trace(self, id: str) -> Trace | None:
        raise QueueError(f"trace {id[:80]!r}: ConnectionError: Error 111 connecting to "
                         "127.0.0.1:1. Connection refused. (Redis at redis://127.0.0.1:1/0)")


def test_a_failing_ledger_is_503_said_and_logged_without_the_id(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ms1.console")
    world = World(ledger=BrokenLedger())
    html = page(world, "INV-SECRET-42", 503)
    error = html.split('id="trace-error">', 1)[1].split("</div>", 1)[0]
    assert error.startswith("the ledger cannot be read: trace &#39;INV-SECRET-42&#39;: "
                            "ConnectionError")
    assert "Traceback" not in html and 'id="timeline"' not in html
    answer = world.client.get("/api/trace?id=INV-SECRET-42")
    assert answer.status_code == 503 and "Connection refused" in answer.get_json()["error"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ms1.console"]
    assert any("reading the ledger failed: trace (the id): ConnectionError" in line
               for line in lines), lines
    assert any("GET /trace 503" in line for line in lines), lines
    assert "INV-SECRET-42" not in "\n".join(lines)
    assert not any(r.exc_info for r in caplog.records)


def test_the_api_gives_what_trace_json_gives(traced: World) -> None:
    data = traced.client.get("/api/trace", query_string={"id": "INV-B"}).get_json()
    assert data["id"] == "INV-B" and data["found"] is True and data["retention_days"] == 7
    assert data["outcome"] == "dead_lettered"
    assert [e["kind"] for e in data["events"]] == ["batched", "split", "batched",
                                                   "dead_lettered"]
    last = data["events"][-1]
    assert last["idempotency_key"] == "b-3" and last["detail"] == HOSTILE  # raw in JSON
    assert last["invoices"] == 2 and last["attempts"][0]["status"] == 400
    assert data["events"][1]["parts"] == ["b-2", "b-3"]
    rejected = traced.client.get("/api/trace?id=%3Cbad@mail%3E").get_json()["events"][0]
    assert rejected["idempotency_key"] is None


def test_a_redis_ledger_is_searched(redis_url: str) -> None:
    from ms1_plugins.redis import RedisLink
    from ms1_plugins.redis.ledger import RedisLedger

    ledger = RedisLedger(RedisLink(redis_url).use(), key="t:ledger", retention_days=30)
    try:
        record_history(ledger)
        world = World(ledger=ledger)
        html = page(world, "INV-A", 200)
        assert "<strong>accepted</strong>" in html
        assert kinds(html) == ["batched", "split", "batched", "accepted"]
        html = page(world, "<h@mail>", 200)
        assert "<strong>dead lettered</strong>" in html and "\\u001b[31mred" in html
        assert "\x1b" not in html and "<script>alert" not in html
        assert "not found (retention 30 days)" in page(world, "INV-NOPE", 404)
    finally:
        ledger.close()


def test_a_service_passes_its_ledger_to_the_console(make_config: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pipeline writes the ledger; the service's console reads it."""
    monkeypatch.setenv("MS1_CONSOLE_TOKEN", TOKEN)
    pm = pluginmanager.make_plugin_manager()
    config = make_config(f"[console]\naddress = 127.0.0.1:{free_port()}\n"
                         "[batch]\nmax_wait = 0.05\n")
    emails = list(samples.generate(20, invalid_every=10))
    transport = pluginmanager.build_transport(pm, config)
    transport.set_api_key(config.api_key)
    ledger = MemoryLedger()
    parts = Components(source=MemorySource([e.data for e in emails], finite=True),
                       policy=pluginmanager.build_batch_policy(pm, config),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport, ledger=ledger)
    service = Service(config, pm, parts, once=True)
    service.start()
    assert service.run_once(60).ok
    transport.close()
    assert service.console is not None and service.console.context.ledger is ledger
    client = service.console.app.test_client()
    good, bad = emails[0], next(e for e in emails if not e.valid)
    html = client.get("/trace", query_string={"id": good.invoice_id}).get_data(as_text=True)
    assert "<strong>accepted</strong>" in html and ">202<" in html
    html = client.get("/trace", query_string={"id": bad.message_id}).get_data(as_text=True)
    assert "<strong>rejected</strong>" in html
