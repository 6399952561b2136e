"""ms1-service end to end as a process: --once over files, SIGTERM drain, samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

from ms1.pipeline import samples


def ms1(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120, **kw)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text("[dead_letters]\nbackend = jsonl\n"
                    f"[dead_letters.jsonl]\npath = {tmp_path / 'dead.jsonl'}\n{extra}")
    return path


def test_once_over_json_and_jsonl_files(tmp_path: Path) -> None:
    emails = list(samples.generate(130, invalid_every=13))
    single = tmp_path / "one.json"
    single.write_bytes(emails[0].data)
    bulk = tmp_path / "many.jsonl"
    bulk.write_bytes(b"\n".join(s.data for s in emails[1:]) + b"\n\n")
    config = write_config(tmp_path)
    proc = ms1(["--config", str(config), "--once", str(single), str(bulk)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    invalid = [s for s in emails if not s.valid]
    assert f"e-mails read: 130, rejected: {len(invalid)}" in proc.stdout
    assert f"({130 - len(invalid)} invoices), dead-lettered: {len(invalid)}" in proc.stdout
    assert "invoices/s" in proc.stdout
    letters = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(letters) == len(invalid)
    # each dead letter says where the e-mail came from: file and line
    refs = {letter["source_ref"] for letter in letters}
    lines = {f"{bulk}:{i}" for i, s in enumerate(emails[1:], 1) if not s.valid}
    assert refs == lines


def test_missing_input_file_is_a_clear_error(tmp_path: Path) -> None:
    """A command-line input that does not exist is the input's problem, not a config key's:
    one line naming it, the others processed, exit 1 (tests/test_once_inputs.py: more)."""
    config = write_config(tmp_path, "[ms4]\ntransport = memory\n[queue]\nbackend = memory\n")
    good = tmp_path / "good.json"
    good.write_bytes(next(iter(samples.generate(1))).data)
    proc = ms1(["--config", str(config), "--once", str(tmp_path / "nope.jsonl"), str(good)],
               tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"input file {tmp_path / 'nope.jsonl'} skipped: not found" in proc.stderr
    assert "[source]" not in proc.stderr
    assert "e-mails read: 1, rejected: 0" in proc.stdout
    assert "inputs skipped: 1" in proc.stdout


def test_sigterm_flushes_partial_batch_and_exits_0(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), samples.generate(30))
    config = write_config(tmp_path, "[batch]\nmax_wait = 3600\n")
    proc = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config),
                             str(data)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        if "ms1 starting" in line or time.monotonic() > deadline:
            break
    time.sleep(1.5)  # the files are read and sent; the foreground service must stay up
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == 0
    assert "received SIGTERM: draining" in rest
    assert "delivered: 1 batches (30 invoices)" in rest


def test_samples_command_writes_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    proc = ms1(["samples", "--count", "20", "--invalid-every", "5", "-o", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_bytes().splitlines()
    assert len(lines) == 20
    assert lines == [s.data for s in samples.generate(20, invalid_every=5)]


def run_demo(tmp_path: Path, redis_url: str) -> subprocess.CompletedProcess[str]:
    """The README's demo: ms4-sim serves while ms1-service --once runs on conf/dev.ini
    (ports moved so tests do not collide with anything on the machine)."""
    conf = (Path(__file__).parent.parent / "conf" / "dev.ini").read_text()
    port = free_port()
    assert "base_url = http://127.0.0.1:8404" in conf
    assert "url = redis://127.0.0.1:6379/0" in conf
    config = tmp_path / "dev.ini"
    config.write_text(conf.replace("127.0.0.1:8404", f"127.0.0.1:{port}")
                      .replace("url = redis://127.0.0.1:6379/0", f"url = {redis_url}"))
    env = {k: v for k, v in os.environ.items() if k != "MS1_MS4_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "ms1_tools.sim", "--port", str(port), "--",
         sys.executable, "-m", "ms1.cli", "--config", str(config), "--once"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "e-mails read: 1000, rejected: 20" in proc.stdout
    assert "delivered: 20 batches (980 invoices)" in proc.stdout
    stats = json.loads(proc.stdout.split("ms4-sim stats: ", 1)[1])
    assert stats["unique_invoices_accepted"] == 980
    assert stats["requests_by_status"] == {"202": 20}
    assert (tmp_path / "var" / "dead-letters.jsonl").exists()
    assert "sim-key" not in proc.stdout + proc.stderr
    return proc


def test_readme_demo_uses_redis_when_one_answers(tmp_path: Path, redis_url: str) -> None:
    proc = run_demo(tmp_path, redis_url)
    assert "Redis answers at" in proc.stderr and "using the durable redis backend" in proc.stderr
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.exists("ms1-demo:outbound") and client.xlen("ms1-demo:outbound") == 0


def test_readme_demo_falls_back_to_memory_without_redis(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    assert "no Redis answers at" in proc.stderr
    assert "using the in-memory backend" in proc.stderr
