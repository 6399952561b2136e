"""ms4-sim's rate-limiter shapes (issue 20): each counts as the server it stands for —
nginx's limit_req, HAProxy's http_req_rate, a token bucket, a fixed window, the sliding
log — checked on a clock the test moves, then over HTTP: the shape, a 429 without
Retry-After, and the RateLimit header fields."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_sim import api_client, make_sim, obj

from ms1_tools.sim import Ms4Sim, SimConfig
from ms1_tools.sim_limits import Limiter

__all__ = ["make_sim"]  # the fixture, shared with test_sim


def passes(limiter: Limiter, times: list[float]) -> list[bool]:
    return [limiter.admit(t).ok for t in times]


def test_sliding_log_allows_the_whole_window_at_once_then_nothing_until_it_slides() -> None:
    limiter = Limiter("sliding-log", 3, 1.0)
    assert passes(limiter, [0, 0, 0, 0.5, 0.99, 1.0, 1.0, 1.0, 1.0]) == \
        [True, True, True, False, False, True, True, True, False]


def test_leaky_bucket_without_burst_is_nginx_limit_req_one_per_interval() -> None:
    limiter = Limiter("leaky-bucket", 2, 1.0)  # rate=2r/s, no burst: one per 0.5 s
    assert passes(limiter, [0, 0.0, 0.3, 0.5, 0.99, 1.0, 1.499, 1.5]) == \
        [True, False, False, True, False, True, False, True]
    refused = limiter.admit(1.6)
    assert not refused.ok and refused.retry_after == pytest.approx(0.4)


def test_leaky_bucket_burst_lets_that_many_more_go_at_once() -> None:
    limiter = Limiter("leaky-bucket", 2, 1.0, burst=3)
    assert passes(limiter, [0, 0, 0, 0, 0]) == [True, True, True, True, False]
    assert passes(limiter, [0.5, 0.6]) == [True, False]  # drained by one


def test_token_bucket_spends_its_burst_then_refills_at_the_rate() -> None:
    limiter = Limiter("token-bucket", 10, 1.0, burst=3)  # 10 a second, 3 at once
    assert passes(limiter, [0, 0, 0, 0]) == [True, True, True, False]
    assert passes(limiter, [0.1, 0.15, 0.2]) == [True, False, True]
    verdict = limiter.admit(0.2)
    assert not verdict.ok and verdict.remaining == 0 and verdict.retry_after == \
        pytest.approx(0.1)


def test_fixed_window_resets_at_its_boundary() -> None:
    limiter = Limiter("fixed-window", 2, 1.0)
    assert passes(limiter, [0, 0.9, 0.95, 1.0, 1.0, 1.01]) == \
        [True, True, False, True, True, False]
    assert limiter.admit(1.5).reset == pytest.approx(0.5)


def test_sliding_counter_weighs_the_previous_period_and_counts_denied_requests() -> None:
    # HAProxy's http_req_rate(1s) gt 4: previous period's count weighted by what is left
    plain = Limiter("sliding-counter", 4, 1.0)
    assert passes(plain, [0, 0, 0, 0, 0]) == [True, True, True, True, False]
    assert passes(plain, [1.25, 1.25]) == [True, False]  # 0+1 + 4*0.75 = 4, then 5
    assert passes(plain, [1.5, 1.5]) == [True, False]  # 1+1 + 4*0.5 = 4, then 5
    counting = Limiter("sliding-counter", 4, 1.0, count_denied=True)
    assert passes(counting, [0, 0, 0, 0, 0, 0]) == [True, True, True, True, False, False]
    # the two refused ones count: 1 + 6*0.75 = 5.5 > 4 (without them: 1 + 3 = 4)
    assert passes(counting, [1.25]) == [False]
    assert passes(counting, [1.5]) == [False]  # 2 + 6*0.5 = 5: refused, and counted
    assert passes(counting, [1.75]) == [False]  # 3 + 6*0.25 = 4.5


def test_an_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="limiter must be one of"):
        SimConfig(limiter="guess")


def test_a_429_without_retry_after_and_the_draft_ratelimit_fields(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=2, window=60.0, limiter="fixed-window",
                   retry_after_form="none", ratelimit_headers="draft")
    with api_client(sim) as c:
        first = c.post("/metadata", json=obj("A"))
        assert first.status_code == 202
        assert first.headers["ratelimit-policy"] == '"default";q=2;w=60'
        assert first.headers["ratelimit"].startswith('"default";r=1;t=')
        assert c.post("/metadata", json=obj("B")).headers["ratelimit"].startswith(
            '"default";r=0;t=')
        refused = c.post("/metadata", json=obj("C"))
        assert refused.status_code == 429
        assert "retry-after" not in refused.headers
        assert refused.headers["ratelimit"].startswith('"default";r=0;t=')


def test_x_ratelimit_fields_and_the_shape_set_at_runtime(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=0)
    sim.control(rate_limit=4, window=1.0, limiter="leaky-bucket", burst=1,
                ratelimit_headers="x-ratelimit")
    with api_client(sim) as c:
        codes = [c.post("/metadata", json=obj(f"X{i}")) for i in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[0].headers["x-ratelimit-limit"] == "4"
    assert codes[1].headers["x-ratelimit-remaining"] == "0"
    assert codes[2].headers["retry-after"] == "1"  # whole seconds, at least 1


def test_the_cli_takes_the_shape_options() -> None:
    from ms1_tools.sim import _build_parser
    args = _build_parser().parse_args(
        ["--limiter", "sliding-counter", "--count-denied", "--burst", "5",
         "--ratelimit-headers", "x-ratelimit", "--retry-after-form", "none"])
    assert (args.limiter, args.count_denied, args.burst, args.ratelimit_headers,
            args.retry_after_form) == ("sliding-counter", True, 5, "x-ratelimit", "none")
