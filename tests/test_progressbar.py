"""Progress bars (ms1/cli/progressbar.py): ``enqueue``, ``--once`` and ``dlq replay --all`` show
count, rate and time left when stderr is a terminal (run here on a pseudo-terminal), and
nothing at all in a pipe; log lines printed meanwhile stay whole."""

from __future__ import annotations

import logging
import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
from support import logging_restored, service_ini
from terminal import assert_no_progress, plain, read_terminal, run_on_terminal

from ms1.cli import progressbar
from ms1.model import DeadLetter
from ms1.ops.logs import setup_logging
from ms1.pipeline import samples
from ms1.runtime import pluginmanager

pytestmark = pytest.mark.slow


def ms1(*args: object) -> list[str]:
    return [sys.executable, "-m", "ms1.cli", *map(str, args)]


def piped(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60)


def test_enqueue_shows_progress_on_a_terminal_and_nothing_in_a_pipe(
        redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url))
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), samples.generate(5000))
    missing = tmp_path / "gone.jsonl"

    ran = run_on_terminal(ms1("--config", config, "enqueue", data, missing), cwd=tmp_path)
    assert ran.returncode == 1, ran.shown  # the missing file
    assert ran.stdout.startswith("enqueued 5000 e-mails into source 'redis'")
    shown = ran.shown
    assert re.search(r"enqueue .*100% 5,000 e-mails [\d.]+/[\d.]+ MB .*\d/s +took 0:", shown), \
        shown
    # what the command says meanwhile is printed whole, above the bar
    assert f"\nms1-service: enqueue: skipped {missing}: not found\n" in shown, shown
    assert ran.terminal.endswith("\x1b[?25h") or "\x1b[?25h" in ran.terminal  # cursor back

    proc = piped(ms1("--config", config, "enqueue", data), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "enqueued 5000 e-mails into source 'redis'\n"
    assert proc.stderr == ""
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("ms1:emails") == 10_000
    client.close()


def once_config(tmp_path: Path, log_format: str = "text") -> Path:
    config = tmp_path / "once.ini"
    config.write_text(f"[ms1]\nlog_format = {log_format}\n[ms4]\ntransport = memory\n"
                      "[queue]\nbackend = memory\n[dead_letters]\nbackend = memory\n"
                      "[send]\nrequests_per_minute = 100000\n[batch]\nmax_wait = 0.05\n")
    return config


def test_once_shows_read_and_delivered_on_a_terminal_with_whole_log_lines(
        tmp_path: Path) -> None:
    emails = list(samples.generate(2000, invalid_every=10))
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), emails)
    invalid = [i for i, e in enumerate(emails, 1) if not e.valid]
    config = once_config(tmp_path)

    ran = run_on_terminal(ms1("--config", config, "--once", data), cwd=tmp_path)
    assert ran.returncode == 0, ran.shown[-3000:]
    shown = ran.shown
    assert re.search(r"read .*100% 2,000/2,000 e-mails .*\d/s +took 0:", shown), shown[-3000:]
    assert re.search(r"delivered .*100% 1,800/1,800 invoices .*\d/s +took 0:", shown), \
        shown[-3000:]
    # every log line reached the terminal whole, on a line of its own: one per rejection
    lines = shown.split("\n")
    rejected = [line for line in lines if " INFO ms1.pipeline.intake [committer] rejected " in line]
    assert len(rejected) == len(invalid), shown[-3000:]
    pattern = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ms1\.pipeline\.intake "
                         r"\[committer\] rejected "
                         rf".+ \({re.escape(str(data))}:(\d+)\): \S")
    refs = []
    for line in rejected:
        match = pattern.match(line)
        assert match and "━" not in line and "/s " not in line, line
        refs.append(int(match.group(1)))
    assert sorted(refs) == invalid

    proc = piped(ms1("--config", config, "--once", data), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_no_progress(proc.stderr)
    # the same log lines, to the character, as in a pipe
    assert sorted(_untimed(rejected)) == sorted(_untimed(
        line for line in proc.stderr.splitlines()
        if " INFO ms1.pipeline.intake [committer] rejected " in line))
    # the summary on stdout is the same with or without the bars
    assert proc.stdout.splitlines()[:2] == ran.stdout.splitlines()[:2]
    assert "e-mails read: 2000, rejected: 200" in proc.stdout


def _untimed(lines: Iterable[str]) -> list[str]:
    """Log lines without their time stamps."""
    return [line.split(" ", 2)[2] for line in lines]


def test_no_bars_on_a_terminal_when_logs_are_json(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), samples.generate(200))
    ran = run_on_terminal(ms1("--config", once_config(tmp_path, "json"), "--once", data),
                          cwd=tmp_path)
    assert ran.returncode == 0, ran.shown
    assert '"msg": "ms1 starting' in ran.terminal
    assert_no_progress(ran.terminal)


