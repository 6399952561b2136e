"""This instance's part of the fleet (:mod:`ms1.ops.fleet`): :class:`Sampler` builds the
snapshot, :class:`Publisher` publishes it from a thread of its own and cross-checks the
others' figures (:func:`disagreements`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ms1 import __version__
from ms1.errors import Ms1Error
from ms1.ops.fleet import PUBLISH_INTERVAL, RATE_WINDOW, SCHEMA, SNAPSHOT_TTL, Fleet, instance_id
from ms1.ops.metrics import ServiceView, pipeline_threads
from ms1.pipeline.sending.limiter import effective_spacing
from ms1.pipeline.sending.pacer import HELD_CAUSES, Pacer
from ms1.redaction import redact

log = logging.getLogger("ms1.ops.fleet")


class RateMeter:
    """Rates of monotone counters over the last ``window`` seconds, from samples taken
    about once a second (:meth:`add`). Not thread-safe: one sampler thread."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, at: float, values: Mapping[str, float]) -> dict[str, float]:
        """Record ``values`` at time ``at`` (monotonic s); return each one's rate per
        second since the oldest sample within the window (0 before a second sample)."""
        self._samples.append((at, dict(values)))
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_at, first = self._samples[0]
        span = at - first_at
        if span <= 0:
            return dict.fromkeys(values, 0.0)
        return {key: max(0.0, (value - first.get(key, 0.0)) / span)
                for key, value in values.items()}


