"""Pacing: Retry-After parsing, the sliding-window limiter, the breaker, the pauses."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from ms1.pipeline.sending.answers import Kind, classify
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Aborted, Pacer
from ms1.pipeline.sending.retry_after import parse_retry_after

NOW = datetime(2026, 11, 23, 8, 0, 0, tzinfo=UTC)
IN_7 = NOW + timedelta(seconds=7)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (format_datetime(IN_7, usegmt=True), 7.0),                     # IMF-fixdate
        (IN_7.strftime("%A, %d-%b-%y %H:%M:%S GMT"), 7.0),             # RFC 850
        (IN_7.strftime("%a %b %d %H:%M:%S %Y").replace(" 0", "  "), 7.0),  # asctime
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # in the past
        ("-5", 3.0),                                                    # garbage: default
        ("1.5", 1.5),
        ("abc", 3.0),
        ("", 3.0),
        (None, 3.0),
        ("99999999", 120.0),                                            # clamped to the cap
        ("  12 ", 12.0),
        ("inf", 3.0),
        ("nan", 3.0),
        ("Sun, 31 Feb 2026 99:99:99 GMT", 3.0),
    ],
)
def test_retry_after_values(value: str | None, expected: float) -> None:
    got = parse_retry_after(value, default=3.0, cap=120.0, now=NOW)
    assert got == pytest.approx(expected)
    assert 0.0 <= got <= 120.0


def test_retry_after_asctime_is_taken_as_utc() -> None:
    # "Sun Nov  6 08:49:37 1994" parses naive; it must not be compared as local time
    base = datetime(1994, 11, 6, 8, 49, 30, tzinfo=UTC)
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", default=0, cap=60, now=base) == 7.0


def test_retry_after_default_and_cap_are_clamped_too() -> None:
    assert parse_retry_after("x", default=500, cap=10) == 10
    assert parse_retry_after("x", default=-1, cap=10) == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_never_exceeds_limit_in_any_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limit=10, window=6.0, clock=clock)
    rng = random.Random(7)
    sent: list[float] = []
    for _ in range(2000):
        clock.now += rng.uniform(0, 0.2)
        token, wait = limiter.try_acquire()
        if token is None:
            assert wait > 0
            continue
        sent.append(clock.now)
        clock.now += rng.uniform(0, 0.05)  # request duration
        limiter.finish(token)
    ends = sent
    # no window of 6 s (between request starts) holds more than 10
    j = 0
    for i, t in enumerate(ends):
        while ends[j] <= t - 6.0:
            j += 1
        assert i - j + 1 <= 10
    # and the limiter is not too shy: it used at least 90 % of the ceiling
    duration = ends[-1] - ends[0]
    assert len(ends) >= 0.9 * 10 * duration / 6.0


def test_slot_expires_a_window_after_the_request_finished() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limit=1, window=10.0, clock=clock)
    token, _ = limiter.try_acquire()
    assert token is not None
    clock.now += 3.0  # a slow request
    limiter.finish(token)
    clock.now += 9.0
    assert limiter.try_acquire() == (None, pytest.approx(1.0))
    clock.now += 1.0
    assert limiter.try_acquire()[0] is not None


def test_cancelled_slot_is_given_back() -> None:
    limiter = SlidingWindowLimiter(limit=1, window=60)
    token, _ = limiter.try_acquire()
    assert token is not None
    limiter.cancel(token)
    assert limiter.try_acquire()[0] is not None


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    breaker = Breaker(fail_max=3, reset_timeout=0.2)
    for _ in range(3):
        assert breaker.admit() == (True, 0.0)
        breaker.record(False)
    assert breaker.state == "open"
    allowed, wait = breaker.admit()
    assert not allowed and 0 < wait <= 0.2
    time.sleep(0.25)
    assert breaker.admit() == (True, 0.0)  # the probe
    assert breaker.admit()[0] is False      # only one probe at a time
    breaker.record(True)
    assert breaker.state == "closed"
    assert breaker.admit() == (True, 0.0)


def test_failed_probe_reopens() -> None:
    breaker = Breaker(fail_max=1, reset_timeout=0.05)
    breaker.admit()
    breaker.record(False)
    time.sleep(0.06)
    assert breaker.admit()[0]
    breaker.record(False)
    assert breaker.state == "open"


def test_success_resets_the_consecutive_count() -> None:
    breaker = Breaker(fail_max=3, reset_timeout=60)
    for ok in (False, False, True, False, False):
        breaker.admit()
        breaker.record(ok)
    assert breaker.state == "closed"


def test_breaker_does_not_serialise_concurrent_requests() -> None:
    """Four threads each doing slow 'I/O' between admit and record overlap fully."""
    breaker = Breaker(fail_max=5, reset_timeout=60)
    active = 0
    peak = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal active, peak
        for _ in range(3):
            assert breaker.admit()[0]
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.05)
            with lock:
                active -= 1
            breaker.record(True)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 4


def make_pacer(**kw) -> Pacer:
    return Pacer(SlidingWindowLimiter(1000, 60), Breaker(100, 60), **kw)


def test_429_pauses_every_caller() -> None:
    pacer = make_pacer(retry_after_default=5, retry_after_cap=0.3)
    abort = threading.Event()
    first = pacer.admit(abort)
    pacer.done(first, 429, "10")
    assert 0.25 < pacer.paused_for <= 0.3
    started = time.monotonic()
    times: list[float] = []

    def other() -> None:
        pacer.admit(abort)
        times.append(time.monotonic() - started)

    threads = [threading.Thread(target=other) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(times) == 3 and min(times) >= 0.25


def test_401_spell_blocks_until_key_changes() -> None:
    pacer = make_pacer(auth_probe_interval=3600)
    abort = threading.Event()
    pacer.done(pacer.admit(abort), 401)
    assert pacer.auth_blocked
    threading.Timer(0.2, abort.set).start()
    with pytest.raises(Aborted):
        pacer.admit(abort)  # blocked: no probe due for an hour
    abort.clear()
    pacer.key_changed(None)
    assert not pacer.auth_blocked
    pacer.admit(abort)


def test_401_spell_ends_when_a_probe_is_accepted() -> None:
    pacer = make_pacer(auth_probe_interval=0.1)
    abort = threading.Event()
    pacer.done(pacer.admit(abort), 401)
    started = time.monotonic()
    probe = pacer.admit(abort)
    assert probe.auth_probe and time.monotonic() - started >= 0.09
    pacer.done(probe, 202)
    assert not pacer.auth_blocked


def test_429_and_401_are_not_breaker_failures() -> None:
    pacer = Pacer(SlidingWindowLimiter(1000, 60), Breaker(2, 60), retry_after_cap=0,
                  auth_probe_interval=0)
    abort = threading.Event()
    for status in (429, 429, 429, 401, 401):
        pacer.done(pacer.admit(abort), status)
    assert pacer.breaker.state == "closed"
    for _ in range(2):
        pacer.done(pacer.admit(abort), 503)
    assert pacer.breaker.state == "open"


def test_a_401_for_a_request_sent_with_the_previous_key_starts_no_spell(caplog) -> None:
    """Key rotation: the key file is changed and reloaded, then MS4 switches. A 401 that
    answers a request admitted before the reload is about the old key: no spell, no
    CRITICAL line (issue 12: 62 s of silence at the prod probe interval)."""
    pacer = make_pacer(auth_probe_interval=3600)
    abort = threading.Event()
    in_flight = pacer.admit(abort)  # sent with the old key
    pacer.key_changed(None)         # SIGHUP with the new key
    with caplog.at_level("CRITICAL", logger="ms1.pipeline.sending.pacer"):
        pacer.done(in_flight, 401)
    assert not pacer.auth_blocked
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"]
    pacer.done(pacer.admit(abort), 401)  # the new key is refused too: that is a spell
    assert pacer.auth_blocked


def test_a_reload_during_a_probe_gives_one_critical_line_per_spell(caplog) -> None:
    pacer = make_pacer(auth_probe_interval=0.05)
    abort = threading.Event()
    with caplog.at_level("CRITICAL", logger="ms1.pipeline.sending.pacer"):
        pacer.done(pacer.admit(abort), 401)       # spell 1: CRITICAL
        probe = pacer.admit(abort)                # the probe goes out with the old key
        assert probe.auth_probe
        pacer.key_changed(None)                   # SIGHUP lands while it is in flight
        pacer.done(probe, 401)                    # the old key's answer: not a new spell
    assert not pacer.auth_blocked
    assert len([r for r in caplog.records if r.levelname == "CRITICAL"]) == 1


@pytest.mark.parametrize(("status", "kind"), [
    (202, Kind.ACCEPTED),
    (400, Kind.REFUSED), (413, Kind.REFUSED), (422, Kind.REFUSED),
    (401, Kind.UNAUTHORIZED), (403, Kind.UNAUTHORIZED),
    (301, Kind.MISCONFIGURED), (302, Kind.MISCONFIGURED), (307, Kind.MISCONFIGURED),
    (308, Kind.MISCONFIGURED), (404, Kind.MISCONFIGURED), (405, Kind.MISCONFIGURED),
    (200, Kind.MISCONFIGURED), (201, Kind.MISCONFIGURED), (204, Kind.MISCONFIGURED),
    (410, Kind.MISCONFIGURED), (418, Kind.MISCONFIGURED),
    (429, Kind.RATE_LIMITED),
    (408, Kind.RETRY), (409, Kind.RETRY), (500, Kind.RETRY), (503, Kind.RETRY),
    (599, Kind.RETRY), (101, Kind.RETRY), (None, Kind.RETRY),
])
def test_the_answer_table(status: int | None, kind: Kind) -> None:
    assert classify(status).kind is kind


def test_every_stopping_or_breaker_answer_is_paced_or_a_breaker_failure() -> None:
    """Nothing is resent at full rate: every answer but 202 and a refusal is either
    paced by the pacer (a stop, a 429) or a breaker failure."""
    for status in [None, *range(100, 600)]:
        kind = classify(status).kind
        assert kind in (Kind.ACCEPTED, Kind.REFUSED) or kind.paced or kind.breaker_failure


def test_403_stops_every_sender_with_its_own_critical_line(caplog) -> None:
    pacer = make_pacer(auth_probe_interval=3600)
    abort = threading.Event()
    with caplog.at_level("CRITICAL", logger="ms1.pipeline.sending.pacer"):
        in_flight = [pacer.admit(abort) for _ in range(3)]  # 3 senders, all answered 403
        for admission in in_flight:
            pacer.done(admission, 403, detail="key lacks metadata:write")
    assert pacer.auth_blocked and pacer.stop is not None and pacer.stop.status == 403
    assert "403" in pacer.stop.reason
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert "403 Forbidden" in line and "lacks the right" in line
    assert pacer.breaker.state == "closed"
    threading.Timer(0.2, abort.set).start()
    with pytest.raises(Aborted):
        pacer.admit(abort)  # stopped: no probe due for an hour
    abort.clear()
    pacer.key_changed(None)  # a reloaded key ends it
    assert pacer.stop is None
    pacer.admit(abort)


@pytest.mark.parametrize("status", [302, 404, 405, 200, 418])
def test_a_configuration_error_stops_every_sender_and_probes_every_breaker_reset(
        status: int, caplog) -> None:
    pacer = Pacer(SlidingWindowLimiter(1000, 60), Breaker(100, 0.2))
    abort = threading.Event()
    with caplog.at_level("CRITICAL", logger="ms1.pipeline.sending.pacer"):
        for admission in [pacer.admit(abort) for _ in range(4)]:
            pacer.done(admission, status, detail="Location: http://elsewhere/")
    stop = pacer.stop
    assert stop is not None and stop.status == status and not pacer.auth_blocked
    assert "[transport.http] base_url" in stop.reason and str(status) in stop.reason
    assert pacer.held_back() == stop.reason
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert "[transport.http] base_url" in line and "Location: http://elsewhere/" in line
    pacer.key_changed(None)  # the key is not the cause: the stop stays
    assert pacer.stop is stop
    started = time.monotonic()
    probe = pacer.admit(abort)  # one probe after breaker_reset
    assert probe.auth_probe and time.monotonic() - started >= 0.15
    pacer.done(probe, status)
    assert pacer.stop is stop
    probe = pacer.admit(abort)
    assert pacer.done(probe, 202).kind is Kind.ACCEPTED
    assert pacer.stop is None and pacer.held_back() is None
    assert pacer.breaker.state == "closed"


def test_a_probe_answered_403_during_a_401_stop_turns_it_into_a_403_stop(caplog) -> None:
    pacer = make_pacer(auth_probe_interval=0.05)
    abort = threading.Event()
    with caplog.at_level("CRITICAL", logger="ms1.pipeline.sending.pacer"):
        pacer.done(pacer.admit(abort), 401)
        pacer.done(pacer.admit(abort), 403)  # the probe (the key is known now)
    assert pacer.stop is not None and pacer.stop.status == 403
    assert len([r for r in caplog.records if r.levelname == "CRITICAL"]) == 2


@pytest.mark.parametrize("status", [408, 409, 500, None])
def test_408_409_5xx_and_no_answer_are_breaker_failures_named_when_it_opens(
        status: int | None, caplog) -> None:
    pacer = Pacer(SlidingWindowLimiter(1000, 60), Breaker(2, 60))
    abort = threading.Event()
    with caplog.at_level("ERROR", logger="ms1.pipeline.sending.breaker"):
        for _ in range(2):
            pacer.done(pacer.admit(abort), status)
    assert pacer.breaker.state == "open" and pacer.stop is None
    if status is None:  # no answer: what "MS4 is failing" says by itself
        assert pacer.held_back() == "circuit breaker open: MS4 is failing"
        return
    name = classify(status).name
    assert pacer.held_back() == f"circuit breaker open: MS4 is failing ({name})"
    assert f"(last: {name})" in caplog.text
