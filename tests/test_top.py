"""``ms1-service top`` (ms1/cli/top.py): the fleet overview, live in a real terminal (tmux),
shows the figures ms4-sim counted; Ctrl-C ends it with status 0 and the terminal as it
was; ``--once`` and ``--json`` print one reading."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support import service_ini, wait_until

from ms1.cli import top
from ms1.ops.overview import Ceiling, collect
from ms1.pipeline import samples

pytestmark = pytest.mark.slow

KEY = "top-test-key"


def ms1(*args: object) -> list[str]:
    return [sys.executable, "-m", "ms1.cli", *map(str, args)]


class Tmux:
    """A tmux server of this test's own (its socket in a short temp dir; no status line;
    a pane stays after its command ended, so its exit status can be read)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ms1-tmux-"))
        (self.dir / "tmux.conf").write_text("set -g remain-on-exit on\nset -g status off\n")

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.dir / "sock"), "-f",
                               str(self.dir / "tmux.conf"), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target)

    def show(self, target: str, fmt: str) -> str:
        return self("display-message", "-p", "-t", target, fmt).strip()

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.dir / "sock"), "kill-server"],
                       capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        if os.environ.get("MS1_NO_TMUX"):
            pytest.skip("tmux is not installed and MS1_NO_TMUX is set")
        pytest.fail("tmux is not installed (apt-get install -y tmux); set MS1_NO_TMUX=1 to "
                    "skip the terminal tests instead")
    server = Tmux()
    yield server
    server.close()


def start_sim(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                             "--rate-limit", "0", "--api-key", KEY, *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ms4-sim listening on "), line
    return proc, line.split()[-1]


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
        return dict(json.loads(answer.read()))


def _row_under(screen: str, header: str) -> str:
    """The first row of the table whose header line starts with ``header``."""
    lines = screen.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(header))
    rule = next(i for i in range(at + 1, len(lines)) if lines[i].lstrip().startswith("─"))
    return lines[rule + 1]


def read_screen(screen: str) -> dict[str, Any]:
    """The figures on a frame of top: the totals, the cards, dead letters by stage."""
    totals = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.*)$",
                      _row_under(screen, "e-mails read"))
    assert totals, screen
    cards = re.split(r"\s{2,}", _row_under(screen, "e-mails in/s").strip())
    stages = dict(re.findall(r"^(processor|ms4|batching|source|queue)\s+(\d+)\b", screen,
                             re.MULTILINE))
    return {"emails_read": int(totals[1]), "invoices_delivered": int(totals[2]),
            "dead_lettered": int(totals[3]), "requests": int(totals[4]),
            "by_status": {s: int(n) for s, n in re.findall(r"(\d{3}): (\d+)", totals[5])},
            "dead_letters": int(cards[4]) if cards[4].isdigit() else None,
            "instances": cards[5], "by_stage": {s: int(n) for s, n in stages.items()}}