class Sampler:
    """Builds this instance's snapshot from a :class:`~ms1.ops.metrics.ServiceView` (the same
    read-only view ``/metrics`` reads). Called from the publisher thread only."""

    def __init__(self, view: ServiceView, *, label: str = "", id: str | None = None,
                 consumer: str | None = None, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.view = view
        self.label = label
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = id or instance_id(label, self.host, self.pid)
        self.started = wall()
        self.consumer = consumer
        self._meter = RateMeter(window)
        self._clock = clock
        self._wall = wall

    def sample(self) -> dict[str, Any]:
        view = self.view
        counters = view.counters()
        pacer = view.pacer
        held_seconds = pacer.held.snapshot()
        measured = {"emails_in": float(counters.get("emails_read", 0)),
                    "invoices_delivered": float(counters.get("invoices_delivered", 0)),
                    **{f"held:{cause}": held_seconds.get(cause, 0.0) for cause in HELD_CAUSES}}
        rates = self._meter.add(self._clock(), measured)
        stop = pacer.stop
        problem = view.health() if view.health is not None else \
            (None if view.alive() else "a pipeline thread is not running")
        concurrency = view.concurrency
        latency = concurrency.latency if concurrency is not None else None
        return {
            "schema": SCHEMA, "id": self.id, "label": self.label, "host": self.host,
            "pid": self.pid, "version": __version__, "started": self.started,
            "updated": self._wall(),
            "counters": dict(counters),
            "rates": {"window_s": self._meter.window,
                      "emails_in_per_s": round(rates["emails_in"], 3),
                      "invoices_delivered_per_s": round(rates["invoices_delivered"], 3)},
            "in_flight": view.in_flight() if view.in_flight is not None else 0,
            "concurrency_target": concurrency.target if concurrency is not None else None,
            "adaptive": concurrency.adaptive if concurrency is not None else None,
            "latency_s": None if latency is None else round(latency, 4),
            "held": {"pause_429_s": round(pacer.paused_for, 2),
                     "stop": None if stop is None else redact(stop.reason),
                     "stop_status": None if stop is None else stop.status,
                     "auth_blocked": pacer.auth_blocked,
                     "breaker": pacer.breaker.state,
                     "reason": _redacted(pacer.held_back())},
            "pace": _pace(pacer),
            "shares": {"limiter": pacer.limiter.shared_as, "limit": pacer.limiter.limit,
                       "window": pacer.limiter.window, "consumer": self.consumer},
            "held_seconds": {cause: round(held_seconds.get(cause, 0.0), 3)
                             for cause in HELD_CAUSES},
            "held_recent": {cause: round(rates[f"held:{cause}"], 3) for cause in HELD_CAUSES},
            "health": {"ok": problem is None, "problem": _redacted(problem),
                       "threads": pipeline_threads()},
        }


def _pace(pacer: Pacer) -> dict[str, Any]:
    """What the pace has learned of MS4's limiter, and what MS4 last announced."""
    shape = pacer.limiter.shape
    announced = pacer.announced
    return {"burst": None if shape is None else shape.burst,
            "spacing": None if shape is None else round(
                effective_spacing(shape, pacer.limiter.spacing_floor), 4),
            "announced": None if announced is None else announced.text()}


#: what moves with time alone (rates, seconds held: an idle sender is held by the empty
#: queue): a heartbeat carries them
_TIMELY = frozenset({"updated", "rates", "held_seconds", "held_recent"})


def disagreements(own: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> list[str]:
    """What this instance's snapshot ``own`` and the other live ones say that cannot both
    hold: the same shared rate limiter with other figures (the shared count then keeps
    neither limit: 429s), the same consumer name (each takes over the other's pending
    entries as its own: duplicates). Each problem in a line naming both instances."""
    mine = own.get("shares")
    if not isinstance(mine, Mapping):
        return []
    problems = []
    for other in others:
        theirs = other.get("shares")
        if other.get("id") == own.get("id") or not isinstance(theirs, Mapping):
            continue
        who = f"instances {own.get('id')} and {other.get('id')}"
        key = mine.get("limiter")
        if key is not None and theirs.get("limiter") == key and (
                (mine.get("limit"), mine.get("window"))
                != (theirs.get("limit"), theirs.get("window"))):
            problems.append(
                f"{who} share the rate limiter {key} with different figures: "
                f"{mine.get('limit')} per {mine.get('window')} s here, {theirs.get('limit')} "
                f"per {theirs.get('window')} s there; the shared count keeps neither (429s): "
                "give every instance the same [send] requests_per_minute and rate_window")
        consumer = mine.get("consumer")
        if consumer is not None and theirs.get("consumer") == consumer:
            problems.append(
                f"{who} both use the consumer name {consumer!r}: each takes the other's "
                "pending entries for its own (sent twice); give each instance its own "
                "[redis] consumer")
    return problems


def _settled(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot without what moves with time alone: equal while nothing happens."""
    return {key: value for key, value in sample.items() if key not in _TIMELY}


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact(text)


class Publisher:
    """Samples every ``interval`` seconds in the thread ``fleet-publisher`` and publishes
    to ``fleet`` what changed (else a heartbeat every ``ttl / 3`` s; after
    :attr:`quiet_after` unchanged samples it samples at that pace too); on :meth:`close` it
    takes the snapshot down (best effort). A failing fleet only makes it skip beats."""

    def __init__(self, fleet: Fleet, instance: str, sample: Callable[[], Mapping[str, Any]],
                 *, interval: float = PUBLISH_INTERVAL, ttl: float = SNAPSHOT_TTL) -> None:
        self.fleet = fleet
        self.instance = instance
        self._sample = sample
        self.interval = interval
        self.ttl = max(ttl, 3 * interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.published = 0
        self._last_sample: dict[str, Any] | None = None
        self._last_published = 0.0
        self._last_checked = 0.0
        self._said: set[str] = set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-publisher",
                                            daemon=True)
            self._thread.start()

    #: seconds :meth:`close` waits for the thread's last beat (at most)
    close_timeout = 0.5

    def close(self, timeout: float | None = None) -> None:
        """Stop publishing; waits at most ``timeout`` s (default :attr:`close_timeout`)
        for the thread (a call to a frozen backend is left behind: its snapshot then
        simply expires)."""
        if timeout is None:
            timeout = self.close_timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def publish_once(self) -> bool:
        """Sample and publish now: True if the snapshot went up."""
        return self._publish(self._sample())

    def _publish(self, sample: Mapping[str, Any]) -> bool:
        try:
            self.fleet.publish(self.instance, sample, self.ttl)
        except Exception as exc:  # Ms1Error (unreachable), or a plugin's bug: skip the beat
            if not self._failing:
                self._failing = True
                if isinstance(exc, Ms1Error):
                    log.warning("fleet %s: cannot publish this instance's state (%s); "
                                "trying again every %g s", self.fleet.name, exc, self.interval)
                else:
                    log.exception("fleet %s: publishing failed; trying again every %g s",
                                  self.fleet.name, self.interval)
            return False
        if self._failing:
            self._failing = False
            log.warning("fleet %s: publishing again", self.fleet.name)
        self.published += 1
        return True

    def beat(self) -> bool:
        """One turn of the thread: sample, and publish if the snapshot changed (what moves
        with time alone aside) or the last one is :attr:`heartbeat` seconds old: an idle
        instance costs Redis a write every few seconds, not every second. True if it went
        up."""
        sample = self._sample()
        now = time.monotonic()
        same = _settled(sample) == self._last_sample
        if same and now - self._last_published < self.heartbeat:
            return False
        if not self._publish(sample):
            return False
        self._last_sample = _settled(sample)
        self._last_published = now
        return True

    @property
    def heartbeat(self) -> float:
        """Seconds between two snapshots while nothing changes: a third of the time they
        live, so two may be lost before an idle instance vanishes."""
        return max(self.interval, self.ttl / 3)

    #: seconds between two cross-checks of this instance against the others (the first
    #: comes :attr:`first_check` s after the start, when the others have published)
    check_every = 15.0
    first_check = 10.0

    def cross_check(self) -> list[str]:
        """Compare this instance's last snapshot with every other live one
        (:func:`disagreements`); each new problem is one WARNING (said once per run).
        Returns the problems found now."""
        own = self._last_sample
        if own is None:
            return []
        try:
            others = self.fleet.snapshots()
        except Exception as exc:  # the fleet is down: publishing says so already
            log.debug("fleet %s: cross-check skipped: %s", self.fleet.name, exc)
            return []
        problems = disagreements({**own, "id": self.instance}, others)
        for problem in problems:
            if problem not in self._said:
                self._said.add(problem)
                log.warning("fleet: %s", redact(problem))
        return problems

    #: unchanged samples in a row after which the publisher samples only every
    #: :attr:`heartbeat` s (an idle instance wakes every few seconds, not every second; the
    #: first change after a quiet spell shows within a heartbeat)
    quiet_after = 3

    def _run(self) -> None:
        quiet = 0
        while True:
            started = time.monotonic()
            before = self._last_sample
            self.beat()  # (a heartbeat changes nothing: still quiet)
            quiet = quiet + 1 if before is not None and self._last_sample == before else 0
            if not self._last_checked:
                self._last_checked = started - self.check_every + self.first_check
            elif started - self._last_checked >= self.check_every:
                self._last_checked = started
                self.cross_check()
            pace = self.heartbeat if quiet >= self.quiet_after else self.interval
            if self._stop.wait(max(0.05, pace - (time.monotonic() - started))):
                break
        try:
            self.fleet.withdraw(self.instance)
        except Exception as exc:  # the snapshot expires by itself
            log.debug("fleet %s: withdraw failed: %s", self.fleet.name, exc)


__all__ = ["Publisher", "RateMeter", "Sampler", "disagreements"]
