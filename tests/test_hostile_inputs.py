"""Issue 11, "every input is hostile": control and bidi characters, duplicate JSON keys,
dead letters of any size, internal errors of the processor, and malformed inbound Redis
entries through the real service (``python -m ms1.cli --once`` as a subprocess)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support import service_ini

from ms1.config import CORE_OPTIONS
from ms1.model import DeadLetter
from ms1.pipeline import processor, samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    JsonlDeadLetters,
    MemoryDeadLetters,
    letter_from_json,
    letter_to_json,
)
from ms1.pipeline.intake import Intake
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.processor import Accepted, Rejected, unified_email_processor
from ms1.pipeline.source import MemorySource
from ms1.pipeline.stats import RunStats
from ms1.runtime.pluginmanager import Observers, make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]

RAW: dict[str, Any] = {
    "invoice_id": "INV-2025-001", "vendor_name": "Vendor A", "invoice_date": "2025-11-01",
    "total_amount": 1500.0, "currency": "USD",
    "line_items": [{"description": "Item 1", "quantity": 2, "unit_price": 500.0}],
}
EMAIL: dict[str, Any] = {"message_id": "<m@x>", "raw_json": RAW}


def rejected(email: Any) -> Rejected:
    result = unified_email_processor(email)
    assert isinstance(result, Rejected), result
    return result


def with_text(path: str, value: str) -> dict[str, Any]:
    email = copy.deepcopy(EMAIL)
    if path == "message_id":
        email["message_id"] = value
    elif path == "raw_json.line_items[0].description":
        email["raw_json"]["line_items"][0]["description"] = value
    else:
        email["raw_json"][path.removeprefix("raw_json.")] = value
    return email


# --- 1. control and bidi characters ---------------------------------------------------

TEXT_FIELDS = ["message_id", "raw_json.invoice_id", "raw_json.vendor_name",
               "raw_json.currency", "raw_json.line_items[0].description"]
FORBIDDEN = ["\x00", "\x1b", "\r", "\n", "\t", "\x7f", "\x85", "\x9f", "\u200e", "\u200f",
             "\u202a", "\u202e", "\u2066", "\u2069", "\ud800", "\udfff"]


@pytest.mark.parametrize("path", TEXT_FIELDS)
@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_control_bidi_and_surrogate_characters_inside_a_text_field_are_rejected(
        path: str, char: str) -> None:
    value = f"U{char}SD" if path == "raw_json.currency" else f"ab{char}cd"
    email = with_text(path, value)
    for form in (email, json.dumps(email), json.dumps(email).encode()):
        reason = rejected(form).reason
        assert reason.startswith(f"{path}: "), reason
        assert f"U+{ord(char):04X}" in reason, reason


def test_surrounding_whitespace_is_still_trimmed_and_ordinary_text_accepted() -> None:
    email = with_text("raw_json.vendor_name", "\t Müller «Söhne» — 株式会社 😀 \n")
    email["raw_json"]["line_items"][0]["description"] = ' a "quoted" \\ \u2028 </script> '
    result = unified_email_processor(email)
    assert isinstance(result, Accepted), result
    out = json.loads(result.payload)
    assert out["vendor_name"] == "Müller «Söhne» — 株式会社 😀"
    assert out["line_items"][0]["description"] == 'a "quoted" \\ \u2028 </script>'


def test_an_escaped_control_character_in_the_json_text_is_rejected_too() -> None:
    text = json.dumps(EMAIL).replace("Vendor A", "Vendor\\u0000A")
    reason = rejected(text).reason
    assert reason.startswith("raw_json.vendor_name: ") and "U+0000" in reason


# --- 1. duplicate keys ---------------------------------------------------------------

DUPLICATES = [
    ('{"message_id": "<a>", "message_id": "<b>", "raw_json": ' + json.dumps(RAW) + "}",
     "message_id"),
    ('{"message_id": "<a>", "raw_json": {"invoice_id": "1", "invoice_id": "2"}}',
     "raw_json.invoice_id"),
    ('{"message_id": "<a>", "subject": "s", "subject": "t", "raw_json": ' + json.dumps(RAW)
     + "}", "subject"),
    ('{"message_id": "<a>", "raw_json": {"line_items": [{}, {"quantity": 1, "quantity": 2}]}}',
     "raw_json.line_items[1].quantity"),
    ('{"message_id": "<a>", "raw_json": {"x": {"a b": 1, "a b": 2}}}',
     'raw_json.x["a b"]'),
    (json.dumps({"message_id": "<a>", "raw_json": json.dumps(RAW)[:-1] + ', "currency": "EUR"}'}),
     "raw_json.currency"),
]


@pytest.mark.parametrize(("text", "path"), DUPLICATES)
def test_duplicate_keys_anywhere_are_rejected_naming_the_key_path(text: str,
                                                                  path: str) -> None:
    for form in (text, text.encode()):
        result = rejected(form)
        assert result.reason.startswith(f"{path}: duplicate key"), result.reason
    if path != "message_id":
        assert result.message_id == "<a>"


# --- 3. an internal error of the processor ------------------------------------------


def boom(*args: Any) -> Any:
    raise RuntimeError("kaputt in here")


def intake_for(source: MemorySource) -> tuple[Intake, MemoryDeadLetters, RunStats]:
    letters = MemoryDeadLetters()
    stats = RunStats()
    intake = Intake(source=source, policy=SizeBatchPolicy(max_wait=0), queue=MemoryQueue(),
                    dead_letters=letters, observers=Observers(make_plugin_manager()),
                    stats=stats, abort=threading.Event())
    return intake, letters, stats


def test_an_internal_error_is_logged_with_its_traceback_counted_and_named(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(processor, "_currency", boom)
    source = MemorySource([json.dumps(EMAIL).encode()], finite=True)
    intake, letters, stats = intake_for(source)
    with caplog.at_level(logging.ERROR):
        intake.handle(source.read(10, 0.1))
    [letter] = letters.all()
    assert letter.stage == "processor" and letter.source_ref == "mem-1"
    assert "internal error" in letter.reason
    assert "RuntimeError: kaputt in here" in letter.reason
    assert letter.message_id == "<m@x>"
    assert stats.get("processor_errors") == 1
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "mem-1" in record.getMessage() and "<m@x>" in record.getMessage()
    assert "boom" in caplog.text  # the traceback names the function that raised


def test_a_rejection_is_not_an_internal_error() -> None:
    source = MemorySource([b"not json"], finite=True)
    intake, letters, stats = intake_for(source)
    intake.handle(source.read(10, 0.1))
    assert len(letters.all()) == 1 and stats.get("processor_errors") == 0


def test_processor_errors_counter_is_exported() -> None:
    from ms1.ops import metrics

    assert ("processor_errors", "ms1_processor_errors",
            "Unexpected errors inside the processor (each e-mail dead-lettered)"
            ) in metrics._COUNTERS


# --- 2. dead letters keep at most max_payload_bytes -------------------------------------


def test_max_payload_bytes_option() -> None:
    [option] = [o for o in CORE_OPTIONS if (o.section, o.key) == ("dead_letters",
                                                                   "max_payload_bytes")]
    assert (option.kind, option.default, option.min, option.max) == (
        "int", 65536, 1024, 64 * 1024 * 1024)
    assert DEFAULT_MAX_PAYLOAD_BYTES == 65536


def test_clipped_letter_says_so_and_keeps_size_and_hash() -> None:
    payload = "é".encode() * 40_000  # 80,000 bytes of 2-byte characters
    letter = DeadLetter(reason="r", stage="processor", payload=payload).clipped(1025)
    assert len(letter.payload) <= 1025
    letter.payload.decode("utf-8")  # cut on a character boundary
    assert letter.payload_size == len(payload)
    assert letter.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert "clipped" in letter.reason and "80000" in letter.reason
    again = letter.clipped(1025)
    assert again == letter  # clipping twice changes nothing
    small = DeadLetter(reason="r", stage="processor", payload=b"x" * 1025)
    assert small.clipped(1025) is small and small.payload_size is None


@pytest.mark.parametrize("store_kind", ["memory", "jsonl"])
def test_every_store_clips_and_keeps_the_clip_fields(tmp_path: Path, store_kind: str) -> None:
    store = MemoryDeadLetters() if store_kind == "memory" else JsonlDeadLetters(
        tmp_path / "dl.jsonl")
    store.max_payload_bytes = 2048
    big = b"\xff" + b"x" * 50_000_000  # 50 MB, not UTF-8
    store.add([DeadLetter(reason="r", stage="processor", payload=big),
               DeadLetter(reason="small", stage="processor", payload=b"\xffok")])
    clipped, small = store.list()
    assert clipped.payload == big[:2048]
    assert clipped.payload_size == len(big)
    assert clipped.payload_sha256 == hashlib.sha256(big).hexdigest()
    assert small.payload == b"\xffok" and small.payload_size is None
    assert small.reason == "small"
    store.close()


def test_letter_json_round_trip_keeps_binary_payload_and_clip_fields() -> None:
    letter = DeadLetter(reason="r", stage="processor", payload=b"\x00\xff\xfe" * 1000,
                        at=1.0).clipped(1024)
    assert letter_from_json(json.loads(json.dumps(letter_to_json(letter)))) == letter


def test_intake_letters_are_clipped_by_the_store() -> None:
    source = MemorySource([b"{" + b"x" * 200_000], finite=True)
    intake, letters, _ = intake_for(source)
    intake.handle(source.read(10, 0.1))
    [letter] = letters.all()
    assert len(letter.payload) == DEFAULT_MAX_PAYLOAD_BYTES
    assert letter.payload_size == 200_001


# --- 5. issue 11's first two bullets, through the real service -------------------------

INBOUND, DEAD = "ms1:emails", "ms1:dead-letters"


def write_config(path: Path, redis_url: str) -> Path:
    path.write_text(service_ini(redis_url, settings={
        "ms1": {"once_timeout": 60},
        "redis": {"consumer": "hostile", "block_timeout": 0.1},
    }))
    return path


def run_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "--once"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def dead_letters(client: Any) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(DEAD)]


def raw_fields(payload: bytes) -> dict[bytes, bytes]:
    import base64

    def value(item: Any) -> bytes:
        return base64.b64decode(item["base64"]) if isinstance(item, dict) else item.encode()

    return {value(name): value(data) for name, data in json.loads(payload)["fields"]}


@pytest.mark.parametrize("odd", [{b"\xff\xfe": b"\x00\x80"},
                                 {b"email": b"{}", b"\xc3(": b"x"},
                                 {b"mail": b'{"message_id": "<lost?>"}'}],
                         ids=["binary-field-name", "email-and-binary-field", "mail-not-email"])
def test_service_once_delivers_the_valid_emails_and_dead_letters_a_malformed_entry(
        redis_server: Any, redis_url: str, tmp_path: Path, odd: dict[bytes, bytes]) -> None:
    client = redis_server.client()
    emails = [s.data for s in samples.generate(30, invalid_every=0)]
    for data in emails[:15]:
        client.xadd(INBOUND, {"email": data})
    odd_id = client.xadd(INBOUND, odd).decode()
    for data in emails[15:]:
        client.xadd(INBOUND, {"email": data})
    config = write_config(tmp_path / "ms1.ini", redis_url)

    first = run_once(config)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "e-mails read: 31, rejected: 1" in first.stdout, first.stdout
    assert "(30 invoices), dead-lettered: 1" in first.stdout, first.stdout
    [letter] = dead_letters(client)
    assert letter[b"stage"] == b"source" and letter[b"source_ref"] == odd_id.encode()
    assert raw_fields(letter[b"payload"]) == odd  # WITH its content, every field
    assert client.xlen(INBOUND) == 0 and client.xpending(INBOUND, "ms1")["pending"] == 0

    client.xadd(INBOUND, odd)  # a restart meets the same shape again: it does not die
    second = run_once(config)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "e-mails read: 1, rejected: 1" in second.stdout, second.stdout
    assert len(dead_letters(client)) == 2
    assert client.xlen(INBOUND) == 0
    client.close()


def test_replay_keeps_a_clipped_letter_rather_than_sending_half_an_object() -> None:
    from ms1.pipeline.replay import replay

    store = MemoryDeadLetters()
    store.max_payload_bytes = 1024
    whole = b'{"invoice_id":"1","vendor_name":"' + b"v" * 5000 + b'"}'
    store.add([DeadLetter(reason="MS4 rejected", stage="ms4", payload=whole,
                          invoice_id="1", message_id="<m>")])
    queue = MemoryQueue()
    result = replay(store, queue, ids=None, max_items=50, max_bytes=1_048_576)
    assert result.replayed == 0 and queue.stats().empty
    [(_letter_id, reason)] = result.still_invalid
    assert "clipped" in reason and str(len(whole)) in reason
    assert store.count() == 1