def add_letters(config: Path, count: int) -> None:
    pm = pluginmanager.make_plugin_manager()
    store = pluginmanager.build_dead_letters(pm, pluginmanager.load(pm, str(config)))
    try:
        store.add([DeadLetter(reason="400", stage="ms4", invoice_id=f"R{i}",
                              payload=b'{"invoice_id":"R%d"}' % i) for i in range(count)])
    finally:
        store.close()


def test_dlq_replay_all_shows_progress_on_a_terminal_and_nothing_in_a_pipe(
        redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url))
    add_letters(config, 1200)
    ran = run_on_terminal(ms1("--config", config, "dlq", "replay", "--all"), cwd=tmp_path)
    assert ran.returncode == 0, ran.shown
    assert ran.stdout == "replayed 1200 dead letters in 24 batches\n"
    assert re.search(r"replay .*100% 1,200/1,200 letters .*\d/s +took 0:", ran.shown), ran.shown

    add_letters(config, 300)
    proc = piped(ms1("--config", config, "dlq", "replay", "--all"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "replayed 300 dead letters in 6 batches\n"
    assert proc.stderr == ""
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("ms1:outbound") == 30
    client.close()


def test_bars_and_log_lines_from_many_threads_do_not_garble_each_other() -> None:
    """In-process, on a pseudo-terminal: 4 threads log 200 lines each while a bar moves;
    every line arrives whole, on its own line."""
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w", buffering=1)
    received, reader = read_terminal(master)
    log = logging.getLogger("ms1.test.bars")
    with logging_restored():
        setup_logging("INFO", "text", stream=terminal)
        assert progressbar.wanted("text", terminal) and not progressbar.wanted("json", terminal)
        with progressbar.Display(True, stream=terminal) as display:
            bar = display.row("work", unit="items", total=800)
            done = [0]
            lock = threading.Lock()

            def work(n: int) -> None:
                for i in range(200):
                    log.info("thread %d line %03d %s", n, i, "x" * 60)
                    with lock:
                        done[0] += 1
                        bar.update(done=done[0])

            threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            bar.finish()
        logging.getLogger("ms1.test.bars").info("after the bars")
    terminal.close()
    reader.join(10)
    os.close(master)
    shown = plain(b"".join(received).decode())
    lines = [line for line in shown.split("\n") if "ms1.test.bars" in line]
    pattern = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ms1\.test\.bars \[Thread-\d+ \(work\)\] "
                         r"thread (\d) line (\d{3}) x{60}$")
    seen = set()
    for line in lines[:-1]:
        match = pattern.match(line)
        assert match, line
        seen.add((match.group(1), match.group(2)))
    assert len(seen) == 800
    assert lines[-1].endswith("INFO ms1.test.bars [MainThread] after the bars")
    assert re.search(r"work .*100% 800/800 items .*\d/s +took 0:", shown)


def test_not_wanted_in_a_pipe_or_a_dumb_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        assert not progressbar.wanted("text", pipe)
    os.close(read_end)
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setenv("TERM", "xterm")
        assert progressbar.wanted("text", tty) and progressbar.wanted("kv", tty)
        assert not progressbar.wanted("json", tty)
        monkeypatch.setenv("TERM", "dumb")
        assert not progressbar.wanted("text", tty)
    os.close(master)
    # a display that is off draws nothing and its rows do nothing
    with progressbar.Display(False) as display:
        row = display.row("x", unit="y", total=3)
        row.update(done=1)
        row.finish()