def test_top_in_a_terminal_shows_what_ms4_sim_counted_and_ctrl_c_ends_it(
        redis_url: str, tmp_path: Path, tmux: Tmux) -> None:
    sim, url = start_sim("--reject-every", "40")
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url, ms4_url=url, settings={
        "ms1": {"log_format": "kv"}, "redis": {"consumer": "top-test"}}))
    emails = list(samples.generate(1000, invalid_every=20))
    data = tmp_path / "in.jsonl"
    samples.write_jsonl(str(data), emails)
    env = {**os.environ, "MS1_MS4_API_KEY": KEY}
    subprocess.run(ms1("--config", config, "enqueue", data), check=True, capture_output=True,
                   timeout=60, env=env)
    log = tmp_path / "service.log"
    service = subprocess.Popen(ms1("--config", config), stdout=subprocess.DEVNULL,
                               stderr=log.open("wb"), env=env)
    try:
        # tmux may hand its panes COLUMNS=80 and LINES=24 (taken from a client without a
        # terminal): the pane's own size must count. The exit status is written by bash,
        # which waits for top (tmux's own pane_dead_status is not always filled in)
        status_file = tmp_path / "top.status"
        command = "env -u COLUMNS -u LINES {}; echo $? > {}".format(
            shlex.join(ms1("--config", config, "top")), shlex.quote(str(status_file)))
        tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", "-c", str(tmp_path),
             shlex.join(["bash", "-c", command]))
        tmux("pipe-pane", "-t", "top", "-o", f"cat >> {shlex.quote(str(tmux.dir / 'raw'))}")
        figures: dict[str, Any] = {}
        frame = [""]  # the last screen read whole

        def settled() -> bool:
            screen = tmux.screen("top")
            if "Totals of the running instances" not in screen:
                return False
            try:
                figures.update(read_screen(screen))
            except (StopIteration, IndexError, AssertionError):
                return False  # a frame caught while top redraws it: the next one
            frame[0] = screen
            return figures["emails_read"] == len(emails) \
                and figures["invoices_delivered"] + figures["dead_lettered"] == len(emails)

        assert wait_until(settled, 30, interval=0.2), \
            tmux.show("top", "#{window_width}x#{window_height} #{pane_width}") + "\n" + \
            tmux.screen("top") + log.read_text()[-3000:]
        time.sleep(1.2)  # one more frame: nothing changes any more
        assert wait_until(settled, 5, interval=0.2), tmux.screen("top")
        screen = frame[0]
        stats = sim_stats(url)
        valid = sum(1 for e in emails if e.valid)
        accepted = stats["unique_invoices_accepted"]
        refused = valid - accepted
        assert refused > 0 and stats["duplicate_invoices"] == 0
        # the same figures as ms4-sim's counts
        assert figures["invoices_delivered"] == accepted == stats["invoices_accepted"]
        assert figures["dead_letters"] == len(emails) - accepted  # the store's count
        assert figures["dead_lettered"] == len(emails) - accepted  # the instance's counter
        assert figures["by_stage"] == {"processor": len(emails) - valid, "ms4": refused}
        assert figures["by_status"] == {s: n for s, n in stats["requests_by_status"].items()}
        assert figures["requests"] == sum(stats["requests_by_status"].values())
        assert figures["instances"] == "1 (1 healthy)"
        assert re.search(r"^top-test@\S+:\d+ .* ok\s*$", screen, re.MULTILINE), screen
        assert re.search(r"^inbound\s+ms1:emails\s+0 e-mails\s+0\s+0 s", screen, re.MULTILINE)
        assert re.search(r"^outbound\s+ms1:outbound\s+0 batches", screen, re.MULTILINE)
        assert tmux.show("top", "#{alternate_on}") == "1"  # drawn on the alternate screen

        # --once and --json print one reading of the same figures, in a pipe
        once = subprocess.run(ms1("--config", config, "top", "--once"), capture_output=True,
                              text=True, timeout=30, env=env)
        assert once.returncode == 0, once.stderr
        assert "\x1b" not in once.stdout and once.stderr == ""
        assert read_screen(once.stdout)["invoices_delivered"] == accepted
        answer = subprocess.run(ms1("--config", config, "top", "--json"), capture_output=True,
                                text=True, timeout=30, env=env)
        assert answer.returncode == 0, answer.stderr
        overview = json.loads(answer.stdout)
        assert overview["totals"]["invoices_delivered"] == accepted
        assert overview["dead_letters"]["count"] == len(emails) - accepted

        # Ctrl-C: status 0, no traceback, the terminal as it was
        tmux("send-keys", "-t", "top", "C-c")
        assert wait_until(lambda: status_file.exists() and status_file.read_text().strip(),
                          10), tmux.screen("top")
        assert status_file.read_text().strip() == "0"
        after = tmux.screen("top")
        assert "Traceback" not in after and "KeyboardInterrupt" not in after, after
        assert "Totals of the running instances" not in after  # the alternate screen left
        assert tmux.show("top", "#{alternate_on}") == "0"
        raw = (tmux.dir / "raw").read_bytes()
        assert raw.rfind(b"\x1b[?1049l") > raw.rfind(b"Totals of the running instances")
        assert raw.rfind(b"\x1b[?25h") > raw.rfind(b"\x1b[?25l")  # the cursor shown again
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=30)
        finally:
            if service.poll() is None:
                service.kill()
            sim.send_signal(signal.SIGTERM)
            sim.communicate(timeout=30)


def render(overview: dict[str, Any], **kw: Any) -> str:
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(top.frame(overview, **kw))
    console.file.close()
    return console.export_text()


