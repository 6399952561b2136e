"""Config loading: every bad-config case exits 2 with one line naming file, section, key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ms1.cli import command as cli
from ms1.config import Secret


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(args)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        ("[nosuch]\nx = 1\n", "[nosuch]: unknown section (known sections: batch, "),
        ("[batch]\nmax_itemz = 5\n", "[batch] max_itemz: unknown key (known keys: max_bytes, "
                                     "max_items, max_wait, policy)"),
        ("[batch]\nmax_items = many\n", "[batch] max_items: expected an integer, got 'many'"),
        ("[batch]\nmax_items = 0\n", "[batch] max_items: must be between 1 and 1000, got 0"),
        ("[batch]\nmax_items = 1001\n", "[batch] max_items: must be between 1 and 1000"),
        ("[batch]\nmax_wait = soon\n", "[batch] max_wait: expected a number, got 'soon'"),
        ("[batch]\nmax_wait = -1\n", "[batch] max_wait: must be between 0 and 3600, got -1"),
        ("[batch]\nmax_wait = nan\n", "[batch] max_wait: expected a finite number"),
        ("[send]\nthreads = 2.5\n", "[send] threads: expected an integer, got '2.5'"),
        ("[ms1]\nlog_level = LOUD\n", "[ms1] log_level: expected one of DEBUG, INFO, WARNING"),
        ("[batch]\nmax_items = 5\nmax_items = 6\n", "[batch] max_items: line 3: key appears "
                                                    "twice"),
        ("[batch]\n[batch]\n", "[batch]: line 2: section appears twice"),
        ("max_items = 5\n", "line 1: key outside any [section]"),
        ("[ms4]\napi_key = hunter2\n", "[ms4] api_key: the API key is never read from the INI"),
        ("[queue]\nbackend = kafka\n", "[queue] backend: no installed plugin provides queue "
                                       "'kafka'; installed: auto, memory, redis"),
        ("[batch]\npolicy = bulk\n", "[batch] policy: no installed plugin provides batch policy "
                                     "'bulk'; installed: batch, unit"),
        ("[source]\nname = imap\n", "[source] name: no installed plugin provides source 'imap';"
                                    " installed: files, memory, redis"),
        ("[ms4]\ntransport = smtp\n", "[ms4] transport: no installed plugin provides transport "
                                      "'smtp'; installed: "),
    ],
)
def test_bad_config_exits_2_naming_file_section_key(
    ini: str, expected: str, write_config, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(ini)
    status, out, err = run_cli(["--config", str(path), "check"], capsys)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ms1-service: {path}: ")
    assert expected in lines[0]


def test_secret_value_never_echoed_in_errors(write_config, capsys) -> None:
    path = write_config("[ms4]\napi_key = hunter2-secret\n")
    status, out, err = run_cli(["--config", str(path), "check"], capsys)
    assert status == 2
    assert "hunter2-secret" not in err + out


def test_missing_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.ini"
    status, _, err = run_cli(["--config", str(missing), "check"], capsys)
    assert status == 2
    assert err.strip() == f"ms1-service: {missing}: config file not found"


def test_no_config_given(capsys, monkeypatch) -> None:
    monkeypatch.delenv("MS1_CONFIG", raising=False)
    status, _, err = run_cli(["check"], capsys)
    assert status == 2
    assert "no config file" in err


def test_unreadable_key_file(write_config, tmp_path: Path, capsys) -> None:
    path = write_config(f"[ms4]\napi_key_file = {tmp_path / 'missing.key'}\n")
    status, _, err = run_cli(["--config", str(path), "check"], capsys)
    assert status == 2
    assert "[ms4] api_key_file: cannot read API key file" in err


def test_empty_key_file(write_config, tmp_path: Path, capsys) -> None:
    key = tmp_path / "ms4.key"
    key.write_text("\n")
    path = write_config(f"[ms4]\napi_key_file = {key}\n")
    status, _, err = run_cli(["--config", str(path), "check"], capsys)
    assert status == 2
    assert "[ms4] api_key_file: API key file" in err and "is empty" in err


def test_check_prints_effective_config_with_key_redacted(write_config, capsys, monkeypatch
                                                         ) -> None:
    monkeypatch.setenv("OUR_KEY", "s3cr3t-value-123")
    path = write_config("[ms4]\napi_key_env = OUR_KEY\n[batch]\nmax_items = 20\n")
    status, out, err = run_cli(["--config", str(path), "check"], capsys)
    assert status == 0, err
    assert "s3cr3t-value-123" not in out + err
    assert "# MS4 API key: set from $OUR_KEY (value redacted)" in out
    assert "max_items = 20\n" in out
    assert "max_wait = 1.0  ; default" in out
    assert "[source.files]" in out  # plugin-declared section is part of the schema


def test_key_file_wins_over_environment(make_config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "from-env")
    key = tmp_path / "k"
    key.write_text("from-file\n")
    config = make_config(f"[ms4]\napi_key_file = {key}\n")
    assert config.api_key == Secret("from-file")
    assert config.api_key is not None and config.api_key.reveal() == "from-file"
    assert "from-file" not in repr(config) + repr(config.api_key) + str(config.api_key)


def test_key_from_environment(make_config, monkeypatch) -> None:
    monkeypatch.setenv("MS1_MS4_API_KEY", "  env-key \n")
    config = make_config("")
    assert config.api_key is not None
    assert config.api_key.reveal() == "env-key"
    assert config.api_key.origin == "$MS1_MS4_API_KEY"


def test_typed_values_and_defaults(make_config) -> None:
    config = make_config("[batch]\nmax_items = 1_000\nmax_wait = 0.25\n[ms1]\nlog_level = debug\n")
    assert config.get_int("batch", "max_items") == 1000
    assert config.get_float("batch", "max_wait") == 0.25
    assert config.get_str("ms1", "log_level") == "DEBUG"
    assert config.get_int("batch", "max_bytes") == 1_048_576
    assert ("batch", "max_items") in config.explicit
    assert ("batch", "max_bytes") not in config.explicit


@pytest.mark.parametrize("name", ["dev.ini", "prod.ini"])
def test_shipped_configs_are_valid_and_every_key_is_commented(name: str, pm) -> None:
    from ms1.runtime import pluginmanager

    path = Path(__file__).parent.parent / "conf" / name
    pluginmanager.load(pm, str(path))
    above = ""
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        is_key = bool(line) and not line.startswith(("#", "[", " ")) and "=" in line
        if is_key:
            assert above.startswith("#"), f"{name}:{lineno} key without a comment: {line}"
        elif line.strip():
            above = line


def test_console_script_exit_status(write_config) -> None:
    path = write_config("[batch]\nmax_items = x\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(path), "check"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"ms1-service: {path}: [batch] max_items: expected an "
                                   "integer, got 'x'")


# --- issue 11: check refuses what run refuses, in one line (exit 2) -------------------------

def run_once(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MS1_MS4_API_KEY": "test-key-0001"}
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(path), "--once"],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=path.parent)


ONCE = "[ms1]\nonce_timeout = 5\nshutdown_timeout = 1\n[source.files]\nsample_count = 2\n"
HTTP = "[ms4]\ntransport = http\n"
REFUSED_AT_LOAD = [
    (HTTP + "[transport.http]\nbase_url =\n",
     "[transport.http] base_url: expected a URL, got nothing"),
    (HTTP + "[transport.http]\nbase_url = ms4.example:8404\n",
     "[transport.http] base_url: expected an http:// or https:// URL, got 'ms4.example:8404'"),
    (HTTP + "[transport.http]\nbase_url = ftp://u:pw-9@ms4.example\n",
     "[transport.http] base_url: expected an http:// or https:// URL, got "
     "'ftp://u:***@ms4.example'"),
    (HTTP + "[transport.http]\nbase_url = https:///path\n",
     "[transport.http] base_url: the URL has no host: 'https:///path'"),
    ("[metrics]\naddress = :99999\n",
     "[metrics] address: the port must be between 1 and 65535, got ':99999'"),
    ("[metrics]\naddress = 127.0.0.1:-1\n",
     "[metrics] address: the port must be between 1 and 65535, got '127.0.0.1:-1'"),
    ("[metrics]\naddress = abc\n",
     "[metrics] address: expected host:port (e.g. 127.0.0.1:9464), got 'abc'"),
    ("[metrics]\naddress = my host:9464\n",
     "[metrics] address: not a host name or IP address: 'my host'"),
    ("[queue]\nbackend = redis\n[redis]\nurl = redis://u:p@[::1\n",
     "[redis] url: not a valid URL (Invalid IPv6 URL): 'redis://u:***@[::1'"),
    ("[queue]\nbackend = redis\n[redis]\nurl = http://127.0.0.1:6379/0\n",
     "[redis] url: expected a redis://, rediss:// or unix:// URL, got "
     "'http://127.0.0.1:6379/0'"),
    ("[queue]\nbackend = redis\n[redis]\nurl = redis://127.0.0.1:6379/0?db=x\n",
     "[redis] url: Invalid value for 'db' in connection URL."),
]


@pytest.mark.parametrize(("ini", "expected"), REFUSED_AT_LOAD,
                         ids=[f"{i}-{e.split(':')[0]}" for i, (_, e) in
                              enumerate(REFUSED_AT_LOAD)])
def test_check_refuses_what_run_refuses_in_one_line(
    ini: str, expected: str, write_config, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(ONCE + ini)
    status, out, err = run_cli(["--config", str(path), "check"], capsys)
    assert (status, out) == (2, ""), out + err
    assert err == f"ms1-service: {path}: {expected}\n"
    proc = run_once(path)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == f"ms1-service: {path}: {expected}\n"


@pytest.mark.parametrize("url", ["unix:///run/redis/redis.sock?db=0", "unix:///tmp/r.sock",
                                 "rediss://:pw@redis.example:6380/1", "redis://[::1]:6379/0",
                                 "redis://localhost"])
def test_check_accepts_redis_urls_redis_py_accepts(url: str, make_config) -> None:
    config = make_config(f"[redis]\nurl = {url}\n")
    assert config.get_str("redis", "url") == url


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)),
     ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:65535", ("::1", 65535)),
     ("metrics.local:9464", ("metrics.local", 9464)), ("", None)],
)
def test_metrics_address_is_parsed_at_load(address: str, expected, make_config) -> None:
    config = make_config(f"[metrics]\naddress = {address}\n")
    assert config.get_address("metrics", "address") == expected
    assert config.get_str("metrics", "address") == address


# --- issue 11: source = redis needs a durable queue and durable dead letters ----------------

REDIS_SOURCE = "[source]\nname = redis\n"


@pytest.mark.parametrize(
    ("ini", "named"),
    [
        ("[queue]\nbackend = memory\n[dead_letters]\nbackend = redis\n",
         "[queue] backend = memory"),
        ("[queue]\nbackend = auto\n[dead_letters]\nbackend = redis\n",
         "[queue] backend = auto"),
        ("[queue]\nbackend = redis\n[dead_letters]\nbackend = memory\n",
         "[dead_letters] backend = memory"),
        ("[queue]\nbackend = memory\n[dead_letters]\nbackend = memory\n",
         "[queue] backend = memory and [dead_letters] backend = memory"),
    ],
)
def test_redis_source_refuses_volatile_backends(
    ini: str, named: str, write_config, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(REDIS_SOURCE + ini)
    status, out, err = run_cli(["--config", str(path), "check"], capsys)
    assert (status, out) == (2, "")
    assert err == (f"ms1-service: {path}: [source] name: source 'redis' acknowledges "
                   f"inbound entries, but {named} would hold them in memory only (lost "
                   "when ms1 stops): use durable backends, or set [source] allow_volatile "
                   "= yes\n")
    proc = run_once(path, timeout=30)
    assert (proc.returncode, proc.stderr) == (2, err)


def test_allow_volatile_accepts_memory_backends(make_config) -> None:
    config = make_config("[source]\nname = redis\nallow_volatile = yes\n"
                         "[queue]\nbackend = memory\n[dead_letters]\nbackend = memory\n")
    assert config.get_bool("source", "allow_volatile") is True


def test_durable_and_non_acking_combinations_load(make_config) -> None:
    make_config(REDIS_SOURCE + "[queue]\nbackend = redis\n[dead_letters]\nbackend = redis\n")
    make_config(REDIS_SOURCE + "[queue]\nbackend = redis\n[dead_letters]\nbackend = jsonl\n")
    make_config("[source]\nname = files\n[queue]\nbackend = memory\n")  # nothing to ack


def test_third_party_backends_count_as_durable(write_config) -> None:
    from ms1.hookspecs import hookimpl
    from ms1.runtime import pluginmanager

    class Kafka:
        @hookimpl
        def ms1_components(self) -> list[tuple[str, str]]:
            return [("queue", "kafka"), ("dead_letters", "kafka")]

    pm = pluginmanager.make_plugin_manager(plugins=[Kafka()])
    path = write_config(REDIS_SOURCE + "[queue]\nbackend = kafka\n[dead_letters]\n"
                        "backend = kafka\n")
    assert pluginmanager.load(pm, str(path)).get_str("queue", "backend") == "kafka"
