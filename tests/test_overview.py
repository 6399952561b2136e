"""The overview (ms1/ops/overview.py) the console and top render: totals over the instances'
snapshots, backlog per stream and its drain time at MS4's ceiling (status' rule), what
holds sending back, the dead-letter summary; gather() over real parts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ms1.cli import admin
from ms1.errors import QueueError
from ms1.model import DeadLetter
from ms1.ops import overview
from ms1.ops.fleet import MemoryFleet
from ms1.ops.overview import Ceiling, collect, gather
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.runtime import settings as from_config


def snap(id: str, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema": 1, "id": id, "label": id.split("@")[0], "host": "h", "pid": 1,
        "version": "0.1.0", "started": 900.0, "updated": 999.5,
        "counters": {"emails_read": 100, "invoices_delivered": 90, "dead_lettered": 10,
                     "responses_202": 2, "responses_400": 1},
        "rates": {"window_s": 10.0, "emails_in_per_s": 10.0, "invoices_delivered_per_s": 9.0},
        "in_flight": 2, "concurrency_target": 8, "adaptive": True, "latency_s": 0.05,
        "held": {"pause_429_s": 0.0, "stop": None, "stop_status": None, "auth_blocked": False,
                 "breaker": "closed", "reason": None},
        "held_seconds": {"rate_budget": 5.0}, "held_recent": {"rate_budget": 0.5},
        "health": {"ok": True, "problem": None, "threads": {}},
    }
    base.update(over)
    return base


CEILING = Ceiling(120, 60.0, 50)


def test_totals_add_up_the_instances() -> None:
    view = collect([snap("b@h:2"), snap("a@h:1", in_flight=1)], ceiling=CEILING, now=1000.0)
    json.dumps(view)
    totals = view["totals"]
    assert totals["instances"] == 2 and totals["healthy"] == 2
    assert totals["emails_in_per_s"] == 20 and totals["invoices_delivered_per_s"] == 18
    assert totals["in_flight"] == 3 and totals["concurrency_target"] == 16
    assert totals["emails_read"] == 200 and totals["invoices_delivered"] == 180
    assert totals["dead_lettered"] == 20 and totals["requests"] == 6
    assert totals["requests_by_status"] == {"202": 4, "400": 2}
    assert [row["id"] for row in view["instances"]] == ["a@h:1", "b@h:2"]  # sorted
    row = view["instances"][0]
    assert row["age_s"] == 0.5 and row["uptime_s"] == 100 and row["requests"] == 3
    assert row["holding"] is None and row["healthy"]
    assert view["held"]["recent"]["rate_budget"] == 1.0
    assert view["held"]["seconds"]["rate_budget"] == 10.0
    assert view["held"]["now"] == []


def test_no_instances_and_broken_snapshots_still_give_an_overview() -> None:
    view = collect([], ceiling=CEILING, now=1.0)
    assert view["totals"]["instances"] == 0 and view["instances"] == []
    assert view["drain_s"] is None and view["streams"] == []
    odd = collect([{"id": "x", "counters": {"responses_202": "?"}, "rates": None}],
                  ceiling=CEILING, now=1.0)
    assert odd["totals"]["instances"] == 1 and odd["totals"]["requests"] == 0


def test_what_holds_sending_back_now() -> None:
    paused = snap("a@h:1", held={"pause_429_s": 12.4, "stop": None, "auth_blocked": False,
                                 "breaker": "closed", "reason": "paused by a 429 (12 s left)"})
    spell = snap("b@h:2", held={"pause_429_s": 0, "stop": "paused: MS4 rejects the API key "
                                "(401); fix the key and reload", "stop_status": 401,
                                "auth_blocked": True, "breaker": "closed"})
    broken = snap("c@h:3", held={"pause_429_s": 0, "stop": None, "auth_blocked": False,
                                 "breaker": "open", "reason": "circuit breaker open: MS4 is "
                                 "failing (503 Service Unavailable)"},
                  health={"ok": False, "problem": "thread sender-1 died"})
    view = collect([paused, spell, broken], ceiling=CEILING, now=1000.0)
    now = {entry["cause"]: entry for entry in view["held"]["now"]}
    assert set(now) == {"429_pause", "401_spell", "breaker_open"}
    assert now["429_pause"]["instances"] == ["a@h:1"]
    assert now["429_pause"]["detail"] == "paused by a 429 (12 s left)"
    assert now["401_spell"]["detail"].startswith("paused: MS4 rejects the API key")
    assert "503" in now["breaker_open"]["detail"] and now["breaker_open"]["name"] == \
        "breaker open"
    assert view["totals"]["healthy"] == 2
    assert view["instances"][2]["problem"] == "thread sender-1 died"


def test_backlog_per_stream_and_drain_time_at_the_ceiling() -> None:
    inbound = {"stream": "ms1:emails", "length": 1200, "group": "ms1", "pending": 100,
               "lag": None, "consumers": []}
    outbound = {"stream": "ms1:outbound", "length": 40, "pending": 4, "lag": None}
    view = collect([], ceiling=CEILING, inbound=inbound, outbound=outbound, now=1.0)
    by_name = {s["name"]: s for s in view["streams"]}
    assert by_name["inbound"]["backlog"] == 1200 and by_name["inbound"]["batches"] == 24
    assert by_name["inbound"]["drain_s"] == 12.0  # 24 requests at 2 per s
    assert by_name["outbound"]["backlog"] == 40 and by_name["outbound"]["drain_s"] == 20.0
    assert view["drain_s"] == 32.0
    # Redis can count the lag: lag + pending; a memory queue: ready + in flight
    view = collect([], ceiling=CEILING, inbound={"lag": 7, "pending": 3, "length": 99},
                   outbound={"backend": "memory", "ready": 3, "in_flight": 1,
                             "invoices": 150}, now=1.0)
    by_name = {s["name"]: s for s in view["streams"]}
    assert by_name["inbound"]["backlog"] == 10 and by_name["inbound"]["batches"] == 1
    assert by_name["outbound"]["backlog"] == 4 and by_name["outbound"]["invoices"] == 150
    # files/memory sources say nothing of a backlog: no inbound row
    view = collect([], ceiling=CEILING, inbound={"source": "files"}, now=1.0)
    assert view["streams"] == [] and view["drain_s"] is None


def test_the_drain_rule_is_the_one_status_prints(make_config) -> None:
    config = make_config("[send]\nrequests_per_minute = 120\nrate_window = 6\n"
                         "[batch]\nmax_items = 50\n")
    queue = {"stream": "ms1:outbound", "length": 30}
    status = admin._sending(config, queue)
    assert status == {"ceiling": "120 requests per 6 s", "ceiling_invoices_per_minute": 60000,
                      "backlog_batches": 30, "backlog_invoices": "at most 1500",
                      "drained_in_s": 1.5}
    view = collect([], ceiling=from_config.ceiling(config), outbound=queue, now=1.0)
    assert view["streams"][0]["drain_s"] == status["drained_in_s"]
    assert view["ceiling"]["text"] == status["ceiling"]


def test_errors_are_kept_and_redacted() -> None:
    from ms1 import redaction

    known = redaction.KNOWN.snapshot()
    try:
        redaction.remember("s3cret-password-value")
        view = collect([], ceiling=CEILING,
                       inbound={"error": "cannot reach redis://:s3cret-password-value@h"},
                       dead_letters={"error": "down"}, errors={"fleet": "no fleet"}, now=1.0)
    finally:
        redaction.KNOWN.restore(known)
    assert "s3cret" not in json.dumps(view)
    assert set(view["errors"]) == {"inbound", "dead_letters", "fleet"}
    assert view["dead_letters"] is None


def letter(stage: str, reason: str, invoice: str = "INV-1") -> DeadLetter:
    return DeadLetter(reason=reason, stage=stage, payload=b"{}", invoice_id=invoice)


def test_dead_letter_summary_by_stage_and_reason() -> None:
    store = MemoryDeadLetters()
    store.add([letter("ms4", "MS4 answered 400: item 0: rejected by sim")] * 3
              + [letter("processor", "raw_json.currency: not a currency: 'XXX'")] * 2
              + [letter("source", "no email field")])
    summary = overview.summarize_dead_letters(store)
    assert summary == {"count": 6, "by_stage": {"processor": 2, "ms4": 3, "source": 1},
                       "by_reason": [["MS4 answered 400", 3], ["raw_json.currency", 2],
                                     ["no email field", 1]],
                       "scanned": 6, "complete": True}
    partial = overview.summarize_dead_letters(store, limit=4)
    assert partial["count"] == 6 and partial["scanned"] == 4 and not partial["complete"]


def test_gather_reads_the_fleet_and_the_parts() -> None:
    fleet = MemoryFleet()
    fleet.publish("a@h:1", snap("a@h:1"), ttl=30)
    queue = MemoryQueue()
    store = MemoryDeadLetters()
    store.add([letter("ms4", "MS4 answered 400: x")])
    view = gather(fleet, ceiling=CEILING, source=MemorySource(), queue=queue,
                  dead_letters=store, now=1000.0)
    assert view["totals"]["instances"] == 1
    assert view["dead_letters"]["count"] == 1
    assert [s["name"] for s in view["streams"]] == ["outbound"]
    assert view["errors"] == {}


def test_gather_keeps_going_when_a_part_fails() -> None:
    class Down(MemoryFleet):
        def snapshots(self) -> list[dict[str, Any]]:
            raise QueueError("fleet unreachable")

    class BrokenQueue(MemoryQueue):
        def describe(self) -> dict[str, object]:
            raise QueueError("queue unreachable")

    store = MemoryDeadLetters()
    view = gather(Down(), ceiling=CEILING, queue=BrokenQueue(), dead_letters=store, now=1.0)
    assert view["errors"] == {"fleet": "fleet unreachable", "outbound": "queue unreachable"}
    assert view["dead_letters"]["count"] == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0 s"), (1.25, "1.2 s"), (42, "42 s"), (200, "3 min 20 s"),
    (7500, "2 h 05 min")])
def test_format_seconds(seconds: float | None, text: str) -> None:
    assert overview.format_seconds(seconds) == text


def test_format_rate() -> None:
    assert [overview.format_rate(x) for x in (0, 0.354, 12.44, 1250)] == \
        ["0", "0.35", "12.4", "1,250"]


def test_letter_counts_read_the_letters_again_only_when_the_count_changes() -> None:
    class Counting(MemoryDeadLetters):
        scans = 0

        def scan(self, after: str | None = None, limit: int = 100) -> list[DeadLetter]:
            Counting.scans += 1
            return super().scan(after, limit)

    now = [0.0]
    store = Counting()
    store.add([letter("ms4", "MS4 answered 400: x")])
    counts = overview.LetterCounts(store, max_age=60, clock=lambda: now[0])
    assert counts.read()["count"] == 1 and Counting.scans == 1
    assert counts.read()["count"] == 1 and Counting.scans == 1  # same count: cached
    store.add([letter("processor", "raw_json: not JSON")])
    assert counts.read()["by_stage"] == {"processor": 1, "ms4": 1} and Counting.scans == 2
    now[0] = 61.0
    counts.read()
    assert Counting.scans == 3  # too old
    view = gather(None, ceiling=CEILING, dead_letters=counts, now=1.0)
    assert view["dead_letters"]["count"] == 2


@pytest.mark.parametrize("part", [
    {"counters": [1]}, {"rates": "fast"}, {"health": 3}, {"held": ["stop"]},
    {"held_recent": 1.5}, {"held_seconds": [0]}, {"in_flight": float("inf")},
    {"in_flight": 10 ** 400}, {"counters": {"emails_read": float("nan")}},
    {"updated": -float("inf")}, {"held": {"pause_429_s": float("inf")}},
    {"latency_s": float("nan")}, {"concurrency_target": "many"},
])
def test_a_snapshot_of_the_wrong_shape_spoils_only_its_own_row(part: dict[str, Any]
                                                                ) -> None:
    """A snapshot is read from Redis: a part of the wrong type or a number no float holds
    (JSON allows 10**400; Infinity and NaN pass json.loads) counts as missing, and the
    others are shown (a list for "counters" raised AttributeError, 10**400 OverflowError:
    no overview at all)."""
    view = collect([snap("a"), {"id": "b", **part}], ceiling=CEILING, now=1.0)
    assert view["totals"]["instances"] == 2
    assert [row["id"] for row in view["instances"]] == ["a", "b"]
    json.dumps(view, allow_nan=False)  # every figure a finite number
