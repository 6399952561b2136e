"""``ms1-service --config F top``: the overview of every running instance, live in the
terminal, refreshed every ``--interval`` seconds (default 1) until Ctrl-C.

More: docs/internals.md, ``ms1.cli.top``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Any

import pluggy
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ms1.config import Config
from ms1.errors import ConfigError
from ms1.heartbeat import call_within
from ms1.ops.fleet import RATE_WINDOW, SNAPSHOT_TTL
from ms1.ops.logs import escape_controls
from ms1.ops.overview import (
    CAUSE_NAMES,
    LetterCounts,
    format_rate,
    format_seconds,
    gather,
)
from ms1.redaction import redact
from ms1.runtime import pluginmanager, settings
from ms1.runtime.components import C, Closable

log = logging.getLogger(__name__)

EXIT_OK = 0
#: ``--once`` stopped by a signal before its reading came (128 + SIGINT)
EXIT_INTERRUPTED = 128 + signal.SIGINT
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.1
#: a reading older than this many intervals is marked as such on screen
STALE_INTERVALS = 3
#: seconds closing the parts may take at exit (a frozen Redis does not hold the exit)
CLOSE_TIMEOUT = 0.3
#: log records held while the screen is drawn, written out at the end (the last ones)
HELD_RECORDS = 100
#: width of a frame printed where the width is unknown (a pipe, ``$COLUMNS`` unset)
PIPE_WIDTH = 140


def run(config: Config, pm: pluggy.PluginManager, *, interval: float = DEFAULT_INTERVAL,
        once: bool = False, as_json: bool = False) -> int:
    """The ``top`` command; returns the exit status."""
    if not interval >= MIN_INTERVAL:
        raise ConfigError(f"top: --interval must be at least {MIN_INTERVAL:g} seconds, got "
                          f"{interval:g}")
    parts = Parts(config, pm)
    stop = threading.Event()
    poller = Poller(parts.read, interval, stop)
    try:
        with _until_signal(stop, poller.wake):
            poller.start()
            if once or as_json:
                reading = poller.first(stop)
                if reading is None:
                    return EXIT_INTERRUPTED
                if as_json:
                    print(json.dumps(reading.overview, indent=2, default=str), flush=True)
                else:
                    _console().print(frame(reading.overview, config=config.path))
                return EXIT_OK
            console = _console()
            if console.is_terminal:
                with _logs_held():
                    _live(console, poller, stop, config.path, interval)
            else:
                _batch(console, poller, stop, config.path, interval)
            return EXIT_OK
    finally:
        stop.set()
        parts.close()


class Parts:
    """What top reads, built from the config as ``status`` builds it: the outbound queue,
    the fleet (``[fleet] backend``; ``auto`` by the queue built), the source and the dead
    letters."""

    def __init__(self, config: Config, pm: pluggy.PluginManager) -> None:
        self.ceiling = settings.ceiling(config)
        self._built: list[Closable] = []
        try:
            self.queue = self._keep(pluginmanager.build_queue(pm, config))
            self.fleet = self._keep(pluginmanager.build_fleet(pm, config, self.queue.name))
            self.source = self._keep(pluginmanager.build_source(pm, config))
            self.dead_letters = self._keep(pluginmanager.build_dead_letters(pm, config))
            # the letters themselves are read again only when their count changed
            self.letter_counts = LetterCounts(self.dead_letters)
        except BaseException:
            self.close()
            raise

    def _keep(self, part: C) -> C:
        self._built.append(part)
        return part

    def read(self) -> dict[str, Any]:
        """One overview (I/O: Redis); a part that cannot be read is in its ``errors``."""
        return gather(self.fleet, ceiling=self.ceiling, source=self.source, queue=self.queue,
                      dead_letters=self.letter_counts)

    def close(self) -> None:
        """Close every part, within :data:`CLOSE_TIMEOUT` s all together."""
        built, self._built = self._built, []

        def close_all() -> None:
            for part in reversed(built):
                try:
                    part.close()
                except Exception:
                    log.debug("closing %s failed", type(part).__name__, exc_info=True)

        with contextlib.suppress(TimeoutError):  # nothing is held: top only reads
            call_within(close_all, CLOSE_TIMEOUT, "closing top's connections")


class Reading:
    """An overview and when it was read (``time.monotonic()``)."""

    def __init__(self, overview: dict[str, Any], at: float) -> None:
        self.overview = overview
        self.at = at


class Poller:
    """Reads the overview every ``interval`` s in the thread ``top-reader``; the latest
    reading is :attr:`latest`. A failure of the reading itself (a bug, not an unreachable
    part: those are in the overview's ``errors``) is kept in the next reading's errors."""

    def __init__(self, read: Callable[[], dict[str, Any]], interval: float,
                 stop: threading.Event) -> None:
        self._read = read
        self.interval = interval
        self._stop = stop
        #: set by each new reading (and by a stop): the screen is drawn again
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._latest: Reading | None = None

    @property
    def latest(self) -> Reading | None:
        with self._lock:
            return self._latest

    def start(self) -> None:
        threading.Thread(target=self._loop, name="top-reader", daemon=True).start()

    def first(self, stop: threading.Event) -> Reading | None:
        """Wait for the first reading; None if ``stop`` came first."""
        while not stop.is_set():
            reading = self.latest
            if reading is not None:
                return reading
            self.wake.wait(0.1)
            self.wake.clear()
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                overview = self._read()
            except Exception as exc:
                log.debug("top: reading the overview failed", exc_info=True)
                overview = {"errors": {"overview": redact(f"{type(exc).__name__}: {exc}")}}
            with self._lock:
                self._latest = Reading(overview, time.monotonic())
            self.wake.set()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


@contextmanager
def _until_signal(stop: threading.Event, wake: threading.Event) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM set ``stop`` (and ``wake``) instead of raising: the
    screen is left in order, no traceback is printed."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _console() -> Console:
    """Stdout; where its width is unknown (a pipe), :data:`PIPE_WIDTH` or ``$COLUMNS``."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _age(reading: Reading | None, interval: float) -> float | None:
    """How old ``reading`` is, when older than :data:`STALE_INTERVALS` intervals."""
    if reading is None:
        return None
    age = time.monotonic() - reading.at
    return age if age > STALE_INTERVALS * interval + 0.5 else None


def _live(console: Console, poller: Poller, stop: threading.Event, path: str,
          interval: float) -> None:
    """Draw on the alternate screen until ``stop``: at each reading, and each interval."""
    with Live(console=console, screen=True, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while not stop.is_set():
            reading = poller.latest
            live.update(_screen(reading, path, interval), refresh=True)
            poller.wake.wait(interval)
            poller.wake.clear()


def _batch(console: Console, poller: Poller, stop: threading.Event, path: str,
           interval: float) -> None:
    """Not a terminal: a frame per reading, one after the other, until ``stop``."""
    shown: Reading | None = None
    while not stop.is_set():
        reading = poller.latest
        if reading is not None and reading is not shown:
            console.print(_screen(reading, path, interval))
            console.print()
            shown = reading
        poller.wake.wait(interval)
        poller.wake.clear()


def _screen(reading: Reading | None, path: str, interval: float) -> RenderableType:
    if reading is None:
        return Text(f"ms1 top  {path}  reading...  (Ctrl-C quits)")
    return frame(reading.overview, config=path, interval=interval,
                 stale_s=_age(reading, interval))


@contextmanager
def _logs_held() -> Iterator[None]:
    """While the screen is drawn: log records are held (the last :data:`HELD_RECORDS`),
    then written by the handlers they would have gone to."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    held = _Held()
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(held)
    try:
        yield
    finally:
        root.removeHandler(held)
        for handler in handlers:
            root.addHandler(handler)
        if held.dropped:
            log.warning("top: %d earlier log records were dropped while the screen was "
                        "drawn", held.dropped)
        for record in held.records:
            root.handle(record)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: deque[logging.LogRecord] = deque(maxlen=HELD_RECORDS)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) == self.records.maxlen:
            self.dropped += 1
        self.records.append(record)


# --- the frame -------------------------------------------------------------------------


def frame(overview: Mapping[str, Any], *, config: str = "", interval: float | None = None,
          stale_s: float | None = None) -> RenderableType:
    """One screen of ``overview`` (:func:`ms1.ops.overview.collect`'s structure): its sections
    in the order and with the figures of the web console's overview page."""
    at = overview.get("at")
    when = datetime.fromtimestamp(at).strftime("%H:%M:%S") if isinstance(at, int | float) \
        else "-"
    every = f"  every {interval:g} s" if interval is not None else ""
    quit_hint = "  (Ctrl-C quits)" if interval is not None else ""
    parts: list[RenderableType] = [
        Text.assemble(("ms1 top", "bold"), f"  {config}  read at {when}{every}{quit_hint}"),
    ]
    errors = dict(overview.get("errors") or {})
    if stale_s is not None:
        errors["reading"] = (f"this reading is {stale_s:.0f} s old: still waiting for an "
                             "answer (Redis?)")
    if errors:
        parts.append(Text("\n".join(f"cannot read {part}: {escape_controls(str(text))}"
                                    for part, text in errors.items()), style="bold red"))
    parts += [_cards(overview), _held(overview), _backlog(overview), _totals(overview)]
    letters = _dead_letters(overview)
    if letters is not None:
        parts.append(letters)
    parts.append(_instances(overview))
    return Group(*parts)


def _table(title: str, *columns: str, numeric: Sequence[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(escape(column), justify="right" if column in numeric else "left")
    return table


def _text(value: object, style: str = "") -> Text:
    """A value from the overview as shown: control characters escaped, and as text, never
    read as rich markup (it comes from Redis: "[/x]" would raise, "[item]" vanish)."""
    return Text(escape_controls(str(value)), style=style)


def _cards(o: Mapping[str, Any]) -> Table:
    t = o.get("totals") or {}
    ceiling = o.get("ceiling") or {}
    letters = o.get("dead_letters")
    columns = ("e-mails in/s", "invoices delivered/s", "requests in flight",
               "backlog drains in", "dead letters", "instances")
    table = _table("Now", *columns, numeric=columns)
    instances, healthy = int(t.get("instances") or 0), int(t.get("healthy") or 0)
    table.add_row(
        format_rate(float(t.get("emails_in_per_s") or 0)),
        f"{format_rate(float(t.get('invoices_delivered_per_s') or 0))} (ceiling "
        f"{format_rate(float(ceiling.get('invoices_per_s') or 0))})",
        f"{t.get('in_flight') or 0} of {t.get('concurrency_target') or 0}",
        format_seconds(o.get("drain_s")),
        Text(str(letters.get("count")) if letters else "?",
             style="yellow" if letters and letters.get("count") else ""),
        Text(f"{instances} ({healthy} healthy)",
             style="red" if instances != healthy else ""))
    return table


def _held(o: Mapping[str, Any]) -> RenderableType:
    held = o.get("held") or {}
    instances = (o.get("totals") or {}).get("instances")
    now = held.get("now") or []
    head: RenderableType
    if now:
        causes_now = _table("What holds sending back", "cause", "instances", "detail")
        for h in now:
            causes_now.add_row(_text(h.get("name"), "red"),
                               _text(", ".join(h.get("instances") or [])),
                               _text(h.get("detail")))
        head = causes_now
    else:
        paced = "; MS4's rate budget paces them" if instances else ""
        head = Text.assemble(("What holds sending back\n", "bold"),
                             f"Nothing holds every sender back: no 429 pause, no 401/403 "
                             f"spell, no open breaker{paced}.")
    recent = held.get("recent") or {}
    if not recent:
        return head
    causes = list(recent)
    names = [CAUSE_NAMES.get(cause, cause) for cause in causes]
    table = _table("", "sender-seconds held back by", *names, numeric=names)
    table.title = None
    table.columns[0].no_wrap = True
    table.add_row(f"per second, last {RATE_WINDOW:g} s",
                  *(format_rate(float(recent[c] or 0)) for c in causes))
    seconds = held.get("seconds") or {}
    table.add_row("in all", *(f"{float(seconds.get(c) or 0):.1f}" for c in causes))
    return Group(head, table)


def _backlog(o: Mapping[str, Any]) -> Group:
    ceiling = o.get("ceiling") or {}
    table = _table("Backlog", "stream", "name", "waiting", "requests", "drains in",
                   numeric=("waiting", "requests", "drains in"))
    for s in o.get("streams") or []:
        detail = s.get("detail") or {}
        waiting = f"{s.get('backlog')} {s.get('unit')}"
        if s.get("name") == "outbound" and s.get("invoices") is not None:
            waiting += f" ({s['invoices']} invoices)"
        table.add_row(_text(s.get("name")), _text(detail.get("stream")
                                                  or detail.get("backend") or ""),
                      waiting, str(s.get("batches")), format_seconds(s.get("drain_s")))
    if not o.get("streams"):
        return Group(Text("Backlog", style="bold"),
                     Text("no stream to read (a files or memory source, or unreachable)"))
    return Group(table, Text(f"At MS4's ceiling, {ceiling.get('text', '?')}, one request "
                             f"per batch of up to {ceiling.get('max_items', '?')} invoices.",
                             style="dim"))


def _totals(o: Mapping[str, Any]) -> Table:
    t = o.get("totals") or {}
    columns = ("e-mails read", "invoices delivered", "dead-lettered", "requests to MS4")
    table = _table("Totals of the running instances", *columns, "by status",
                   numeric=columns)
    statuses = "  ".join(f"{status}: {n}" for status, n in
                         (t.get("requests_by_status") or {}).items())
    table.add_row(str(t.get("emails_read") or 0), str(t.get("invoices_delivered") or 0),
                  str(t.get("dead_lettered") or 0), str(t.get("requests") or 0),
                  statuses or "-")
    return table


def _dead_letters(o: Mapping[str, Any]) -> RenderableType | None:
    letters = o.get("dead_letters")
    if not letters:
        return None
    stages = _table("Dead letters", "stage", "letters", numeric=("letters",))
    for stage, n in (letters.get("by_stage") or {}).items():
        stages.add_row(_text(stage), str(n))
    reasons = _table(" ", "reason", "letters", numeric=("letters",))
    for reason, n in letters.get("by_reason") or []:
        reasons.add_row(_text(reason), str(n))
    side = Table.grid(padding=(0, 4))
    side.add_row(stages, reasons)
    if letters.get("complete", True):
        return side
    return Group(side, Text(f"Counted over the oldest {letters.get('scanned')} of "
                            f"{letters.get('count')}.", style="dim"))


def _instances(o: Mapping[str, Any]) -> RenderableType:
    numeric = ("e-mails/s", "delivered/s", "in flight", "MS4 latency", "delivered",
               "dead-lettered")
    table = _table("Instances", "instance", "up", *numeric, "holding", "health",
                   numeric=numeric)
    for i in o.get("instances") or []:
        latency = i.get("latency_s")
        target = i.get("concurrency_target")
        breaker = i.get("breaker")
        holding = i.get("holding") or (f"breaker {breaker}" if breaker and breaker != "closed"
                                       else "-")
        table.add_row(
            _text(i.get("id")), format_seconds(i.get("uptime_s")),
            format_rate(float(i.get("emails_in_per_s") or 0)),
            format_rate(float(i.get("invoices_delivered_per_s") or 0)),
            f"{i.get('in_flight')} / {target if target is not None else '-'}",
            f"{latency * 1000:.0f} ms" if isinstance(latency, int | float) else "-",
            str(i.get("invoices_delivered")), str(i.get("dead_lettered")), _text(holding),
            Text("ok", style="green") if i.get("healthy")
            else _text(i.get("problem"), "red"),
            style="" if i.get("healthy") else "red")
    if not o.get("instances"):
        return Group(Text("Instances", style="bold"),
                     Text("no instance has published its state in the last "
                          f"{SNAPSHOT_TTL:g} s"))
    return table


__all__ = ["DEFAULT_INTERVAL", "Parts", "Poller", "frame", "run"]
