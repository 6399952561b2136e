"""systemd service notification: the plain ``sd_notify`` protocol, no external library.

systemd (``Type=notify``/``Type=notify-reload``, ``WatchdogSec=``) passes the path of a
datagram socket in ``$NOTIFY_SOCKET``; the service sends newline-separated
``KEY=value`` assignments to it (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``...).
Outside systemd the variable is unset and :class:`Notifier` does nothing, so the same
code runs in a terminal, under tests, or under a unit.

:class:`Watchdog` pings ``WATCHDOG=1`` from a thread only while a health check passes, so
a wedged pipeline stops pinging and systemd restarts the service. The service's check is
its progress (:mod:`ms1.heartbeat`): no pipeline thread died, and none has gone longer than
``[ms1] watchdog_timeout`` without progress outside a wait that is bounded by design.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "Watchdog"]


def _one_line(text: str) -> str:
    """``text`` with line breaks replaced by spaces (an assignment is one line)."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; does nothing when it is not set.

    The environment is read once, at construction (``os.environ`` by default). One
    ``AF_UNIX``/``SOCK_DGRAM`` socket is opened on the first send and kept; a failed
    send closes it, and the next send opens a new one. A send waits at most
    ``send_timeout`` seconds for room in a full receive queue. All methods are
    thread-safe and never raise on socket errors: :meth:`notify` reports them as
    ``False``.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *,
                 send_timeout: float = 1.0) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | None
        if not path:
            self._address = None
        elif path.startswith("@"):
            self._address = "\0" + path[1:]  # Linux abstract namespace
        else:
            self._address = path
        self._watchdog_usec = _parse_int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid_set = "WATCHDOG_PID" in env
        self._watchdog_pid = _parse_int(env.get("WATCHDOG_PID"))
        self._send_timeout = send_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` was set (i.e. running under systemd notify)."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"KEY=value"`` strings) as one datagram.

        Returns True when the datagram was sent, False when notification is disabled,
        there is nothing to send, or the send failed or timed out (any ``OSError``;
        never raised).
        """
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(self._send_timeout)
                sent = self._sock.sendto(data, self._address)
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self._address, exc)
                self._close_locked()
                return False
            return sent == len(data)

    def ready(self, status: str = "") -> None:
        """Tell systemd start-up is complete (``READY=1``, plus ``STATUS=`` if given)."""
        self.notify("READY=1", *self._status(status))

    def reloading(self) -> None:
        """Tell systemd a configuration reload began (``RELOADING=1`` + ``MONOTONIC_USEC``).

        Send :meth:`ready` when the reload is done.
        """
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "") -> None:
        """Tell systemd the service is shutting down (``STOPPING=1``, plus ``STATUS=``)."""
        self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status``."""
        self.notify(f"STATUS={_one_line(text)}")

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.

        None when ``WATCHDOG_USEC`` is unset or invalid, or when ``WATCHDOG_PID`` is set
        and is not this process.
        """
        usec = self._watchdog_usec
        if usec is None or usec <= 0:
            return None
        if self._watchdog_pid_set and self._watchdog_pid != os.getpid():
            return None
        return usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    @staticmethod
    def _status(status: str) -> tuple[str, ...]:
        return (f"STATUS={_one_line(status)}",) if status else ()


class Watchdog:
    """Thread that pings WATCHDOG=1 every ``interval`` seconds while ``healthy()`` is true,
    and optionally sends STATUS=<status()> on each tick. When healthy() is false it sends
    no WATCHDOG=1 (so systemd's WatchdogSec kills/restarts a wedged service); with a
    ``problem`` callback it logs why (when it turns unhealthy) and, on each tick, sends
    ``STATUS=UNHEALTHY: <problem()>`` so ``systemctl status`` shows it.

    The first tick happens right at :meth:`start`. A ``healthy()`` that raises counts as
    unhealthy; a ``status()`` or ``problem()`` that raises only drops the status line of
    that tick.
    """

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[], bool],
                 status: Callable[[], str] | None = None,
                 problem: Callable[[], str | None] | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be > 0, got {interval!r}")
        self._notifier = notifier
        self._interval = float(interval)
        self._healthy = healthy
        self._status = status
        self._problem = problem
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    @property
    def interval(self) -> float:
        """Seconds between ticks."""
        return self._interval

    def start(self) -> None:
        """Start the daemon thread named ``watchdog`` (no-op if it is already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it, at most ``timeout`` seconds."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def tick(self) -> bool:
        """One check-and-ping; returns True when ``WATCHDOG=1`` was sent."""
        try:
            healthy = bool(self._healthy())
        except Exception:
            log.exception("watchdog health check failed")
            healthy = False
        if not healthy:
            why = self._why()
            if self._was_healthy:
                log.warning("unhealthy: watchdog pings suspended%s", f": {why}" if why else "")
            self._was_healthy = False
            if why:
                self._notifier.notify(f"STATUS=UNHEALTHY: {_one_line(why)}")
            return False
        if not self._was_healthy:
            log.info("healthy again: watchdog pings resumed")
        self._was_healthy = True
        assignments = ["WATCHDOG=1"]
        if self._status is not None:
            try:
                assignments.append(f"STATUS={_one_line(self._status())}")
            except Exception:
                log.exception("watchdog status callback failed")
        return self._notifier.notify(*assignments)

    def _why(self) -> str:
        if self._problem is None:
            return ""
        try:
            return self._problem() or ""
        except Exception:
            log.exception("watchdog problem callback failed")
            return ""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            if self._stop.wait(self._interval):
                break
