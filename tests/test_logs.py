"""ms1.ops.logs: the three formats, one record per line, and secrets never reaching the output."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping

import pytest
from support import logging_restored

from ms1.ops import logs
from ms1.ops.logs import (
    JsonFormatter,
    KeyValueFormatter,
    RedactingFilter,
    add_secret,
    setup_logging,
)

SECRET = "sk-live-9f8e7d6c5b4a"
EXTRA = {"batch": "ab12", "size": 50, "status": 202, "attempt": 1, "latency_ms": 12.3456}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def configure(fmt: str, secrets: tuple[str, ...] = (SECRET,)) -> io.StringIO:
    stream = io.StringIO()
    setup_logging("info", fmt, secrets=secrets, stream=stream)
    return stream


def output_lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def log_from_thread(logger: logging.Logger, name: str, msg: str,
                    extra: Mapping[str, object]) -> None:
    thread = threading.Thread(target=lambda: logger.info(msg, extra=extra), name=name)
    thread.start()
    thread.join()


TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


# --- formats ----------------------------------------------------------------------------

def test_kv_line() -> None:
    stream = configure("kv")
    log_from_thread(logging.getLogger("ms1.sender"), "sender-1", "batch sent", extra=EXTRA)
    [line] = output_lines(stream)
    assert re.fullmatch(
        rf'ts={TS} level=INFO logger=ms1\.sender thread=sender-1 msg="batch sent" '
        r"batch=ab12 size=50 status=202 attempt=1 latency_ms=12\.346", line), line


def test_kv_quoting_and_values() -> None:
    stream = configure("kv")
    logging.getLogger("ms1.x").warning(
        "done", extra={"note": 'say "hi" a=b', "empty": "", "none": None, "flag": True,
                       "whole": 2.0, "path": r"C:\tmp", "ts": "mine"})
    [line] = output_lines(stream)
    assert " msg=done " in line
    assert line.endswith(r' note="say \"hi\" a=b" empty="" none=null flag=true whole=2'
                         r' path="C:\\tmp" extra_ts=mine')
    assert " level=WARNING " in line


def test_json_line() -> None:
    stream = configure("json")
    log_from_thread(logging.getLogger("ms1.sender"), "sender-1", "batch sent", extra=EXTRA)
    [line] = output_lines(stream)
    obj = json.loads(line)
    assert list(obj) == ["ts", "level", "logger", "thread", "msg", *EXTRA]
    assert re.fullmatch(TS, obj["ts"])
    assert obj["level"] == "INFO"
    assert obj["logger"] == "ms1.sender"
    assert obj["thread"] == "sender-1"
    assert obj["msg"] == "batch sent"
    assert {k: obj[k] for k in EXTRA} == EXTRA


def test_json_odd_values() -> None:
    stream = configure("json")
    logging.getLogger("ms1").info("x", extra={"obj": object(), "nan": float("nan")})
    obj = json.loads(output_lines(stream)[0])
    assert obj["obj"].startswith("<object object")
    assert obj["nan"] == "nan"


def test_text_line() -> None:
    stream = configure("text")
    log_from_thread(logging.getLogger("ms1.sender"), "sender-1", "batch sent", extra=EXTRA)
    [line] = output_lines(stream)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ms1\.sender \[sender-1\] batch sent "
        r"batch=ab12 size=50 status=202 attempt=1 latency_ms=12\.346", line), line


def test_text_without_extras_has_no_trailing_space() -> None:
    stream = configure("text")
    logging.getLogger("ms1").info("plain")
    assert stream.getvalue().endswith("] plain\n")


def raise_and_log(logger: logging.Logger, secret: str = "nothing") -> None:
    try:
        raise ValueError(f"bad key {secret}\nsecond line")
    except ValueError:
        logger.exception("multi\nline %s", "message", extra={"batch": "ab12"})


def test_kv_one_line_with_multiline_message_and_exception() -> None:
    stream = configure("kv")
    raise_and_log(logging.getLogger("ms1.sender"))
    [line] = output_lines(stream)
    assert ' msg="multi\\nline message" batch=ab12 exc="Traceback (most recent call last):\\n' \
        in line
    assert line.endswith('ValueError: bad key nothing\\nsecond line"')
    assert " level=ERROR " in line


def test_json_one_line_with_multiline_message_and_exception() -> None:
    stream = configure("json")
    raise_and_log(logging.getLogger("ms1.sender"))
    [line] = output_lines(stream)
    obj = json.loads(line)
    assert obj["msg"] == "multi\nline message"
    assert list(obj)[-2:] == ["batch", "exc"]
    assert obj["exc"].startswith("Traceback (most recent call last):\n")
    assert obj["exc"].endswith("ValueError: bad key nothing\nsecond line")


def test_stack_info_is_kept_on_one_line() -> None:
    stream = configure("kv")
    logging.getLogger("ms1").info("where", stack_info=True)
    [line] = output_lines(stream)
    assert ' stack="Stack (most recent call last):\\n' in line


def test_control_characters_are_escaped_in_kv() -> None:
    stream = configure("kv")
    logging.getLogger("ms1").info("a\rb\x1bc\u2028d\te")
    [line] = output_lines(stream)
    assert line.endswith(r' msg="a\rb\u001bc\u2028d\te"')


def test_setup_replaces_handlers_and_sets_levels() -> None:
    root = logging.getLogger()
    root.addHandler(logging.NullHandler())
    configure("text")
    setup_logging("DEBUG", "json", stream=io.StringIO())
    assert len(root.handlers) == 1
    assert root.level == logging.DEBUG
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING


def test_level_filters_records() -> None:
    stream = io.StringIO()
    setup_logging("WARNING", "kv", stream=stream)
    logging.getLogger("ms1").info("hidden")
    logging.getLogger("ms1").warning("shown")
    assert [line.split("msg=")[1] for line in output_lines(stream)] == ["shown"]


def test_bad_level_or_format() -> None:
    with pytest.raises(ValueError, match="level"):
        setup_logging("LOUD", stream=io.StringIO())
    with pytest.raises(ValueError, match="format"):
        setup_logging("INFO", "xml", stream=io.StringIO())


def test_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "kv")
    logging.getLogger("ms1").info("to stderr")
    assert "msg=\"to stderr\"" in capsys.readouterr().err


# --- secrets ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_secret_never_in_output(fmt: str) -> None:
    stream = configure(fmt)
    log = logging.getLogger("ms1.sender")
    log.info(f"key is {SECRET}")
    log.info("key is %s and %r", SECRET, {"api_key": SECRET})
    log.info("in extras", extra={"key": SECRET, "url": f"https://u:{SECRET}@h/",
                                 "headers": {"Authorization": f"Bearer {SECRET}"}})
    raise_and_log(log, SECRET)
    log.warning("stack", stack_info=True, extra={"n": 1})
    out = stream.getvalue()
    assert SECRET not in out
    assert out.count("***") >= 7
    assert "Bearer ***" in out
    if fmt != "text":
        assert len(output_lines(stream)) == 5


def test_url_quoted_secret_is_redacted() -> None:
    secret = "p@ss/word+1"
    stream = configure("kv", secrets=(secret,))
    logging.getLogger("ms1").info("redis://:p%40ss%2Fword%2B1@localhost and p@ss/word+1")
    assert stream.getvalue().count("***") == 2
    assert "word" not in stream.getvalue()


def test_add_secret_after_setup() -> None:
    stream = configure("kv", secrets=())
    new_key = "rotated-key-0042"
    log = logging.getLogger("ms1.pipeline.sending.pacer")
    log.info("before %s", new_key)
    add_secret(new_key)
    log.info("after %s", new_key)
    before, after = output_lines(stream)
    assert new_key in before
    assert new_key not in after
    assert 'msg="after ***"' in after


def test_add_secret_before_setup_is_kept() -> None:
    add_secret("early-secret")
    stream = configure("kv", secrets=())
    logging.getLogger("ms1").info("early-secret")
    assert "early-secret" not in stream.getvalue()


def test_short_strings_are_not_secrets() -> None:
    stream = configure("kv", secrets=("abc", "", "a", "abcd"))
    logging.getLogger("ms1").info("abc a b abcde")
    add_secret("xyz")
    logging.getLogger("ms1").info("xyz")
    first, second = output_lines(stream)
    assert first.endswith('msg="abc a b ***e"')
    assert second.endswith("msg=xyz")


def test_longest_secret_wins() -> None:
    flt = RedactingFilter(["abcd", "abcdefgh"])
    assert flt.redact("xx abcdefgh yy abcd") == "xx *** yy ***"


def test_filter_never_raises_and_keeps_broken_args() -> None:
    flt = RedactingFilter([SECRET])
    record = logging.LogRecord("ms1", logging.INFO, __file__, 1, "%d items %s", ("x", SECRET),
                               None)
    assert flt.filter(record) is True
    assert SECRET not in record.getMessage()
    assert "%d items" in record.getMessage()
    assert record.args == ()


def test_filter_handles_percent_in_redacted_message() -> None:
    stream = configure("kv")
    logging.getLogger("ms1").info("100%% of %s", SECRET)
    assert 'msg="100% of ***"' in stream.getvalue()


def test_formatters_work_without_the_filter() -> None:
    try:
        raise RuntimeError("plain")
    except RuntimeError:
        record = logging.getLogger("ms1").makeRecord(
            "ms1", logging.ERROR, __file__, 1, "oops %s", ("x",), exc_info=sys.exc_info(),
            extra={"k": "v w"})
    kv = KeyValueFormatter().format(record)
    assert 'msg="oops x" k="v w" exc="Traceback' in kv
    obj = json.loads(JsonFormatter().format(record))
    assert obj["exc"].endswith("RuntimeError: plain")



# --- issue 11: a logged value cannot forge a log line -----------------------------------------

FORGED = "2026-11-24 10:00:00,000 ERROR ms1.sender [sender-1] FORGED batch lost"
TEXT_HEADER = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_text_message_control_characters_are_escaped() -> None:
    stream = configure("text")
    logging.getLogger("ms1").warning("rejected %s", f"<id>\r\n{FORGED}\x1b[2J\u2028x\x00")
    [line] = output_lines(stream)
    assert line.endswith(r"rejected <id>\r\n" + FORGED + r"\u001b[2J\u2028x\u0000")


def test_text_traceback_continuation_lines_are_prefixed() -> None:
    stream = configure("text")
    try:
        raise ValueError(f"bad\n{FORGED}\rmore")
    except ValueError:
        logging.getLogger("ms1").exception("failed %s", "x", stack_info=True)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("] failed x")
    assert rest and all(line.startswith(" | ") for line in rest), rest
    assert f" | {FORGED}\\rmore" in rest
    assert " | Traceback (most recent call last):" in rest
    assert " | Stack (most recent call last):" in rest


@pytest.mark.parametrize("fmt", FORMATS := logs.FORMATS)
def test_rejected_email_cannot_forge_a_log_line(fmt: str, tmp_path) -> None:
    import os
    import subprocess

    mail = {"message_id": f"<forged@x>\n{FORGED}\r\n{FORGED}", "received_at":
            "2025-11-01T09:30:00Z", "sender": "a@b.example", "subject": "s",
            "raw_json": {"invoice_id": ""}}
    (tmp_path / "in.jsonl").write_text(json.dumps(mail) + "\n")
    config = tmp_path / "ms1.ini"
    config.write_text(f"[ms1]\nlog_format = {fmt}\nonce_timeout = 10\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), "--once",
                           str(tmp_path / "in.jsonl")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("rejected" in line and "FORGED" in line for line in lines), proc.stderr
    for line in lines:
        assert not line.startswith(FORGED), proc.stderr
        if fmt == "text":
            assert TEXT_HEADER.match(line) or line.startswith(" | "), line
        elif fmt == "kv":
            assert line.startswith("ts="), line
        else:
            assert json.loads(line)["level"], line
