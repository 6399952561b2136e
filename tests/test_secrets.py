"""Issue 11: nothing a config can do shows a secret — not ``check``, not a log line (any
format), not an error, not a repr; and a secret is found in every form it can take
(plain, ``repr()``, bytes repr with escapes, percent-encoded in a URL)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port
from support import logging_restored

from ms1 import redaction
from ms1.cli import command as cli
from ms1.config import Config, Secret
from ms1.errors import ConfigError, QueueError, TransportError
from ms1.ops import logs

API_KEY = "sk-live-Q7w8e9r0t1y2"
REDIS_PASSWORD = "r3d!s-P@ss/word"  # needs percent-encoding in a URL
QUERY_PASSWORD = "QueryPw-5566"
BASE_PASSWORD = "BasePw-7788"


def forms(secret: str) -> list[str]:
    """Every way a secret can be written out: plain, repr, bytes repr, JSON, URL-quoted,
    and each line of a multi-line one."""
    found = {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1],
             json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""),
             urllib.parse.quote(secret), urllib.parse.quote_plus(secret)}
    found.update(line.strip() for line in secret.splitlines() if len(line.strip()) >= 4)
    return sorted(found)


def assert_nowhere(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"secret form {form!r} leaked in:\n{text}"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def ms1(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "MS1_MS4_API_KEY"}
    full.update({"PYTHONWARNINGS": "ignore", **(env or {})})
    return subprocess.run([sys.executable, "-m", "ms1.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=full)


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["--config", str(path), "check"])
    out, err = capsys.readouterr()
    return status, out, err


# --- check ----------------------------------------------------------------------------------

def test_check_hides_redis_url_password(write_config, capsys) -> None:
    quoted = urllib.parse.quote(REDIS_PASSWORD, safe="")
    path = write_config(f"[redis]\nurl = redis://ms1:{quoted}@127.0.0.1:6379/0\n")
    status, out, err = check(path, capsys)
    assert status == 0, err
    assert "url = redis://ms1:***@127.0.0.1:6379/0\n" in out
    assert_nowhere(out + err, REDIS_PASSWORD)


def test_check_hides_url_query_passwords(write_config, capsys) -> None:
    path = write_config(f"[redis]\nurl = redis://127.0.0.1:6379/0?db=0&Password="
                        f"{QUERY_PASSWORD}\n")
    status, out, err = check(path, capsys)
    assert status == 0, err
    assert "url = redis://127.0.0.1:6379/0?db=0&Password=***\n" in out
    assert_nowhere(out + err, QUERY_PASSWORD)


def test_check_hides_base_url_credentials(write_config, capsys) -> None:
    path = write_config(f"[transport.http]\nbase_url = https://ms1:{BASE_PASSWORD}@ms4.example\n")
    status, out, err = check(path, capsys)
    assert status == 0, err
    assert "base_url = https://ms1:***@ms4.example\n" in out
    assert_nowhere(out + err, BASE_PASSWORD)


def test_key_before_any_section_is_not_echoed(write_config, capsys) -> None:
    path = write_config(f"api_key = {API_KEY}\n[ms4]\ntransport = memory\n")
    status, out, err = check(path, capsys)
    assert status == 2
    assert err == f"ms1-service: {path}: line 1: key outside any [section] (file content " \
                  "before the first section header is not shown)\n"
    assert_nowhere(out + err, API_KEY)


def test_a_line_that_is_no_key_is_not_echoed(write_config, capsys) -> None:
    path = write_config(f"[ms4]\ntransport = memory\n{API_KEY}\n")
    status, out, err = check(path, capsys)
    assert status == 2
    assert err.startswith(f"ms1-service: {path}: line 3: ") and err.count("\n") == 1
    assert_nowhere(out + err, API_KEY)


# --- key files and keys ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"{API_KEY}\nsecond-line-of-the-key\n".encode(), "holds more than one line"),
        (f"{API_KEY}\r\nsecond-line-of-the-key".encode(), "holds more than one line"),
        (f"{API_KEY}é".encode(), "holds a character that is not visible ASCII"),
        (f"{API_KEY} with spaces".encode(), "holds a character that is not visible ASCII"),
        (f"{API_KEY}\x00".encode(), "holds a character that is not visible ASCII"),
        (API_KEY.encode() + b"\xff\xfe", "is not UTF-8 text"),
    ],
    ids=["two-lines", "crlf-two-lines", "non-ascii", "space", "nul", "not-utf8"],
)
def test_bad_key_file_is_one_line_naming_the_file(
    content: bytes, problem: str, write_config, tmp_path: Path, capsys,
) -> None:
    key = tmp_path / "ms4.key"
    key.write_bytes(content)
    path = write_config(f"[ms4]\napi_key_file = {key}\n")
    status, out, err = check(path, capsys)
    assert status == 2
    assert out == ""
    assert err == f"ms1-service: {path}: [ms4] api_key_file: API key file '{key}' {problem} " \
                  "(content not shown)\n"
    assert_nowhere(out + err, API_KEY, content.decode("utf-8", "replace"))


def test_key_file_surrounding_whitespace_is_stripped(make_config, tmp_path: Path) -> None:
    key = tmp_path / "ms4.key"
    key.write_bytes(f"\n  {API_KEY}\t\r\n\n".encode())
    config = make_config(f"[ms4]\napi_key_file = {key}\n")
    assert config.api_key is not None and config.api_key.reveal() == API_KEY


def test_non_ascii_key_in_environment_is_refused_naming_the_variable(
    write_config, capsys, monkeypatch,
) -> None:
    monkeypatch.setenv("OUR_KEY", f"{API_KEY}ü")
    path = write_config("[ms4]\napi_key_env = OUR_KEY\n")
    status, out, err = check(path, capsys)
    assert status == 2
    assert err == f"ms1-service: {path}: [ms4] api_key_env: $OUR_KEY holds a character " \
                  "that is not visible ASCII (content not shown)\n"
    assert_nowhere(out + err, API_KEY)


def test_non_ascii_key_in_environment_stops_run_with_exit_2(write_config, tmp_path) -> None:
    """Before: the run started and the sender thread died on the header."""
    path = write_config("[ms4]\ntransport = http\n[ms1]\nonce_timeout = 5\n")
    proc = ms1(["--config", str(path), "--once"], tmp_path,
               env={"MS1_MS4_API_KEY": f"{API_KEY}ü"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"ms1-service: {path}: [ms4] api_key_env: $MS1_MS4_API_KEY " \
                          "holds a character that is not visible ASCII (content not shown)\n"
    assert_nowhere(proc.stdout + proc.stderr, API_KEY)


# --- one redaction --------------------------------------------------------------------------

TWO_LINE = f"{API_KEY}\nsecond-line-of-the-key"


@pytest.mark.parametrize("fmt", logs.FORMATS)
@pytest.mark.parametrize(
    "template",
    [
        "plain {s}",
        "repr {r}",
        "Invalid header value {b}",
        "Invalid header value {b2}",
        "quoted https://h/?x={q}",
        "in a URL redis://:{q}@h:6379/0",
    ],
)
def test_every_form_of_a_known_secret_is_redacted_in_logs(template: str, fmt: str) -> None:
    secret = Secret(TWO_LINE, "test")  # a Secret is known to the redaction from its start
    value = secret.reveal()
    message = template.format(s=value, r=repr(value), b=repr(value.encode()),
                              b2=repr(value.splitlines()[0].encode() + b"\n..."),
                              q=urllib.parse.quote(value, safe=""))
    stream = io.StringIO()
    logs.setup_logging("INFO", fmt, secrets=[value], stream=stream)
    log = logging.getLogger("ms1.test")
    log.warning(message)
    log.warning("args %s %r", value, value.encode(), extra={"field": value})
    try:
        raise ValueError(message)
    except ValueError:
        log.exception("failed")
    assert_nowhere(stream.getvalue(), value)


def test_errors_and_reprs_never_hold_a_secret() -> None:
    Secret(API_KEY, "test")
    url = f"redis://ms1:{urllib.parse.quote(REDIS_PASSWORD, safe='')}@h:6379/0?auth=" \
          f"{QUERY_PASSWORD}"
    errors = [QueueError(f"cannot read ({url}): {API_KEY!r}"),
              TransportError(f"bad {API_KEY.encode()!r}"),
              ConfigError(f"got {url!r}", path="x.ini", section="redis", key="url")]
    text = "\n".join(f"{e} {e!r} {e.args!r}" for e in errors)
    assert errors[2].problem == "got 'redis://ms1:***@h:6379/0?auth=***'"
    assert_nowhere(text, API_KEY, REDIS_PASSWORD, QUERY_PASSWORD)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://user:pw@host:6380/1", "redis://user:***@host:6380/1"),
        ("rediss://:pw@h/0", "rediss://:***@h/0"),
        ("https://token@h/x", "https://***@h/x"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("'http://u:p@ss@h/'", "'http://u:***@h/'"),
        ("x?password=a&db=0 y&PASS=b z?Auth=c;token=d", "x?password=***&db=0 y&PASS=*** "
                                                        "z?Auth=***;token=***"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        ("user:pw@ without a scheme", "user:pw@ without a scheme"),
        ("key=value", "key=value"),
    ],
)
def test_url_credentials_are_redacted_by_shape(text: str, expected: str) -> None:
    assert redaction.redact(text) == expected


# --- Redis error lines ----------------------------------------------------------------------

def test_redis_query_password_is_in_no_error_line(write_config, tmp_path: Path) -> None:
    """Before: ``?password=`` was kept in the URL every Redis error line names."""
    url = f"redis://127.0.0.1:{free_port()}/0?password={QUERY_PASSWORD}"
    path = write_config(f"[redis]\nurl = {url}\nconnect_timeout = 0.2\n[queue]\nbackend = redis\n"
                        "[dead_letters]\nbackend = redis\n")
    proc = ms1(["--config", str(path), "status"], tmp_path)
    assert proc.returncode == 1, proc.stderr  # (issue 21: status exits 1 when a part is unread)
    assert proc.stdout.count("(Redis at redis://127.0.0.1:") == 2, proc.stdout
    assert proc.stdout.count("password=***") == 2, proc.stdout
    assert_nowhere(proc.stdout + proc.stderr, QUERY_PASSWORD)


def test_redis_errors_hide_the_query_password(make_config: Callable[[str], Config]) -> None:
    from ms1_plugins.redis import link_for, translated

    url = f"redis://127.0.0.1:{free_port()}/0?password={QUERY_PASSWORD}"
    config = make_config(f"[redis]\nurl = {url}\nconnect_timeout = 0.2\n")
    link = link_for(config)
    try:
        with pytest.raises(QueueError) as caught, translated(QueueError, "ping", link):
            link.client.ping()
        assert_nowhere(f"{caught.value} {caught.value!r} {link.url}", QUERY_PASSWORD)
        assert link.url.endswith("?password=***")
    finally:
        link.release()


# --- the http transport ---------------------------------------------------------------------

def test_batch_failed_lines_hide_base_url_credentials(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every attempt fails with a connection error
    path = tmp_path / "ms1.ini"
    path.write_text(textwrap.dedent(f"""\
        [ms1]
        once_timeout = 2
        shutdown_timeout = 1
        [source.files]
        sample_count = 3
        sample_invalid_every = 0
        [send]
        retry_initial = 0.05
        retry_max = 0.1
        [ms4]
        transport = http
        [transport.http]
        base_url = http://ms1:{BASE_PASSWORD}@127.0.0.1:{port}
        connect_timeout = 0.5
        """))
    proc = ms1(["--config", str(path), "--once"], tmp_path,
               env={"MS1_MS4_API_KEY": API_KEY})
    assert proc.returncode == 1, proc.stderr
    assert "batch failed" in proc.stderr
    assert f"http://127.0.0.1:{port}" in proc.stderr
    assert_nowhere(proc.stdout + proc.stderr, BASE_PASSWORD, API_KEY)


def test_http_transport_repr_and_errors_hide_credentials() -> None:
    from ms1_plugins.http_transport import HttpTransport

    transport = HttpTransport(f"http://ms1:{BASE_PASSWORD}@127.0.0.1:{free_port()}",
                              connect_timeout=0.5)
    try:
        assert_nowhere(repr(transport) + transport.base_url, BASE_PASSWORD)
    finally:
        transport.close()
