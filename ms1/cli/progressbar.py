"""Progress bars on the terminal for the long commands, ``enqueue``, ``--once`` and
``dlq replay``: how many, how fast, how long still; drawn with ``rich.progress``.

Not to be confused with :mod:`ms1.heartbeat`, the pipeline threads' progress record the
watchdog reads: this module only draws, for a person at a terminal. The commands import
it when they run (``rich`` stays out of the service's own start).

More: docs/internals.md, ``ms1.cli.progressbar``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

__all__ = ["Display", "Row", "restore_cursor", "wanted"]

#: bars redrawn per second
REFRESH_PER_SECOND = 5
#: seconds between two readings of figures kept elsewhere (:meth:`Display.follow`)
FOLLOW_INTERVAL = 0.2
#: the rate shown is the one over the last this many seconds
RATE_WINDOW = 5.0
#: narrowest and widest bar drawn
BAR_WIDTH = (10, 40)
#: about the width the figures next to a bar take
FIGURES_WIDTH = 62
#: makes the cursor visible again (``rich`` hides it while it draws)
_SHOW_CURSOR = b"\x1b[?25h"

#: the display drawing now, if any (:func:`restore_cursor`)
_live: Display | None = None


def wanted(log_format: str, stream: TextIO | None = None) -> bool:
    """True when bars belong on ``stream`` (default stderr): a terminal that is not
    ``dumb``, with logs that are not JSON lines."""
    stream = sys.stderr if stream is None else stream
    if log_format == "json" or os.environ.get("TERM", "") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed, or not a file at all
        return False


def restore_cursor() -> None:
    """Show the cursor again if a display is drawing, for an exit that skips its end
    (``os._exit``); safe in a signal handler (one ``write(2)``, no lock)."""
    live = _live
    if live is not None:
        with contextlib.suppress(OSError):
            os.write(live.fd, _SHOW_CURSOR + b"\n")


class Row:
    """One bar: ``done`` of ``total`` (None: not known yet) and ``count`` things counted
    (the amount shown and the rate; ``done`` itself unless the bar measures bytes). The
    rate is the one over the last :data:`RATE_WINDOW` s; the time left is what remains
    of ``total`` at the pace ``done`` grew over that time. A row of a display that is off
    does nothing."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None, *,
                 measures_bytes: bool = False) -> None:
        self._progress = progress
        self._task = TaskID(0) if task is None else task
        self._bytes = measures_bytes
        self._started = time.monotonic()
        self._samples: deque[tuple[float, float, int]] = deque()  # (when, done, count)
        self._done = 0.0
        self._count = 0
        self._total: float | None = None
        self._finished = False
        self._lock = threading.Lock()  # a follower thread and the command's own may update

    def update(self, *, done: float | None = None, total: float | None = None,
               count: int | None = None) -> None:
        if self._progress is None:
            return
        with self._lock:
            if not self._finished:
                self._update(done, total, count)

    def finish(self, *, done: float | None = None, count: int | None = None) -> None:
        """The work is done: the bar full, the rate the average over the whole row."""
        if self._progress is None:
            return
        with self._lock:
            if not self._finished:
                self._finish(done, count)
                self._finished = True

    def _take(self, done: float | None, count: int | None) -> None:
        """What was done (and counted: the items done, unless the bar measures bytes)."""
        if done is not None:
            self._done = done
        if count is not None:
            self._count = count
        elif not self._bytes:
            self._count = int(self._done)

    def _update(self, done: float | None, total: float | None, count: int | None) -> None:
        self._take(done, count)
        if total is not None:
            self._total = total
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self._done, self._count))
        while len(samples) > 2 and samples[1][0] < now - RATE_WINDOW:
            samples.popleft()
        then, done_then, count_then = samples[0]
        span = now - then
        if span < 0.5:  # too short a time to tell: the average since the start
            then, done_then, count_then, span = self._started, 0.0, 0, now - self._started
        rate = (self._count - count_then) / span if span > 0 else 0.0
        pace = (self._done - done_then) / span if span > 0 else 0.0
        left: float | None = None
        if self._total is not None and pace > 0:
            left = max(0.0, self._total - self._done) / pace
        self._show(rate=rate, left=left)

    def _finish(self, done: float | None, count: int | None) -> None:
        assert self._progress is not None
        self._take(done, count)
        self._total = self._done
        took = time.monotonic() - self._started
        self._show(rate=self._count / took if took > 0 else 0.0, left=None, took=took)
        self._progress.stop_task(self._task)

    def _show(self, *, rate: float, left: float | None, took: float | None = None) -> None:
        assert self._progress is not None
        total = self._total
        # what rich draws the bar from (it cannot draw 0 of 0); the columns show the figures
        bar_total, bar_done = (total, self._done) if total else \
            ((1.0, 1.0) if total is not None else (None, self._done))
        self._progress.update(self._task, completed=bar_done, total=bar_total,
                              done=self._done, all=total, count=self._count, rate=rate,
                              left=left, took=took)


