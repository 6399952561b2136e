"""Running a command with its stderr on a pseudo-terminal (what a person at a terminal
sees), and reading what a terminal shows."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import threading
from dataclasses import dataclass
from pathlib import Path

#: CSI sequences (colours, cursor moves, erase) and OSC ones
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
#: a progress bar's rate column: ``4,859/s``
RATE = re.compile(r"\d/s\b")


def plain(text: str) -> str:
    """``text`` without terminal control sequences, carriage returns as line ends."""
    return ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class Ran:
    returncode: int
    stdout: str
    terminal: str  # what was written to the terminal (stderr), control sequences kept

    @property
    def shown(self) -> str:
        return plain(self.terminal)


def read_terminal(master: int) -> tuple[list[bytes], threading.Thread]:
    """Read everything the pseudo-terminal ``master`` receives, in a thread, into the list
    returned (until every end of its slave side is closed)."""
    received: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal's slave side is closed
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return received, reader


def run_on_terminal(args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                    timeout: float = 60, columns: int = 120, rows: int = 40) -> Ran:
    """Run ``args`` with stderr (and stdin) on a new pseudo-terminal of ``columns`` x
    ``rows``, stdout on a pipe; everything the terminal received, and stdout."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    environ = {**os.environ, "TERM": "xterm-256color", **(env or {})}
    for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR"):
        environ.pop(name, None)
    received, reader = read_terminal(master)
    try:
        proc = subprocess.Popen(args, stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                                cwd=cwd, env=environ)
    finally:
        os.close(slave)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        reader.join(10)
        os.close(master)
    return Ran(proc.returncode, stdout.decode(errors="replace"),
               b"".join(received).decode(errors="replace"))


def assert_no_progress(text: str) -> None:
    """Nothing a progress bar draws is in ``text``: no control sequence, no bar, no rate
    or time left."""
    assert "\x1b" not in text, text[-2000:]
    for mark in ("━", "left ?", "left 0:", "took 0:"):
        assert mark not in text, (mark, text[-2000:])
    assert not RATE.search(text), text[-2000:]
