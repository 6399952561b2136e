"""The RateLimit header fields MS4 (or its front) may announce (issue 20): read from
every answer, defensively; ms1 follows the remaining budget until the reset, says once
when its configured figure contradicts the announced policy, and shows the announcement
in its metrics. Against ms4-sim announcing a stricter limit than ms1 is configured for:
no 429."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pluggy
import pytest
from test_concurrency import start_service

from ms1.pipeline.sending.announced import Announced, read_announced
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Aborted, Pacer
from ms1_tools.sim import Ms4Sim, SimConfig


@pytest.mark.parametrize(("headers", "expected"), [
    ({"ratelimit-policy": '"default";q=120;w=60', "ratelimit": '"default";r=37;t=12'},
     Announced("draft", 120, 60.0, 37, 12.0)),
    ({"ratelimit-policy": '"burst";q=20;w=1, "day";q=1000;w=86400',
      "ratelimit": '"burst";r=15;t=1, "day";r=3;t=400'},
     Announced("draft", 1000, 86400.0, 3, 400.0)),  # the policy with the least left
    ({"ratelimit-limit": "120, 120;w=60", "ratelimit-remaining": "5",
      "ratelimit-reset": "30"}, Announced("ratelimit", 120, 60.0, 5, 30.0)),
    ({"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"},
     Announced("x-ratelimit", 60, None, 0, 2.0)),
])
def test_the_three_forms_are_read(headers: dict[str, str], expected: Announced) -> None:
    assert read_announced(headers) == expected


def test_a_unix_time_reset_is_read_as_seconds_from_now() -> None:
    found = read_announced({"x-ratelimit-remaining": "3",
                            "x-ratelimit-reset": str(int(time.time()) + 30)})
    assert found is not None and found.reset is not None and 28 <= found.reset <= 31


@pytest.mark.parametrize("headers", [
    {"ratelimit": '"default";r=lots;t=-3'},
    {"x-ratelimit-remaining": "-1", "x-ratelimit-reset": "nan"},
    {"x-ratelimit-limit": "\x1b[2J", "x-ratelimit-reset": "1e400"},
    {"ratelimit-policy": ";;;===", "ratelimit": ""},
    {},
])
def test_hostile_fields_are_ignored_not_errors(headers: dict[str, str]) -> None:
    assert read_announced(headers) is None


def test_the_pacer_holds_while_the_announced_budget_is_spent_until_it_resets(
        caplog: pytest.LogCaptureFixture) -> None:
    pacer = Pacer(SlidingWindowLimiter(120, 60.0), Breaker(5, 30))
    first = pacer.admit(threading.Event())
    second = pacer.admit(threading.Event())  # admitted before first's answer: not counted
    pacer.done(first, 202, headers={"x-ratelimit-remaining": "1",
                                    "x-ratelimit-reset": "0.4"})
    assert pacer.announced == Announced("x-ratelimit", None, None, 1, 0.4)
    abort = threading.Event()
    started = time.monotonic()
    third = pacer.admit(abort)  # 1 left, less `second`: wait for the reset
    waited = time.monotonic() - started
    assert 0.3 <= waited <= 1.0, waited
    assert pacer.held.snapshot()["rate_budget"] > 0.3
    pacer.done(second, 202)
    pacer.done(third, 202, headers={"ratelimit-policy": '"d";q=10;w=60',
                                    "ratelimit": '"d";r=9;t=60'})
    assert [r.message for r in caplog.records if "announces" in r.message] == [
        "MS4 announces a rate limit of 10 per 60 s (draft RateLimit fields); ms1 is "
        "configured for 120 per 60 s ([send] requests_per_minute, rate_window): ms1 "
        "follows the budget MS4 announces, but set those to MS4's figure"]
    pacer.done(pacer.admit(abort), 202, headers={"ratelimit-policy": '"d";q=10;w=60'})
    assert sum("announces" in r.message for r in caplog.records) == 1  # once per policy


@pytest.mark.slow
@pytest.mark.xdist_group("measure")
# not alone again: its 1 x 429 in 2 of ~10 busy CI runs was an answer overtaken on the
# way in (test_an_answer_overtaken_on_the_way_in_counts_the_request_that_overtook_it)
@pytest.mark.parametrize("form", ["draft", "x-ratelimit"])
def test_an_ms4_announcing_a_stricter_limit_draws_no_429(
        form: str, make_config: Any, pm: pluggy.PluginManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ms4-sim counts a fixed window of 30 per 3 s and says so; ms1 is configured for 60
    per 3 s (wrong): it follows the announced budget, 0 x 429, and warns once."""
    monkeypatch.setenv("MS1_MS4_API_KEY", "k")
    sim = Ms4Sim(SimConfig(api_key="k", rate_limit=30, window=3.0, limiter="fixed-window",
                           ratelimit_headers=form, latency=0.05,
                           retry_after_form="none")).start()
    config = make_config(f"[ms4]\ntransport = http\n[transport.http]\nbase_url = {sim.url}\n"
                         "[send]\nrequests_per_minute = 60\nrate_window = 3\n")
    invoices = 4_000  # 80 requests: three windows
    service, transport = start_service(pm, config, invoices, finite=True)
    try:
        deadline = time.monotonic() + 40
        while sim.stats()["unique_invoices_accepted"] < invoices:
            assert time.monotonic() < deadline, sim.stats()
            service.abort.wait(0.1)
        announced = service.pacer.announced
    finally:
        service.shutdown(5)
        transport.close()
        sim.stop()
    stats = sim.stats()
    print(f"\n{form}: {stats['requests_by_status']}, announced {announced}")
    assert stats["requests_by_status"].get("429", 0) == 0, stats
    assert announced is not None and announced.limit == 30


