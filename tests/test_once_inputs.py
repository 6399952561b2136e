"""Issue 11, "every input is hostile": what ``ms1-service --once FILE...`` and
``ms1-service enqueue FILE...`` do with inputs they cannot read (permission denied,
missing, a directory, a FIFO, a 2 GB file, an endless line), and what ``--once`` says
when the outbound queue cannot be reached.

Every readable input is processed, every unreadable one is reported on one line naming
the file and why, and the exit status is 1 if any input was not processed. An e-mail
larger than ``[source.files] max_email_bytes`` is never read whole: it is dead-lettered
(stage ``source``) clipped to the bound.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import free_port

from ms1.errors import SourceError
from ms1.model import InboundMessage
from ms1.pipeline import samples
from ms1.pipeline.source import FileSource

MiB = 1024 * 1024
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:
    """In the child before exec: as root, lose the right to read any file whatever its mode
    (so a chmod 000 file is unreadable for the child, as for any non-root user)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def ms1(args: list[str], cwd: Path, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``ms1-service ARGS``; as root, without the capabilities that ignore file modes."""
    preexec: Callable[[], None] | None = _drop_file_capabilities if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "ms1.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, preexec_fn=preexec)


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text("[source]\nname = files\n[queue]\nbackend = memory\n"
                    "[ms4]\ntransport = memory\n[dead_letters]\nbackend = jsonl\n"
                    f"[dead_letters.jsonl]\npath = {tmp_path / 'dead.jsonl'}\n"
                    "[batch]\nmax_wait = 0.05\n" + extra)
    return path


def dead_letters(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "dead.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def unreadable(path: Path, data: bytes = b"{}") -> Path:
    path.write_bytes(data)
    path.chmod(0)
    return path


def emails(count: int, prefix: str = "INV") -> list[samples.Sample]:
    return list(samples.generate(count, prefix=prefix))


def error_lines(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if name in line]


# --- 1: unreadable inputs are reported, the others processed, exit 1 -------------------------


def test_unreadable_json_between_good_ones_skips_only_it(tmp_path: Path) -> None:
    good = emails(2)
    first, third = tmp_path / "good1.json", tmp_path / "good3.json"
    first.write_bytes(good[0].data)
    third.write_bytes(good[1].data)
    bad = unreadable(tmp_path / "unreadable.json")
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(first), str(bad),
                str(third)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "e-mails read: 2, rejected: 0" in proc.stdout
    assert "delivered: 1 batches (2 invoices)" in proc.stdout
    assert "inputs skipped: 1" in proc.stdout
    [line] = error_lines(proc.stderr, "unreadable.json")
    assert "permission denied" in line
    assert "[source]" not in proc.stderr


def test_unreadable_and_missing_jsonl_are_each_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    samples.write_jsonl(str(good), emails(30))
    bad = unreadable(tmp_path / "locked.jsonl", b"\n".join(s.data for s in emails(5, "X")))
    missing = tmp_path / "gone.jsonl"
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(bad), str(good),
                str(missing)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "e-mails read: 30, rejected: 0" in proc.stdout
    assert "delivered: 1 batches (30 invoices)" in proc.stdout
    assert "inputs skipped: 2" in proc.stdout
    [locked] = error_lines(proc.stderr, "locked.jsonl")
    assert "permission denied" in locked
    [gone] = error_lines(proc.stderr, "gone.jsonl")
    assert "not found" in gone


def test_all_inputs_readable_exits_0_and_says_nothing_skipped(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    samples.write_jsonl(str(good), emails(10))
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(good)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" not in proc.stdout


# --- 3: directories, FIFOs, wrong names: their own message, no config key blamed --------------


def test_directory_fifo_and_wrong_suffix_each_have_their_own_message(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(emails(1)[0].data)
    directory = tmp_path / "mail.json"
    directory.mkdir()
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opened for reading, it would block until a writer came
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(directory), str(fifo),
                str(good), str(other)], tmp_path, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "e-mails read: 1, rejected: 0" in proc.stdout
    assert "inputs skipped: 3" in proc.stdout
    [line] = error_lines(proc.stderr, "mail.json")
    assert "is a directory" in line
    [line] = error_lines(proc.stderr, "pipe.jsonl")
    assert "is not a regular file (a FIFO)" in line
    [line] = error_lines(proc.stderr, "notes.txt")
    assert "*.json or *.jsonl" in line
    assert "[source]" not in proc.stderr and "not found" not in proc.stderr


def test_only_a_missing_input_exits_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(missing)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = error_lines(proc.stderr, "nope.jsonl")
    assert "not found" in line and "[source]" not in line
    assert "inputs skipped: 1" in proc.stdout


# --- 2: bounded reads -----------------------------------------------------------------------


def run_measured(args: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """Run ms1-service; return exit status, stdout, stderr and the child's own peak RSS
    (KiB, from wait4). Its address space is capped at 1.5 GiB, so reading 2 GB whole
    fails there too (MemoryError) instead of burdening the machine."""
    import resource
    import threading

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 512 * MiB, 3 * 512 * MiB))

    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    with (cwd / "stdout.txt").open("w") as out, (cwd / "stderr.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", *args], cwd=cwd, env=env,
                                stdout=out, stderr=err, preexec_fn=limit)
    killer = threading.Timer(60, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text(),
            usage.ru_maxrss)


def test_two_gigabyte_json_is_dead_lettered_clipped_without_reading_it(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(emails(1)[0].data)
    huge = tmp_path / "huge.json"
    with huge.open("wb") as fh:
        fh.write(b'{"message_id": "<huge@x>", "raw_json": "')
        fh.truncate(2 * 1024**3)  # sparse: 2 GB of (mostly) zeros, no disk used
    status, out, err, rss = run_measured(
        ["--config", str(config_file(tmp_path)), "--once", str(huge), str(good)], tmp_path)
    assert status == 0, out + err
    assert "e-mails read: 2, rejected: 1" in out
    assert "delivered: 1 batches (1 invoices)" in out
    [letter] = dead_letters(tmp_path)
    assert letter["stage"] == "source" and letter["source_ref"] == str(huge)
    assert "larger than 1048576 bytes" in str(letter["reason"])
    assert "max_email_bytes" in str(letter["reason"])
    payload = str(letter.get("payload", letter.get("payload_b64", "")))
    assert payload.startswith('{"message_id": "<huge@x>"')
    assert len(payload) <= 2 * MiB
    assert rss < 200 * 1024, f"peak RSS {rss} KiB"


def test_endless_jsonl_line_is_set_aside_and_the_next_lines_are_read(tmp_path: Path) -> None:
    good = emails(4)
    path = tmp_path / "mixed.jsonl"
    with path.open("wb") as fh:
        fh.write(good[0].data + b"\n")
        fh.write(b'{"message_id": "<long@x>", "subject": "' + b"x" * (3 * MiB) + b'"}\n')
        fh.write(good[1].data + b"\n")
        fh.write(b"y" * (MiB + 1) + b"\r\n")  # one byte over, with CRLF
        fh.write(b"z" * MiB + b"\n")  # exactly the bound: an e-mail (invalid JSON)
        fh.write(good[2].data + b"\n")
        fh.write(good[3].data)  # no final newline
    proc = ms1(["--config", str(config_file(tmp_path)), "--once", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "e-mails read: 7, rejected: 3" in proc.stdout
    assert "delivered: 1 batches (4 invoices)" in proc.stdout
    letters = {str(letter["source_ref"]): letter for letter in dead_letters(tmp_path)}
    assert set(letters) == {f"{path}:2", f"{path}:4", f"{path}:5"}
    assert letters[f"{path}:2"]["stage"] == "source"
    assert "larger than 1048576 bytes" in str(letters[f"{path}:2"]["reason"])
    # clipped to the bound here (and further by [dead_letters] max_payload_bytes)
    assert str(letters[f"{path}:2"]["payload"]).startswith('{"message_id": "<long@x>"')
    assert len(str(letters[f"{path}:2"]["payload"])) <= MiB
    assert letters[f"{path}:4"]["stage"] == "source"
    assert letters[f"{path}:5"]["stage"] == "processor"


def test_two_gigabyte_jsonl_line_keeps_memory_small(tmp_path: Path) -> None:
    path = tmp_path / "endless.jsonl"
    with path.open("wb") as fh:
        fh.truncate(2 * 1024**3)  # one 2 GB line of zeros, no newline
    with (tmp_path / "after.jsonl").open("wb") as fh:
        fh.write(emails(1)[0].data + b"\n")
    status, out, err, rss = run_measured(
        ["--config", str(config_file(tmp_path, "[ms1]\nonce_timeout = 60\n")), "--once",
         str(path), str(tmp_path / "after.jsonl")], tmp_path)
    assert status == 0, out + err
    assert "e-mails read: 2, rejected: 1" in out
    [letter] = dead_letters(tmp_path)
    assert letter["source_ref"] == f"{path}:1" and letter["stage"] == "source"
    assert rss < 200 * 1024, f"peak RSS {rss} KiB"


def test_max_email_bytes_option_sets_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    good = emails(3)
    path.write_bytes(b"\n".join(s.data for s in good) + b"\n" + b"w" * 5000 + b"\n")
    config = config_file(tmp_path, "[source.files]\nmax_email_bytes = 4096\n")
    proc = ms1(["--config", str(config), "--once", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "e-mails read: 4, rejected: 1" in proc.stdout
    [letter] = dead_letters(tmp_path)
    assert "larger than 4096 bytes" in str(letter["reason"])
    assert len(str(letter["payload"])) == 4096


# --- the shared reading rules, in process ---------------------------------------------------


def test_read_inputs_reports_each_problem_and_yields_the_rest(tmp_path: Path) -> None:
    from ms1.pipeline.source import read_inputs  # new in issue 11

    good = tmp_path / "a.jsonl"
    good.write_bytes(b"one\n\n  \ntwo\r\nthree")
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    skipped: list[tuple[str, str]] = []
    got = list(read_inputs([str(loop), str(good), str(dangling), str(tmp_path)], 16,
                           lambda name, why: skipped.append((name, why))))
    assert [(m.ref, m.data, m.problem) for m in got] == [
        (f"{good}:1", b"one", None), (f"{good}:4", b"two", None),
        (f"{good}:5", b"three", None)]
    reasons = dict(skipped)
    assert "symbolic links" in reasons[str(loop)]
    assert reasons[str(dangling)] == "not found"
    assert reasons[str(tmp_path)] == "is a directory"


def test_a_read_error_mid_file_keeps_what_was_read_and_reports_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "flaky.jsonl"
    path.write_bytes(b"a\nb\nc\nd\n")
    after = tmp_path / "after.json"
    after.write_bytes(b"e")
    import io

    real_readline = io.BufferedReader.readline
    calls = {"n": 0}

    class Flaky(io.BufferedReader):
        def readline(self, size: int | None = -1, /) -> bytes:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(5, "Input/output error")
            return real_readline(self, -1 if size is None else size)

    import ms1.pipeline.source as source_module

    monkeypatch.setattr(source_module, "_reader", lambda fd: Flaky(io.FileIO(fd, "rb")))
    source = FileSource([path, after], max_email_bytes=64)
    got: list[InboundMessage] = []
    while not source.exhausted:
        got += source.read(100, 0.1)
    assert [m.data for m in got] == [b"a", b"b", b"e"]
    [(name, why)] = source.skipped()
    assert name == str(path)
    assert "input/output error" in why and "after line 2" in why


def test_file_source_never_raises_for_a_bad_input(tmp_path: Path) -> None:
    try:
        source = FileSource([tmp_path / "missing.json"])
    except SourceError as exc:  # before: raised at construction, blamed on [source] name
        pytest.fail(f"FileSource raised {exc}")
    assert source.read(10, 0.1) == []
    assert source.exhausted
    assert source.skipped() == [(str(tmp_path / "missing.json"), "not found")]


# --- 5: enqueue reads with the same rules ---------------------------------------------------

ENQUEUE_CONFIG = ("[source]\nname = redis\n[queue]\nbackend = redis\n[dead_letters]\n"
                  "backend = redis\n[redis]\nurl = {url}\ninbound_stream = t:emails\n")


def test_enqueue_pushes_readable_files_reports_the_rest_and_exits_1(
        tmp_path: Path, redis_url: str) -> None:
    import redis

    good = tmp_path / "good.jsonl"
    samples.write_jsonl(str(good), emails(20))
    big = tmp_path / "big.jsonl"
    big.write_bytes(emails(1, "B")[0].data + b"\n" + b"q" * (MiB + 10) + b"\n")
    bad = unreadable(tmp_path / "locked.json")
    directory = tmp_path / "dir.jsonl"
    directory.mkdir()
    config = tmp_path / "enqueue.ini"
    config.write_text(ENQUEUE_CONFIG.format(url=redis_url))
    proc = ms1(["--config", str(config), "enqueue", str(good), str(bad), str(directory),
                str(big)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "enqueued 21 e-mails" in proc.stdout
    [line] = error_lines(proc.stderr, "locked.json")
    assert "permission denied" in line
    [line] = error_lines(proc.stderr, "dir.jsonl")
    assert "is a directory" in line
    [line] = error_lines(proc.stderr, "big.jsonl")
    assert ":2" in line and "larger than 1048576 bytes" in line
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("t:emails") == 21


def test_enqueue_of_readable_files_exits_0(tmp_path: Path, redis_url: str) -> None:
    good = tmp_path / "good.jsonl"
    samples.write_jsonl(str(good), emails(5))
    config = tmp_path / "enqueue.ini"
    config.write_text(ENQUEUE_CONFIG.format(url=redis_url))
    proc = ms1(["--config", str(config), "enqueue", str(good)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "enqueued 5 e-mails" in proc.stdout


# --- 4: the queue cannot be reached --------------------------------------------------------


def test_once_with_the_queue_unreachable_claims_nothing_stored(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), emails(120))
    config = tmp_path / "down.ini"
    config.write_text(
        "[ms1]\nonce_timeout = 2\n[source]\nname = files\n[queue]\nbackend = redis\n"
        f"[redis]\nurl = redis://127.0.0.1:{free_port()}/0\nconnect_timeout = 0.5\n"
        "[ms4]\ntransport = memory\n[dead_letters]\nbackend = memory\n"
        "[batch]\nmax_wait = 0.05\n")
    proc = ms1(["--config", str(config), "--once", str(data)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "died" not in proc.stderr
    assert "-1" not in proc.stdout and "-2" not in proc.stdout
    assert "UNDELIVERED: unknown" in proc.stdout
    assert "cannot read queue 'redis'" in proc.stdout
    assert "NOT STORED: 120 e-mails" in proc.stdout
    assert "not processed" in proc.stdout
    not_stored = [line for line in proc.stderr.splitlines() if "not stored" in line]
    assert len(not_stored) == 1, proc.stderr
    assert "120 e-mails" in not_stored[0] and "not processed" in not_stored[0]
