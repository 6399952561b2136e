"""Stage 4: sending — everything between a queued batch and MS4's answer.

* :mod:`~.sender` — the sender threads: **where a batch gets acked** (202),
  split (400/413) or retried;
* :mod:`~.refusals` — which objects a refusal (400/422) names, so that only
  those are dead-lettered and the rest is sent in one request;
* :mod:`~.pacer` — the :class:`~.pacer.Pacer` every sender asks
  before a request: rate limit, 429 pause, 401 spell, circuit breaker;
* :mod:`~.limiter` — the sliding-window rate limiter contract and the
  in-process one;
* :mod:`~.breaker` — the circuit breaker (pybreaker, no lock across I/O);
* :mod:`~.retry_after` — ``Retry-After`` parsing.
"""
