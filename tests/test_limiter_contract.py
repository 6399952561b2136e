"""The rate limiter's contract (issue 13), run over the in-process limiter and the Redis
one (a real redis-server): a slot stamped ``ago`` seconds back leaves the window that much
sooner, and a grant's ``free_hint`` counts the slots free now and those leaving the
window within ``ahead`` seconds. Then the pacer: where it stamps a slot for each
``[send] ms4_counts_at``."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
from test_pacing import FakeClock

from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import RateLimiter, SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Pacer, PacerSettings
from plugins.redis.limiter import RedisRateLimiter
from plugins.redis.link import RedisLink

WINDOW = 1.0


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> Iterator[RateLimiter]:
    if request.param == "memory":
        yield SlidingWindowLimiter(3, WINDOW)
        return
    url = request.getfixturevalue("redis_url")
    key = f"t:contract:{time.monotonic_ns()}"
    redis_limiter = RedisRateLimiter(RedisLink(url).use(), key=key, limit=3, window=WINDOW,
                                     lease=30)
    yield redis_limiter
    redis_limiter.close()


def take(limiter: RateLimiter, ahead: float = 0.0) -> str:
    token, wait = limiter.try_acquire(ahead)
    assert token is not None, f"refused, wait {wait}"
    return token


def test_a_slot_stamped_in_the_past_leaves_the_window_that_much_sooner(
        limiter: RateLimiter) -> None:
    for _ in range(3):
        limiter.finish(take(limiter), ago=0.8)  # counted 0.8 s ago: 0.2 s left
    token, wait = limiter.try_acquire()
    assert token is None and 0.05 < wait <= 0.25
    deadline = time.monotonic() + 2
    while (token := limiter.try_acquire()[0]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert time.monotonic() < deadline - 2 + 0.6  # well before a whole window


def test_a_slot_stamped_ahead_stays_a_margin_longer(limiter: RateLimiter) -> None:
    for _ in range(3):
        limiter.finish(take(limiter), ago=-0.5)  # the margin: counted up to 0.5 s ahead
    token, wait = limiter.try_acquire()
    assert token is None and wait > WINDOW + 0.3


def test_free_hint_counts_free_slots_and_those_leaving_within_ahead(
        limiter: RateLimiter) -> None:
    a = take(limiter)
    assert limiter.free_hint == 2  # three slots, one taken now
    b = take(limiter)
    assert limiter.free_hint == 1
    limiter.finish(a, ago=0.8)  # leaves the window in 0.2 s
    limiter.finish(b, ago=0.3)  # leaves in 0.7 s
    c = take(limiter, ahead=0.5)
    assert limiter.free_hint == 1  # none free now, `a` leaves within 0.5 s
    assert limiter.try_acquire()[0] is None
    limiter.cancel(c)
    take(limiter, ahead=1.0)
    assert limiter.free_hint == 2  # none free now, `a` and `b` leave within 1 s
    assert limiter.try_acquire()[0] is None  # full


def test_in_flight_slots_never_count_as_leaving(limiter: RateLimiter) -> None:
    take(limiter)  # in flight: it leaves only once stamped
    take(limiter, ahead=10.0)
    assert limiter.free_hint == 1


# --- the pacer: where a slot is stamped ---------------------------------------------------


class Recording(SlidingWindowLimiter):
    def __init__(self) -> None:
        super().__init__(1000, 60)
        self.stamped: list[float] = []

    def finish(self, token: str, ago: float = 0.0) -> None:
        self.stamped.append(ago)
        super().finish(token, ago)


@pytest.mark.parametrize(("counts_at", "sent_ago", "expected"), [
    ("arrival", 2.0, 1.9),   # out 2 s ago, + count_margin 0.1
    ("arrival", None, 0.0),  # the transport does not say: now
    ("answer", 2.0, 0.0),    # MS4 counts as it answers: now
])
def test_the_pacer_stamps_where_ms4_counts(counts_at: str, sent_ago: float | None,
                                           expected: float) -> None:
    limiter = Recording()
    pacer = Pacer(limiter, Breaker(5, 30), counts_at=counts_at, count_margin=0.1)
    admission = pacer.admit(threading.Event())
    sent = None if sent_ago is None else time.monotonic() - sent_ago
    pacer.done(admission, 202, sent=sent)
    assert limiter.stamped == [pytest.approx(expected, abs=0.05)]


def test_the_pacer_refuses_an_unknown_counting_point() -> None:
    with pytest.raises(ValueError):
        Pacer(SlidingWindowLimiter(1, 1), Breaker(5, 30), counts_at="whenever")


def test_the_pacer_never_stamps_a_slot_later_than_the_answer() -> None:
    """MS4 counts a request before it answers it: a margin longer than the request took
    stamps the slot when the answer came, not in the future (which held the slot longer
    than MS4 does)."""
    limiter = Recording()
    pacer = Pacer(limiter, Breaker(5, 30), counts_at="arrival", count_margin=0.5)
    pacer.done(pacer.admit(threading.Event()), 202, sent=time.monotonic() - 0.1)
    assert limiter.stamped == [pytest.approx(0.0, abs=0.05)]  # old: -0.4, 0.4 s ahead
    # no answer (a reset just after the request was out): MS4 may count it later still
    pacer.done(pacer.admit(threading.Event()), None, sent=time.monotonic() - 0.1)
    assert limiter.stamped[-1] == pytest.approx(-0.4, abs=0.05)


def answered(pacer: Pacer, status: int, sent_ago: float = 0.0) -> None:
    pacer.done(pacer.admit(threading.Event()), status, retry_after="0",
               sent=time.monotonic() - sent_ago)


def test_a_429_the_limiter_did_not_foresee_widens_the_margin_once_per_pause(
        caplog: pytest.LogCaptureFixture) -> None:
    """A 429 although the limiter let the request go: MS4 counted an earlier request later
    than out + margin. The margin doubles — once per 429 pause: the other 429s of a burst
    answer requests that were in flight with the first — up to the window."""
    clock = FakeClock()
    limiter = Recording()  # 1000 per 60 s: the limiter never refuses here
    pacer = Pacer(limiter, Breaker(5, 30), counts_at="arrival", count_margin=0.1,
                  clock=clock)
    in_flight = [pacer.admit(threading.Event()) for _ in range(3)]
    assert pacer.margin == 0.1
    pacer.done(in_flight[0], 202, sent=time.monotonic())
    assert pacer.margin == 0.1
    pacer.done(in_flight[1], 429, retry_after="2", sent=time.monotonic())
    assert pacer.margin == pytest.approx(0.2)
    assert "count_margin = 0.20" in caplog.text
    pacer.done(in_flight[2], 429, retry_after="2", sent=time.monotonic())  # same burst
    assert pacer.margin == pytest.approx(0.2)
    clock.now += 2.5  # the pause is over: a new 429 is new evidence
    answered(pacer, 429)
    assert pacer.margin == pytest.approx(0.4)
    answered(pacer, 202, sent_ago=1.0)  # stamped out + the margin in effect
    assert limiter.stamped[-1] == pytest.approx(0.6, abs=0.05)
    for _ in range(20):
        answered(pacer, 429)  # Retry-After 0: no pause, each one counts
    assert pacer.margin == 60  # never past the window


def test_the_margin_is_not_widened_when_ms4_counts_at_the_answer() -> None:
    clock = FakeClock()
    pacer = Pacer(Recording(), Breaker(5, 30), counts_at="answer", count_margin=0.1,
                  clock=clock)
    answered(pacer, 429)
    assert pacer.margin == 0.1


def test_a_widened_margin_outlives_a_reload_unless_the_reload_sets_it() -> None:
    clock = FakeClock()
    pacer = Pacer(Recording(), Breaker(5, 30), counts_at="arrival", count_margin=0.1,
                  clock=clock)
    answered(pacer, 429)
    assert pacer.margin == pytest.approx(0.2)
    same = PacerSettings(limit=1000, window=60, count_margin=0.1)
    pacer.configure(same)  # a reload for another reason (a key rotation, say)
    assert pacer.margin == pytest.approx(0.2)
    pacer.configure(dataclasses.replace(same, count_margin=0.3))
    assert pacer.margin == pytest.approx(0.3)
    answered(pacer, 429)  # a new margin starts a new count
    assert pacer.margin == pytest.approx(0.6)
