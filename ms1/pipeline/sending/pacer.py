"""The pacer: whether and when the senders may send — shared by every sender thread.

:class:`Pacer` holds the four things that can hold a request back:

More: docs/internals.md, ``ms1.pipeline.sending.pacer``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ms1.config import Secret
from ms1.errors import Ms1Error
from ms1.heartbeat import Outage
from ms1.pipeline.sending import shape as shapes
from ms1.pipeline.sending.announced import Announced, read_announced
from ms1.pipeline.sending.answers import Answer, Kind, classify
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import Grant, RateLimiter
from ms1.pipeline.sending.retry_after import parse_retry_after

log = logging.getLogger(__name__)


class Aborted(Exception):
    """The shutdown deadline passed while waiting for permission to send."""


class Left(Exception):
    """The caller's ``leave()`` said to stop waiting for permission (a fragment to park
    while a refusal storm holds sending)."""


#: why senders were held back (``ms1_held_back_seconds_total{cause=...}``): the rate
#: limiter's budget, a 429 pause, a 401/403 stop, another stop (configuration error), an
#: open breaker, the rate limiter unreachable, and (counted by the senders) nothing to send
HELD_CAUSES = ("rate_budget", "429_pause", "401_spell", "stop", "breaker_open",
               "limiter_down", "empty_queue")


class HeldTime:
    """Seconds senders spent held back, by cause (summed over senders: sender-seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(HELD_CAUSES, 0.0)

    def add(self, cause: str, seconds: float) -> None:
        with self._lock:
            self._seconds[cause] = self._seconds.get(cause, 0.0) + max(0.0, seconds)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


#: the senders' delays from a grant to the request being out that the jitter is read
#: from (the spread between their 5th and 95th percentile), how often it is read, and
#: the fewest it is read from
JITTER_SAMPLES = 64
JITTER_EVERY = 8
JITTER_LEAST = 32

#: where MS4 counts a request against its limit (``[send] ms4_counts_at``)
COUNTS_AT = ("arrival", "answer")


@dataclass(frozen=True)
class PacerSettings:
    """The ``[send]`` options the pacer (with its limiter and breaker) runs by: read in one
    place, for the start and for a reload (:meth:`Pacer.configure` takes a whole set)."""

    limit: int = 120
    window: float = 60.0
    retry_after_default: float = 0.0
    retry_after_cap: float = 300.0
    auth_probe_interval: float = 60.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0
    counts_at: str = "arrival"
    count_margin: float = 0.1



class Admission:
    """Permission for one request; hand it back to :meth:`Pacer.done`."""

    __slots__ = ("auth_probe", "grant", "granted", "key_generation", "margin_generation",
                 "overtaken", "seq", "token")

    def __init__(self, token: str, auth_probe: bool, key_generation: int = 0,
                 grant: Grant | None = None, margin_generation: int = 0) -> None:
        self.token = token
        self.auth_probe = auth_probe
        #: which API key was current when the request was admitted (see key_changed)
        self.key_generation = key_generation
        #: what the limiter said of the slot (its level on the pace, the window's fill)
        self.grant = grant if grant is not None else Grant(token)
        #: the count margin's widenings before the admission (one per spell of 429s)
        self.margin_generation = margin_generation
        #: when the limiter granted it (``time.monotonic()``)
        self.granted = time.monotonic()
        #: its place among the pacer's admissions (an announced budget is the newest's)
        self.seq = 0
        #: requests still in flight when it was admitted: any may reach MS4 after it
        self.overtaken = 0


@dataclass(frozen=True)
class Stop:
    """Every sender is stopped by ``answer`` (401, 403 or a configuration error);
    ``reason`` says so for ``/readyz`` and the watchdog."""

    answer: Answer
    reason: str
    detail: str = ""
    #: a refusal storm (:meth:`Pacer.refusal`): MS4 refuses every batch, naming nothing
    storm: bool = False

    @property
    def status(self) -> int | None:
        return self.answer.status

    @property
    def needs_restart(self) -> bool:
        """No answer for a reason on ms1's side that only a configuration change and a
        restart end (TLS: MS4's certificate not trusted by ``ca_file``, the handshake
        refused). Not an answer MS4 or a front gave (a 404 or a redirect while MS4 is
        redeployed, a refused key, a storm): a probe may end those."""
        return self.answer.status is None and self.answer.kind is Kind.MISCONFIGURED \
            and not self.storm


def _stop_texts(answer: Answer, detail: str, interval: float) -> tuple[str, str]:
    """(the CRITICAL line, the readiness reason) of a stop by ``answer``."""
    said = f"MS4 answered {answer.name}" + (f" ({detail})" if detail else "")
    kept = "All senders stopped; every batch stays queued"
    if answer.status == 401:
        return (f"MS4 answered 401 Unauthorized: the API key is rejected. {kept}. Fix the key "
                f"and reload (SIGHUP); a probe is sent every {interval:.0f} s",
                "paused: MS4 rejects the API key (401); fix the key and reload")
    if answer.status == 403:
        return (f"{said}: the API key is known but lacks the right to post metadata. {kept}. "
                f"Give the key that right at MS4, or put a key that has it in place and reload "
                f"(SIGHUP); a probe is sent every {interval:.0f} s",
                "paused: MS4 refuses the API key the right to post (403 Forbidden); fix the "
                "key's rights or load another key and reload")
    if answer.status is None:  # no answer, for a reason only a configuration change ends
        return (f"cannot talk to MS4: {detail}. {kept}. Fix [transport.http] and restart; "
                f"a probe is sent every {interval:.0f} s ([send] breaker_reset)",
                f"stopped: {detail} (a probe every {interval:.0f} s)")
    return (f"unexpected answer from MS4: {said.removeprefix('MS4 answered ')}, which is not "
            f"in MS4's contract: is [transport.http] base_url right (ms1 follows no "
            f"redirect)? {kept}. Fix base_url and restart; a probe is sent every "
            f"{interval:.0f} s ([send] breaker_reset)",
            f"stopped: MS4 answered {answer.name}, not MS4's contract: is [transport.http] "
            f"base_url right? (a probe every {interval:.0f} s)")


#: halves of refused batches remembered as such (:meth:`Pacer.split_for_refusal`)
FRAGMENTS_KEPT = 10_000


class Pacer:
    """Decides when the next request may go; told every outcome. Shared by all senders."""

    def __init__(
        self, limiter: RateLimiter, breaker: Breaker, *,
        retry_after_default: float = PacerSettings.retry_after_default,
        retry_after_cap: float = PacerSettings.retry_after_cap,
        auth_probe_interval: float = PacerSettings.auth_probe_interval,
        counts_at: str = PacerSettings.counts_at,
        count_margin: float = PacerSettings.count_margin,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if counts_at not in COUNTS_AT:
            raise ValueError(f"counts_at must be one of {COUNTS_AT}")
        self.limiter = limiter
        self.breaker = breaker
        self.retry_after_default = retry_after_default
        self.retry_after_cap = retry_after_cap
        self.auth_probe_interval = auth_probe_interval
        self.counts_at = counts_at
        self.count_margin = count_margin
        self._clock = clock
        self._margin = count_margin  # in effect: count_margin, widened by unexpected 429s
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._stop: Stop | None = None
        self._auth_probe_in_flight = False  # a stop's probe (the name is historical)
        self._next_auth_probe = 0.0
        #: the rate limiter, as the senders see it (``/readyz``; one line each way)
        self.limiter_outage = Outage("the rate limiter", logger=log)
        self._key_generation = 0
        self._margin_generation = 0
        #: what MS4 last announced of its limit (RateLimit fields), and the budget left
        #: from it: requests ms1 may send until ``_budget_until``; None: not announced
        self._announced: Announced | None = None
        self._budget: int | None = None
        self._budget_until = 0.0
        self._budget_seq = -1
        self._seq = 0
        self._in_flight: set[int] = set()  # the seqs of admissions not yet done
        self._budget_generation = 0  # +1 each time a budget is announced or renewed
        self._contradicted: tuple[int | None, float | None] | None = None
        self._delays: deque[float] = deque(maxlen=JITTER_SAMPLES)
        self._delays_seen = 0
        #: seconds senders were held back, by cause (ms1_held_back_seconds_total)
        self.held = HeldTime()
        #: refusals naming no invoice since MS4 last accepted a request (:meth:`refusal`),
        #: and the ids of the halves of batches split for one (at most FRAGMENTS_KEPT)
        self._unexplained = 0
        self._fragments: OrderedDict[str, str] = OrderedDict()  # half's id -> its root's
        #: the batches (roots: a half counts as the batch first split) refused naming
        #: nothing since MS4 last accepted a request or named an invoice
        self._streak_roots: set[str] = set()

    # state, for status/metrics/readiness
    @property
    def margin(self) -> float:
        """Seconds added to a request's out time to stamp its slot (``ms4_counts_at =
        arrival``): ``count_margin``, or more after 429s the limiter did not foresee."""
        with self._lock:
            return self._margin

    @property
    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self._clock())

    @property
    def auth_blocked(self) -> bool:
        """Stopped because MS4 refuses the API key (401 or 403)."""
        with self._lock:
            return self._stop is not None and self._stop.answer.kind is Kind.UNAUTHORIZED

    @property
    def stop(self) -> Stop | None:
        """The stop every sender is held in (401, 403, a configuration error), or None."""
        with self._lock:
            return self._stop

    @property
    def in_storm(self) -> bool:
        """Stopped by a refusal storm (MS4 refusing every request, naming nothing)."""
        with self._lock:
            return self._stop is not None and self._stop.storm

    def is_fragment(self, batch_id: str) -> bool:
        """Whether ``batch_id`` is a half of a batch split after a refusal (the last
        FRAGMENTS_KEPT of them)."""
        with self._lock:
            return batch_id in self._fragments

    def holding(self) -> bool:
        """True while a stop, an open breaker or a 429 pause holds every sender back (what
        :meth:`held_back` names, without building the text)."""
        return self.stop is not None or self.breaker.state == "open" or self.paused_for > 0

    def held_back(self) -> str | None:
        """Why every sender is held back now (a stop, an open breaker, a 429 pause), or
        None: the rate limit is then all that paces them."""
        stop = self.stop
        if stop is not None:
            return stop.reason
        if self.breaker.state == "open":
            last = self.breaker.last_failure
            return "circuit breaker open: MS4 is failing" + (f" ({last})" if last else "")
        paused = self.paused_for
        if paused > 0:
            return f"paused by a 429 ({paused:.0f} s left)"
        return None

    def admit(self, abort: threading.Event, ahead: float = 0.0,
              leave: Callable[[], bool] | None = None) -> Admission:
        """Block until a request may be sent; raise :class:`Aborted` if ``abort`` is set,
        :class:`Left` if ``leave()`` turns true between waits. Each wait is counted in
        :attr:`held` under its cause. ``ahead``: how far the limiter's
        :attr:`~ms1.pipeline.sending.limiter.RateLimiter.free_hint` looks ahead."""
        while True:
            if abort.is_set():
                raise Aborted
            if leave is not None and leave():
                raise Left
            wait = self._gate()
            if wait > 0:
                self._hold(abort, wait, "429_pause")
                continue
            wait, budget = self._take_budget()
            if wait > 0:
                self._hold(abort, wait, "rate_budget")
                continue
            try:
                with self.limiter_outage.calling():
                    grant, wait = self.limiter.acquire(ahead)
            except Ms1Error as exc:
                self._return_budget(budget)
                # fail closed: without the shared count we cannot know we are under the limit
                self.limiter_outage.failed("rate limiter unavailable (%s): not sending until "
                                           "it is back", exc)
                self._hold(abort, 0.5, "limiter_down")
                continue
            self.limiter_outage.answered("rate limiter available again")
            if grant is None:
                self._return_budget(budget)
                self._hold(abort, wait, "rate_budget")
                continue
            token = grant.token
            probe, wait = self._claim_auth()
            if wait > 0:
                self._return_budget(budget)
                with contextlib.suppress(Ms1Error):
                    self.limiter.cancel(token)
                self._hold(abort, wait, self._stop_cause())
                continue
            allowed, wait = self.breaker.admit()
            if not allowed:
                self._return_budget(budget)
                self._release_auth(probe)
                with contextlib.suppress(Ms1Error):
                    self.limiter.cancel(token)
                self._hold(abort, wait, "breaker_open")
                continue
            with self._lock:
                generation, margins = self._key_generation, self._margin_generation
                self._seq += 1
                admission = Admission(token, probe, generation, grant, margins)
                admission.seq, admission.overtaken = self._seq, len(self._in_flight)
                self._in_flight.add(self._seq)
                if self._budget is not None and budget != self._budget_generation:
                    self._budget -= 1  # announced since the take, without this request
            return admission

    def _hold(self, abort: threading.Event, wait: float, cause: str) -> None:
        """Wait (at most 0.5 s, or until ``abort``) and count the time under ``cause``."""
        started = time.monotonic()
        abort.wait(min(wait, 0.5))
        self.held.add(cause, time.monotonic() - started)

    def _stop_cause(self) -> str:
        """The cause :meth:`_claim_auth` made a sender wait for: a 429 pause or a stop."""
        with self._lock:
            if self._paused_until > self._clock():
                return "429_pause"
            stop = self._stop
        if stop is not None and stop.answer.kind is Kind.UNAUTHORIZED:
            return "401_spell"
        return "stop"

    def _gate(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self._clock())

    def _claim_auth(self) -> tuple[bool, float]:
        with self._lock:
            if self._paused_until > self._clock():
                return False, self._paused_until - self._clock()
            if self._stop is None:
                return False, 0.0
            now = self._clock()
            if self._auth_probe_in_flight or now < self._next_auth_probe:
                return False, max(0.05, self._next_auth_probe - now)
            self._auth_probe_in_flight = True
            self._next_auth_probe = now + self._probe_interval(self._stop.answer)
            return True, 0.0

    def _probe_interval(self, answer: Answer) -> float:
        if answer.kind is Kind.UNAUTHORIZED:
            return self.auth_probe_interval
        return self.breaker.reset_timeout

    def _release_auth(self, probe: bool) -> None:
        if probe:
            with self._lock:
                self._auth_probe_in_flight = False

    def done(self, admission: Admission, status: int | None,
             retry_after: str | None = None, detail: str = "",
             sent: float | None = None, headers: Mapping[str, str] | None = None,
             misconfigured: str = "") -> Answer:
        """Record the outcome of an admitted request (``status`` None: no answer) and return
        its row of the answer table. ``detail``: what to quote of the answer in an alert
        (a 3xx's ``Location``, MS4's text); ``sent``: when the request was out
        (``time.monotonic()``; None: unknown — the slot is then stamped now); ``headers``:
        the answer's (lower-case keys), for the RateLimit fields MS4 may announce;
        ``misconfigured``: no answer, and why none can come until the configuration changes
        (a certificate the TLS handshake refused): a stop, as for a 404."""
        if headers is not None:
            announced = read_announced(headers)
            if announced is not None:
                self._follow(admission, announced)
            elif status is not None:
                self._unannounced(admission)
        with self._lock:
            self._in_flight.discard(admission.seq)
        ago = 0.0
        arrival = self.counts_at == "arrival"
        if sent is not None:
            self._note_delay(sent - admission.granted)
        if sent is not None and arrival:
            # MS4 counted it by sent + margin; if it answered, before it answered: by now
            # at the latest (no answer — a timeout, a reset — says nothing of when)
            ago = time.monotonic() - sent - self.margin
            if status is not None:
                ago = max(0.0, ago)
        try:
            self.limiter.finish(admission.token, ago)
        except Ms1Error as exc:  # the slot then expires with its lease
            log.warning("could not stamp the rate-limit slot (%s)", exc)
        self._release_auth(admission.auth_probe)
        answer = classify(status)
        if misconfigured:
            answer, detail = Answer(None, Kind.MISCONFIGURED), misconfigured
        kind = answer.kind
        if kind.breaker_failure:  # named when the breaker opens, if MS4 answered at all
            self.breaker.record(False, answer.name if status is not None else "")
        elif kind is Kind.RATE_LIMITED:
            self.breaker.release_probe()  # not a breaker failure
            self._pause(retry_after)
            self._rate_limited(admission, arrival)
        elif kind.stops_senders:
            self.breaker.release_probe()  # the stop paces: not a breaker failure
            self._stopped(answer, admission, detail)
        else:
            self.breaker.record(True)
            if kind is Kind.ACCEPTED:
                self._accepted(admission.grant)
                with self._lock:
                    self._unexplained = 0
                    self._streak_roots.clear()
        if status is not None and admission.auth_probe:
            self._probe_answered(answer)
        return answer

    @property
    def announced(self) -> Announced | None:
        """What MS4 last announced of its limit (RateLimit fields), or None."""
        with self._lock:
            return self._announced

    def _take_budget(self) -> tuple[float, int]:
        """Take one request from MS4's announced budget: ``(0.0, generation)``, or the
        seconds to wait while it is spent, until it resets (then one request goes, whose
        answer announces the next). Taken and spent under one lock: senders checking at
        once cannot all see the last request left. A budget announced between the take
        and the admission does not count the request yet: :meth:`admit` spends it from
        that one too; :meth:`_return_budget` gives it back if it is not sent."""
        with self._lock:
            if self._budget is None:
                return 0.0, self._budget_generation
            now = self._clock()
            if now >= self._budget_until:
                self._budget, self._budget_until = 1, now + self.limiter.window
                self._budget_generation += 1
            if self._budget <= 0:
                return self._budget_until - now, self._budget_generation
            self._budget -= 1
            return 0.0, self._budget_generation

    def _return_budget(self, generation: int) -> None:
        """A request taken from the budget ``generation`` was not sent (the limiter, the
        breaker or the key held it back)."""
        with self._lock:
            if self._budget is not None and generation == self._budget_generation:
                self._budget += 1

    def _unannounced(self, admission: Admission) -> None:
        """An answer newer than the budget's announces nothing: MS4 stopped announcing
        (a front taken out, a new version); the budget is forgotten, the pace alone
        paces."""
        with self._lock:
            if self._budget is not None and admission.seq > self._budget_seq:
                self._budget = None

    def _follow(self, admission: Admission, announced: Announced) -> None:
        """MS4 announced its limit in an answer: follow its remaining budget until the
        reset (the newest answer's; the requests admitted after this one may not be
        counted in it yet, so they are spent from it), and say once when the configured
        figure contradicts the announced policy."""
        with self._lock:
            self._announced = announced
            if announced.remaining is not None and admission.seq >= self._budget_seq:
                self._budget_seq = admission.seq
                # not counted in it yet, at most: every request admitted after this one,
                # and those in flight when it was admitted (one may have reached MS4 after
                # it, and be answered already: still not counted in this answer)
                uncounted = self._seq - admission.seq + admission.overtaken
                self._budget = announced.remaining - uncounted
                self._budget_generation += 1
                reset = announced.reset if announced.reset is not None else \
                    self.limiter.window / self.limiter.limit
                if announced.reset is not None and float(announced.reset).is_integer():
                    reset += 1.0  # whole seconds, maybe rounded down: the window may end later
                # a reset is held to retry_after_max, as a Retry-After is
                self._budget_until = self._clock() + min(reset, self.retry_after_cap)
            policy = (announced.limit, announced.window)
            if announced.limit is None or policy == self._contradicted:
                return
            limit, window = self.limiter.limit, self.limiter.window
            same = (announced.limit == limit if announced.window is None
                    else announced.limit / announced.window == limit / window)
            if same:
                return
            self._contradicted = policy
        log.warning("MS4 announces a rate limit of %s (%s RateLimit fields); ms1 is configured "
                    "for %d per %g s ([send] requests_per_minute, rate_window): ms1 follows "
                    "the budget MS4 announces, but set those to MS4's figure",
                    f"{announced.limit}" + (f" per {announced.window:g} s"
                                            if announced.window is not None else ""),
                    announced.source, limit, window)

    def _note_delay(self, delay: float) -> None:
        """A request was out ``delay`` s after its grant. The spread of these delays is
        jitter the senders add between the pace and MS4: the pace keeps at least that
        much spacing (:attr:`RateLimiter.spacing_floor`), so two requests granted one
        interval apart never arrive closer than the rate."""
        with self._lock:
            self._delays.append(delay)
            self._delays_seen += 1
            if self._delays_seen % JITTER_EVERY or len(self._delays) < JITTER_LEAST:
                return
            delays = sorted(self._delays)
        spread = delays[len(delays) * 19 // 20] - delays[len(delays) // 20]
        limiter = self.limiter
        limiter.spacing_floor = min(shapes.MAX_SPACING,
                                    max(0.0, spread) / (limiter.window / limiter.limit))

    def _accepted(self, grant: Grant) -> None:
        """A 202: the pace's allowance grows if the request used all of it."""
        shape = self.limiter.shape
        level, epoch = grant.level, grant.epoch
        if shape is None or level is None or epoch is None or epoch != shape.epoch or \
                not shapes.full_use(shape, level):
            return
        limit = self.limiter.limit
        try:
            self.limiter.learn(lambda now: shapes.accepted(now, level, epoch, limit))
        except Ms1Error as exc:
            log.debug("could not store the learned rate-limit shape (%s)", exc)

    def _rate_limited(self, admission: Admission, arrival: bool) -> None:
        """A 429 although the limiter let the request go. Sent as part of a burst, MS4's
        limiter allows smaller bursts: the allowance is cut. Sent at the steady pace, MS4
        counts more than the rate: the spacing widens. Either way, if the window was
        (nearly) full, MS4 may count requests later than ms1 stamps them: the count
        margin widens too (its cost is bounded by the latency: a slot is never stamped
        past its answer). Once per spell each."""
        grant = admission.grant
        if grant.level is None or grant.epoch is None:  # no shaping: the window is all
            if arrival:
                self._widen_margin(admission.margin_generation)
            return
        level, epoch = grant.level, grant.epoch
        if arrival and grant.fill is not None and grant.fill >= shapes.WINDOW_FULL:
            # sent while the window was (nearly) full: MS4 may count late too
            self._widen_margin(admission.margin_generation)
        before = self.limiter.shape
        try:
            after = self.limiter.learn(lambda now: shapes.refused(now, level, epoch))
        except Ms1Error as exc:
            log.warning("could not store the learned rate-limit shape (%s)", exc)
            return
        if after is None or before is None or after.epoch == before.epoch:
            return
        if after.spacing <= before.spacing:
            log.warning("MS4 answered 429 to a request sent %.0f ahead of the steady pace: "
                        "its rate limiter allows smaller bursts than ms1 sent. ms1 now sends "
                        "at most %.0f at once, then one every %.3f s (learned: [send] "
                        "rate_shape)", level, after.burst, self._interval(after))
        else:
            log.warning("MS4 answered 429 to a request sent at the steady pace: its rate "
                        "limiter allows no burst, and requests came too close. ms1 now "
                        "spaces them %.3f s apart (%.0f %% under the rate; learned: [send] "
                        "rate_shape)", self._interval(after), after.spacing * 100)

    def _interval(self, shape: shapes.Shape) -> float:
        return self.limiter.window / self.limiter.limit * (1 + shape.spacing)

    def _default_pause(self) -> float:
        """The pause of a 429 without Retry-After: ``retry_after_default`` when set, else
        one emission interval plus up to half of one more, at random (the limiter in
        front of MS4 frees its next slot within about one interval; the jitter keeps
        instances from coming back together)."""
        if self.retry_after_default > 0:
            return self.retry_after_default
        shape = self.limiter.shape
        step = self._interval(shape) if shape is not None else \
            self.limiter.window / self.limiter.limit
        return step * (1 + random.uniform(0, 0.5))

    def _pause(self, retry_after: str | None) -> None:
        """Pause every sender until ``Retry-After`` (a later end than the running pause's
        extends it)."""
        delay = parse_retry_after(retry_after, default=self._default_pause(),
                                  cap=self.retry_after_cap)
        with self._lock:
            now = self._clock()
            until = now + delay
            if until > self._paused_until:
                self._paused_until = until
                log.warning("MS4 answered 429: all senders pause %.1f s (Retry-After: %r)",
                            delay, retry_after)

    def _widen_margin(self, generation: int) -> None:
        """MS4 answered 429 although the limiter let the request go: MS4 counted one of the
        window's earlier requests later than out + margin (a loaded MS4 reading requests
        late), or something else spends the key's budget. Double the margin (once per spell: a
        429 of a request admitted before the last widening widens nothing), up to the
        window: a margin too wide costs little, since a slot is never
        stamped later than its answer came — at worst the share of ``ms4_counts_at =
        answer``. It holds until a restart or a reload that changes ``count_margin`` or
        ``ms4_counts_at``."""
        with self._lock:
            window = self.limiter.window
            if self._margin >= window or generation != self._margin_generation:
                return  # another 429 of the same spell widened it already
            self._margin_generation += 1
            was = self._margin
            self._margin = min(window, max(2 * was, 0.05))
            margin = self._margin
        log.warning("MS4 answered 429 although ms1's rate limiter allowed the request: MS4 "
                    "counts requests later than %.2f s after they are out, or another client "
                    "spends the same key's budget. Slots are now stamped %.2f s after their "
                    "request was out (at most when the answer came) until a restart; to keep "
                    "it, set [send] count_margin = %.2f (or ms4_counts_at = answer)",
                    was, margin, margin)

    def _stopped(self, answer: Answer, admission: Admission, detail: str) -> None:
        """Begin a stop (once per spell: an answer of the same stop changes nothing; a
        probe answered with another stopping status replaces it, with its own alert)."""
        with self._lock:
            if answer.kind is Kind.UNAUTHORIZED and \
                    admission.key_generation != self._key_generation:
                # sent with a key that has been replaced since: says nothing of the new one
                log.warning("MS4 answered %s to a request sent with the previous API key; "
                            "the batch is sent again with the current key", answer.name)
                return
            current = self._stop
            if current is not None and (current.status == answer.status
                                        or not admission.auth_probe):
                return
            interval = self._probe_interval(answer)
            alert, reason = _stop_texts(answer, detail, interval)
            self._stop = Stop(answer, reason, detail)
            self._next_auth_probe = self._clock() + interval
        log.critical("%s", alert)

    def refusal(self, status: int, detail: str, *, named: bool, batch_id: str = "",
                single: bool = False, attempt: int = 1) -> bool:
        """A batch was refused (400, 413, 422); ``named``: the answer named the invoices it
        refuses. True if the refusal may be trusted as being about that batch's content
        (split it, dead-letter a lone invoice); False to send it again unchanged.

        Trusted: a refusal naming invoices (MS4 speaking of them; it ends a storm), and any
        refusal outside a *refusal storm*. A storm is ``breaker_failures`` batches refused
        in a row naming nothing, with no acceptance between — halves of a batch being
        searched for its refused invoice (:meth:`split_for_refusal`) not counted: a front's
        error page (nginx's 400 for a missing client certificate), an MS4 refusing
        everything for a while, which no invoice caused. Every sender then stops, as for a
        configuration error (CRITICAL once, ``/readyz`` names it), one probe goes every
        ``breaker_reset`` s, nothing is split or dead-lettered, and the first acceptance
        (or a refusal naming invoices) ends it. A storm so costs about ``breaker_failures``
        + its length / ``breaker_reset`` requests and its batches go out whole afterwards
        (those split before it was known are merged again: :mod:`ms1.pipeline.sending.fragments`).

        A lone invoice (``single``) refused naming nothing while batches of two or more
        roots were refused so since the last acceptance is not trusted either, for its
        first ``breaker_failures`` attempts: a storm being recognised, not proof against
        the invoice (before, a search that reached one invoice first dead-lettered it)."""
        storm: Stop | None = None
        with self._lock:
            stop = self._stop
            in_storm = stop is not None and stop.storm
            threshold = max(2, self.breaker.fail_max)
            ended = named and in_storm
            trusted = named or not in_storm
            if named:
                self._unexplained = 0
                self._streak_roots.clear()
                if in_storm:
                    self._stop = None
            else:
                self._streak_roots.add(self._fragments.get(batch_id, batch_id))
                if single and len(self._streak_roots) > 1 and attempt <= threshold:
                    trusted = False
            if not named and not in_storm and batch_id not in self._fragments:
                self._unexplained += 1
                if self._unexplained >= threshold and stop is None:
                    interval = self.breaker.reset_timeout
                    answer = Answer(status, Kind.REFUSED)
                    said = f"{answer.name}" + (f" ({detail[:300]})" if detail else "")
                    self._stop = storm = Stop(
                        answer, f"stopped: MS4 refuses every batch ({self._unexplained} in a "
                        f"row, naming no invoice: {said}); a probe every {interval:.0f} s",
                        detail, storm=True)
                    self._next_auth_probe = self._clock() + interval
        if ended:
            log.warning("MS4 names the invoices it refuses again: the refusal storm is over, "
                        "sending resumes")
        if storm is not None:
            log.critical(
                "MS4 refused %d batches in a row, naming no invoice, and accepted none (%s): "
                "no invoice causes that (a front's error page, an MS4 fault), so nothing more "
                "is split or dead-lettered. All senders stopped; every batch stays queued; a "
                "probe is sent every %.0f s ([send] breaker_reset) and the first acceptance "
                "ends it", threshold, storm.detail[:300] or storm.answer.name,
                self.breaker.reset_timeout)
        return trusted

    def split_for_refusal(self, parts: Sequence[str], parent: str = "") -> None:
        """The ids of the halves of batch ``parent`` split after a trusted refusal: their
        own refusals continue that search (:meth:`refusal`). Without ``parent`` each part
        is a root of its own (a batch merged of halves)."""
        with self._lock:
            for part in parts:
                self._fragments[part] = self._fragments.get(parent, parent) if parent \
                    else part
            while len(self._fragments) > FRAGMENTS_KEPT:
                self._fragments.popitem(last=False)

    def _probe_answered(self, answer: Answer) -> None:
        """A stop's probe got an answer of another kind: the stop ends; that answer's own
        row (202, a breaker failure, a 429 pause...) takes over."""
        with self._lock:
            stop = self._stop
            if stop is None or answer.kind.stops_senders or (
                    stop.storm and answer.kind is Kind.REFUSED):
                return  # (a storm ends with an acceptance, or a refusal naming invoices)
            self._stop = None
        if stop.answer.kind is Kind.UNAUTHORIZED:
            log.warning("MS4 accepts the API key again (a probe was answered %s): sending "
                        "resumes", answer.name)
        else:
            log.warning("MS4 answers again (a probe was answered %s, not %s): sending resumes",
                        answer.name, stop.answer.name)

    def configure(self, settings: PacerSettings) -> None:
        """New ``[send]`` figures (the start, a reload), for the pacer, its limiter and its
        breaker; they hold from the next request or answer on. A running 429 pause or a
        stop's probe interval keeps the end it was given; a margin widened by 429s stays
        unless ``count_margin`` or ``ms4_counts_at`` changes."""
        if settings.counts_at not in COUNTS_AT:
            raise ValueError(f"counts_at must be one of {COUNTS_AT}")
        with self._lock:
            self.retry_after_default = settings.retry_after_default
            self.retry_after_cap = settings.retry_after_cap
            self.auth_probe_interval = settings.auth_probe_interval
            if (settings.count_margin, settings.counts_at) != (self.count_margin,
                                                                self.counts_at):
                self._margin = settings.count_margin  # a widened margin is forgotten
            self.counts_at = settings.counts_at
            self.count_margin = settings.count_margin
        self.limiter.configure(settings.limit, settings.window)
        self.breaker.configure(settings.breaker_failures, settings.breaker_reset)

    def key_changed(self, api_key: Secret | None) -> None:
        """A new API key was loaded: end a 401/403 stop at once (a stop for a configuration
        error stays: the key is not its cause). A 401 or 403 answering a request admitted
        before this call is about the old key and starts no stop (key rotation: the key
        file is reloaded before MS4 switches, or while a probe is in flight)."""
        with self._lock:
            was = self._stop is not None and self._stop.answer.kind is Kind.UNAUTHORIZED
            if was:
                self._stop = None
                self._auth_probe_in_flight = False
            self._key_generation += 1
        if was:
            log.warning("API key reloaded: sending resumes")