class Display:
    """Progress bars on stderr while in a ``with`` block; nothing when ``enabled`` is
    False (see :func:`wanted`). One display draws at a time."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self.fd = 2
        self._progress: Progress | None = None
        self._restore: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._poll: Callable[[], None] | None = None

    def row(self, label: str, *, unit: str, total: float | None = None,
            measures_bytes: bool = False) -> Row:
        """A new bar named ``label``, counting ``unit`` (``e-mails``); with
        ``measures_bytes``, ``done`` and ``total`` are bytes and ``count`` the things."""
        if self._progress is None:
            return Row()
        task = self._progress.add_task(label, total=total or None, unit=unit, done=0.0,
                                       all=total, count=0, rate=0.0, left=None, took=None,
                                       measures_bytes=measures_bytes)
        row = Row(self._progress, task, measures_bytes=measures_bytes)
        row.update(total=total)
        return row

    def follow(self, poll: Callable[[], None], interval: float = FOLLOW_INTERVAL) -> None:
        """Call ``poll`` (it updates rows from figures kept elsewhere) every ``interval`` s
        in a thread of its own while the display is on, and once more at its end."""
        if self._progress is None or self._follower is not None:
            return
        self._poll = poll

        def loop() -> None:
            while not self._stop.wait(interval):
                _quietly(poll)

        _quietly(poll)
        self._follower = threading.Thread(target=loop, name="progress-bars", daemon=True)
        self._follower.start()

    def __enter__(self) -> Display:
        global _live
        if not self.enabled or _live is not None:
            self.enabled = False
            return self
        try:
            self.fd = self._stream.fileno()
        except (AttributeError, ValueError, OSError):
            self.fd = 2
        console = Console(file=self._stream, force_terminal=True, highlight=False)
        # the bar takes what the figures leave of the terminal's width, within bounds
        bar_width = max(BAR_WIDTH[0], min(BAR_WIDTH[1], console.width - FIGURES_WIDTH))
        progress = Progress(
            TextColumn("[bold]{task.description}", table_column=_cell()),
            BarColumn(bar_width=bar_width), _PercentColumn(_cell()), _AmountColumn(_cell()),
            _RateColumn(_cell()), _TimeColumn(_cell()),
            console=console, refresh_per_second=REFRESH_PER_SECOND,
            redirect_stdout=False, redirect_stderr=False)
        self._route_output(console)
        try:
            progress.start()
        except BaseException:
            self._unroute()
            raise
        self._progress = progress
        _live = self
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (the bars' last state stays on screen); give the terminal back."""
        global _live
        progress = self._progress
        if progress is None:
            return
        self._stop.set()
        if self._follower is not None:
            self._follower.join(2.0)
        if self._poll is not None:
            _quietly(self._poll)  # the last figures, not those of up to interval s ago
        try:
            progress.stop()
        finally:
            self._unroute()
            self._progress = None
            if _live is self:
                _live = None

    def _route_output(self, console: Console) -> None:
        """Until the end: log handlers writing to the terminal, ``sys.stderr`` and a
        ``sys.stdout`` on the same terminal write through ``console``, above the bars."""
        writer = _ConsoleWriter(console, self._stream)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) \
                    and not isinstance(handler, logging.FileHandler) \
                    and _same_terminal(handler.stream, self._stream):
                old = handler.setStream(writer)
                if old is not None:
                    self._restore.append(_put_back_handler_stream(handler, old))
        for name in ("stderr", "stdout"):
            stream = getattr(sys, name)
            if _same_terminal(stream, self._stream):
                setattr(sys, name, writer)
                self._restore.append(_put_back_sys(name, stream))

    def _unroute(self) -> None:
        while self._restore:
            self._restore.pop()()