def snapshot(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "ms1-a@h:1", "label": "ms1-a", "updated": 100.0, "started": 40.0,
        "counters": {"emails_read": 500, "invoices_delivered": 450, "dead_lettered": 50,
                     "responses_202": 9, "responses_429": 2},
        "rates": {"emails_in_per_s": 12.5, "invoices_delivered_per_s": 11.0},
        "in_flight": 3, "concurrency_target": 8, "latency_s": 0.05,
        "held": {"pause_429_s": 0.0, "stop": None, "auth_blocked": False,
                 "breaker": "closed"},
        "held_seconds": {"rate_budget": 4.0}, "held_recent": {"rate_budget": 0.5},
        "health": {"ok": True, "problem": None}}
    base.update(changes)
    return base


def test_a_frame_shows_the_overview_as_the_console_does() -> None:
    """Rendered without a terminal: what holds sending back, the cards, an unhealthy
    instance, unreadable parts and a stale reading are all on the frame."""
    paused = snapshot(id="ms1-b@h:2", held={"pause_429_s": 12.0, "breaker": "open",
                                            "reason": "MS4 answered 503"},
                      health={"ok": False, "problem": "sender-3: no progress for 130 s"})
    overview = collect([snapshot(), paused], ceiling=Ceiling(120, 60.0, 50),
                       outbound={"length": 40, "invoices": 2000, "stream": "ms1:outbound"},
                       dead_letters={"count": 7, "by_stage": {"ms4": 7},
                                     "by_reason": [["MS4 answered 400", 7]], "scanned": 7,
                                     "complete": True},
                       errors={"inbound": "cannot reach Redis"}, now=101.0)
    text = render(overview, config="conf/prod.ini", interval=1.0, stale_s=7.0)
    assert "ms1 top  conf/prod.ini" in text and "every 1 s" in text
    assert "cannot read inbound: cannot reach Redis" in text
    assert "cannot read reading: this reading is 7 s old" in text
    cards = re.split(r"\s{2,}", _row_under(text, "e-mails in/s").strip())
    assert cards == ["25.0", "22.0 (ceiling 100)", "6 of 16", "20 s", "7", "2 (1 healthy)"]
    assert re.search(r"429 pause\s+ms1-b@h:2\s+paused by a 429 \(12 s left\)", text)
    assert re.search(r"breaker open\s+ms1-b@h:2\s+MS4 answered 503", text)
    assert re.search(r"outbound\s+ms1:outbound\s+40 batches \(2000 invoices\)\s+40\s+20 s",
                     text)
    assert re.search(r"^\s*1000\s+900\s+100\s+22\s+202: 18  429: 4", text, re.MULTILINE)
    assert re.search(r"^ms4\s+7\b", text, re.MULTILINE)
    assert re.search(r"MS4 answered 400\s+7", text)
    assert re.search(r"^ms1-b@h:2 .* MS4 answered 503; paused .* sender-3: no progress for",
                     text, re.MULTILINE)
    assert re.search(r"^ms1-a@h:1 .*\s+50 ms\s+450\s+50\s+-\s+ok", text, re.MULTILINE)


def test_interval_must_be_positive(tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text("[queue]\nbackend = memory\n")
    proc = subprocess.run(ms1("--config", config, "top", "--interval", "0"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--interval must be at least" in proc.stderr


def test_text_from_redis_is_shown_as_written_never_read_as_markup() -> None:
    """Reasons, problems and ids come from Redis: square brackets in them are text (rich
    read "[/lines/0]" as a closing tag and raised, ending top; "[item]" vanished)."""
    odd = snapshot(id="ms1-[b]@h:2", held={"breaker": "open", "reason": "MS4 said [/lines/0]"},
                   health={"ok": False, "problem": "lines[item] missing [/bold]"})
    overview = collect([odd], ceiling=Ceiling(120, 60.0, 50), outbound=None,
                       dead_letters={"count": 1, "by_stage": {"ms4": 1},
                                     "by_reason": [["item [3]: bad [/x]", 1]], "scanned": 1,
                                     "complete": True}, errors={}, now=101.0)
    text = render(overview, config="conf/prod.ini", interval=1.0, stale_s=0.0)
    for shown in ("ms1-[b]@h:2", "MS4 said [/lines/0]", "lines[item] missing [/bold]",
                  "item [3]: bad [/x]"):
        assert shown in text, (shown, text)
