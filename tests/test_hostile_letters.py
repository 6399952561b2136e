"""Stored dead letters are hostile input too (issue 21, its first operator-tool points):
one malformed letter broke the console and the dlq commands (``XADD ms1:dead-letters *
reason x stage ms4 payload {} at not-a-number``: /dead-letters 500, ``dlq list`` and
``dlq replay --all`` exit 1 with ValueError), and MS4's text reached the terminal raw
(escape and bell bytes from a 400's message written by ``dlq list``). Now every store's
letters go through one defensive decoder (``ms1.pipeline.deadletters.decode_letter``) and every
text-mode line is escaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import service_ini

from ms1.config import Secret
from ms1.console import trusted_hosts
from ms1.console.app import ConsoleContext, create_app
from ms1.ops.overview import Ceiling, gather
from ms1.pipeline.deadletters import JsonlDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from plugins.memory import MemoryFleet
from plugins.redis.deadletters import RedisDeadLetters
from plugins.redis.link import RedisLink

STREAM = "ms1:dead-letters"
#: ten kinds of malformed letter: (fields, what the reader should say)
MALFORMED: list[tuple[dict[str, str], str]] = [
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "not-a-number"}, "at"),
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "1", "payload_size": "lots"},
     "payload_size"),
    ({"stage": "ms4", "payload": "{}", "at": "1"}, "no reason"),
    ({"reason": "x", "payload": "{}", "at": "1"}, "no stage"),
    ({"reason": "x", "stage": "ms4", "payload": "{}"}, "no at"),
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "inf"}, "at"),
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "1e400"}, "at"),
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "-5"}, "at"),
    ({"reason": "x", "stage": "ms4", "payload": "{}", "at": "1", "payload_size": "-1"},
     "payload_size"),
    ({"unrelated": "1"}, "no reason"),
]
ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\rFAKE: all invoices delivered\x7f"


def good(n: int) -> dict[str, str]:
    obj = {"invoice_id": f"G-{n}", "vendor_name": "V", "invoice_date": "2025-11-01",
           "total_amount": 1.0, "currency": "EUR", "line_items": []}
    return {"reason": "MS4 answered 400", "stage": "ms4", "payload": json.dumps(obj),
            "invoice_id": f"G-{n}", "at": "1762000000.5"}


@pytest.fixture
def letters(redis_url: str) -> Any:
    client = RedisLink(redis_url).use().client
    for n in range(100):
        client.xadd(STREAM, good(n))
        if n % 10 == 0:
            client.xadd(STREAM, MALFORMED[n // 10][0])
    return client


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), *args],
                          capture_output=True, timeout=120,
                          env={**os.environ, "MS1_MS4_API_KEY": "k"})


def test_the_decoder_says_what_is_wrong_and_never_raises(redis_url: str, letters: Any) -> None:
    store = RedisDeadLetters(RedisLink(redis_url).use(), stream=STREAM)
    try:
        read = store.list(limit=1000)
    finally:
        store.close()
    bad = [letter for letter in read if letter.malformed]
    assert len(read) == 110 and len(bad) == 10
    for letter, (_, said) in zip(bad, MALFORMED, strict=True):
        assert said in (letter.malformed or ""), letter
        assert letter.at == 0.0 or letter.at == 1.0


def test_dlq_list_and_replay_with_malformed_letters(redis_url: str, letters: Any,
                                                    tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url))
    listed = cli(config, "dlq", "list", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.decode().splitlines()
    assert len(lines) == 110 and sum("[malformed: " in line for line in lines) == 10
    as_json = cli(config, "dlq", "list", "--limit", "1000", "--json")
    assert as_json.returncode == 0
    assert sum("malformed" in json.loads(line) for line in as_json.stdout.splitlines()) == 10
    replayed = cli(config, "dlq", "replay", "--all")
    # 1: some letters were kept (the command's rule), not an error (it was 1 with
    # ValueError before, replaying nothing)
    assert replayed.returncode == 1 and b"Error" not in replayed.stderr, replayed.stderr
    out = replayed.stdout.decode()
    assert "replayed 100 dead letters" in out, out
    assert out.count("a malformed dead letter") == 10, out
    assert letters.xlen(STREAM) == 10  # the malformed ones are kept


def test_no_control_byte_reaches_the_terminal_from_dlq_list(redis_url: str,
                                                             tmp_path: Path) -> None:
    client = RedisLink(redis_url).use().client
    client.xadd(STREAM, {"reason": f"MS4 answered 400: {ESCAPES}", "stage": "ms4",
                         "payload": "{}", "invoice_id": f"I{ESCAPES}", "at": "1",
                         "ms4_answer": ESCAPES})
    config = tmp_path / "ms1.ini"
    config.write_text(service_ini(redis_url))
    listed = cli(config, "dlq", "list")
    assert listed.returncode == 0
    assert not [b for b in listed.stdout if (b < 0x20 and b != 0x0A) or b == 0x7F]
    assert b"\\u001b]0;PWNED\\u0007" in listed.stdout
    as_json = cli(config, "dlq", "list", "--json")  # the raw text, JSON-escaped
    assert json.loads(as_json.stdout)["ms4_answer"] == ESCAPES
    assert b"\x1b" not in as_json.stdout


def test_the_console_shows_malformed_letters(redis_url: str, letters: Any) -> None:
    store = RedisDeadLetters(RedisLink(redis_url).use(), stream=STREAM)
    queue, fleet = MemoryQueue(), MemoryFleet()
    ctx = ConsoleContext(
        overview=lambda: gather(fleet, ceiling=Ceiling(), queue=queue, dead_letters=store),
        store=store, queue=queue, max_items=50, max_bytes=1 << 20,
        token=Secret("t" * 32), trusted_hosts=trusted_hosts("127.0.0.1", ()))
    client = create_app(ctx).test_client()
    try:
        for page in ("/", "/api/overview", "/dead-letters", "/dead-letters?stage=ms4",
                     "/dead-letters?from=2025-11-01"):
            answer = client.get(page)
            assert answer.status_code == 200, (page, answer.get_data(as_text=True)[:500])
        bad = [letter for letter in store.list(limit=1000) if letter.malformed]
        for letter in bad:
            page = client.get(f"/dead-letters/{letter.id}")
            assert page.status_code == 200
            assert 'id="letter-malformed"' in page.get_data(as_text=True)
    finally:
        store.close()


def test_a_jsonl_store_reads_a_broken_line_as_a_malformed_letter(tmp_path: Path) -> None:
    path = tmp_path / "letters.jsonl"
    path.write_bytes(b'{"reason": "r", "stage": "ms4", "payload": "{}", "at": 1, "id": "a"}\n'
                     b'not json at all\n'
                     b'["a", "list"]\n'
                     b'{"reason": "r", "stage": "ms4", "at": "soon", "id": "b"}\n')
    store = JsonlDeadLetters(path)
    try:
        read = store.list()
        assert [letter.malformed is None for letter in read] == [True, False, False, False]
        assert read[1].payload == b"not json at all" and read[1].id.startswith("bad-")
        assert store.remove([read[1].id]) == 1
        assert len(store.list()) == 3
    finally:
        store.close()


@pytest.mark.slow
def test_no_control_byte_reaches_the_terminal_from_check(tmp_path: Path) -> None:
    """Issue 21's escaping rule for `check`: a value holding escape sequences (a title-
    setting OSC, a screen clear, a bell) is printed escaped, not played."""
    import subprocess
    import sys

    config = tmp_path / "ms1.ini"
    config.write_bytes(b"[source]\nname = files\n[queue]\nbackend = memory\n"
                       b"[ms4]\ntransport = memory\n[dead_letters]\nbackend = jsonl\n"
                       b"[dead_letters.jsonl]\npath = /tmp/x\x1b]0;PWNED\x07\x1b[2J.jsonl\n")
    result = subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "check"],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert b"PWNED" in result.stdout  # shown, escaped
    assert not [byte for byte in result.stdout if (byte < 0x20 and byte not in b"\n\t")
                or byte == 0x7f]