def _put_back_handler_stream(handler: logging.StreamHandler[TextIO], stream: TextIO
                             ) -> Callable[[], None]:
    def put_back() -> None:
        handler.setStream(stream)

    return put_back


def _put_back_sys(name: str, stream: TextIO) -> Callable[[], None]:
    return lambda: setattr(sys, name, stream)


def _same_terminal(stream: object, terminal: TextIO) -> bool:
    """``stream`` writes to the terminal ``terminal`` is (the same device)."""
    if stream is terminal:
        return True
    try:
        if not stream.isatty():  # type: ignore[attr-defined]
            return False
        mine = os.fstat(stream.fileno())  # type: ignore[attr-defined]
        return os.path.samestat(mine, os.fstat(terminal.fileno()))
    except (AttributeError, ValueError, OSError):
        return False


def _quietly(call: Callable[[], None]) -> None:
    """Run ``call``; a failure costs the bars one refresh, never the command."""
    try:
        call()
    except Exception:
        logging.getLogger(__name__).debug("progress bars: reading the figures failed",
                                          exc_info=True)


class _ConsoleWriter:
    """A text stream printing whole lines through a ``rich`` console as plain text (no
    markup, highlighting or re-wrapping): above the bars. A line not yet ended waits for
    its end (or a flush)."""

    def __init__(self, console: Console, terminal: TextIO) -> None:
        self._console = console
        self._terminal = terminal
        self._buffer = ""
        self._lock = threading.Lock()
        self.encoding = getattr(terminal, "encoding", "utf-8")
        self.errors = getattr(terminal, "errors", "strict")

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._buffer + text).split("\n")
            self._buffer = lines.pop()
        if lines:
            self._console.print(Text("\n".join(lines)), soft_wrap=True, markup=False,
                                highlight=False, emoji=False)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rest, self._buffer = self._buffer, ""
        if rest:
            self.write(rest + "\n")

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._terminal.fileno()


def _cell() -> Column:
    """A table cell of figures: never wrapped (cut at the terminal's edge instead)."""
    return Column(no_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _PercentColumn(ProgressColumn):
    """``42%`` once the total is known; blank before."""

    def render(self, task: Task) -> Text:
        total = task.fields.get("all")
        if total is None:
            return Text("    ")
        done = float(task.fields.get("done", 0.0))
        share = 100.0 if not total else min(100.0, 100 * done / total)
        return Text(f"{share:3.0f}%")


class _AmountColumn(ProgressColumn):
    """``1,234/5,000 e-mails``; ``1,234 e-mails`` while the total is unknown; for a bar
    measuring bytes, ``1,234 e-mails 1.2/4.5 MB``."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        done = int(task.fields.get("done", 0))
        total = task.fields.get("all")
        if task.fields.get("measures_bytes"):
            count = int(task.fields.get("count", 0))
            if total is None:
                return Text(f"{count:,} {unit} {decimal(done)}")
            amount, of = decimal(done).split(), decimal(int(total)).split()
            same = amount[1:] == of[1:]
            return Text(f"{count:,} {unit} {amount[0] if same else decimal(done)}/"
                        f"{decimal(int(total))}")
        if total is None:
            return Text(f"{done:,} {unit}")
        return Text(f"{done:,}/{int(total):,} {unit}")


class _RateColumn(ProgressColumn):
    """``1,234/s`` (the things counted, per second)."""

    def render(self, task: Task) -> Text:
        return Text(f"{float(task.fields.get('rate', 0.0)):,.0f}/s", style="cyan")


class _TimeColumn(ProgressColumn):
    """``left 0:01:05`` (``left ?`` while it cannot tell); ``took 0:00:12`` at the end."""

    def render(self, task: Task) -> Text:
        took = task.fields.get("took")
        if took is not None:
            return Text(f"took {_clock(took)}", style="green")
        left = task.fields.get("left")
        return Text(f"left {_clock(left)}" if left is not None else "left ?",
                    style="yellow")