def test_a_hostile_reset_is_held_to_retry_after_max_and_silence_ends_the_budget() -> None:
    """An MS4 announcing 0 left for a day holds sending no longer than a Retry-After may
    (retry_after_max); an answer that announces nothing (the front taken out) ends the
    budget: before, ms1 held one request per window from then on."""
    pacer = Pacer(SlidingWindowLimiter(120, 60.0), Breaker(5, 30), retry_after_cap=0.3)
    first = pacer.admit(threading.Event())
    pacer.done(first, 202, headers={"x-ratelimit-remaining": "0",
                                    "x-ratelimit-reset": "86400"})
    started = time.monotonic()
    second = pacer.admit(threading.Event())
    assert 0.2 <= time.monotonic() - started <= 1.0
    pacer.done(second, 202, headers={"content-type": "application/json"})
    started = time.monotonic()
    for _ in range(5):  # no budget left to spend: the pace alone
        pacer.done(pacer.admit(threading.Event()), 202, headers={})
    assert time.monotonic() - started < 1.0  # a budget still held would wait 60 s


def test_senders_checking_the_last_of_the_budget_at_once_send_only_what_is_left() -> None:
    """Reproduces the CI failure of the announced-limit test (1 x 429): the budget was
    checked before the limiter and spent after it, so senders checking at once all saw
    the last request left and all went. Here eight senders reach the limiter together
    (a barrier holds them there while it can) with two requests left: two go."""
    gate = threading.Barrier(8, timeout=0.5)
    together = threading.Event()

    class Together(SlidingWindowLimiter):
        def acquire(self, ahead: float = 0.0) -> Any:
            if together.is_set():
                with contextlib.suppress(threading.BrokenBarrierError):
                    gate.wait()
            return super().acquire(ahead)

    pacer = Pacer(Together(1_000, 60.0), Breaker(5, 30))
    abort = threading.Event()
    pacer.done(pacer.admit(abort), 202, headers={"x-ratelimit-remaining": "2",
                                                 "x-ratelimit-reset": "30"})
    together.set()
    admitted: list[Any] = []

    def send() -> None:
        with contextlib.suppress(Aborted):
            admitted.append(pacer.admit(abort))

    senders = [threading.Thread(target=send) for _ in range(8)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 2.0
    while len(admitted) < 2 and time.monotonic() < deadline:
        abort.wait(0.02)
    abort.wait(0.7)  # the others held by the budget, not the barrier (broken by now)
    abort.set()
    for sender in senders:
        sender.join(2.0)
    assert len(admitted) == 2


def test_an_answer_overtaken_on_the_way_in_counts_the_request_that_overtook_it() -> None:
    """Reproduces the announced-limit test's 1 x 429 under load: A and B go together, B
    reaches MS4 first (MS4 counts B, then A), A's answer is handled first (1 left), then
    B's (2 left: A not counted in it). B's answer is the newest by admission, so it sets
    the budget — and A, no longer in flight, was not taken off it: 2 sent where 1 was
    left. Every request in flight when B was admitted may have reached MS4 after B."""
    pacer = Pacer(SlidingWindowLimiter(1_000, 60.0), Breaker(5, 30))
    abort = threading.Event()
    first = pacer.admit(abort)
    second = pacer.admit(abort)
    pacer.done(first, 202, headers={"x-ratelimit-remaining": "1",
                                    "x-ratelimit-reset": "30"})
    pacer.done(second, 202, headers={"x-ratelimit-remaining": "2",
                                     "x-ratelimit-reset": "30"})
    admitted = [pacer.admit(abort)]

    def one_more() -> None:
        with contextlib.suppress(Aborted):  # held until the abort: the budget is spent
            admitted.append(pacer.admit(abort))

    held = threading.Thread(target=one_more)
    held.start()
    held.join(0.6)  # held by the spent budget (or admitted at once: the defect)
    abort.set()
    held.join(2.0)
    assert len(admitted) == 1
