"""Config loading: every bad-config case exits 2 with one line naming file, section, key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ms1 import cli
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
    from ms1 import pluginmanager

    path = Path(__file__).parent.parent / "conf" / name
    pluginmanager.load(pm, str(path))
    above = ""
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        is_key = bool(line) and not line.startswith(("#", "[", " ")) and "=" in line
        if is_key:
            assert above.startswith("#"), f"{name}:{lineno} key without a comment: {line}"
        elif line.strip():
            above = line


def test_readme_config_reference_lists_every_option(pm) -> None:
    from ms1 import pluginmanager

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [f"[{o.section}] {o.key}" for o in pluginmanager.all_options(pm)
               if f"`{o.key}`" not in readme.split(f"`[{o.section}]`", 1)[-1]]
    assert not missing, f"README config reference lacks: {missing}"


def test_console_script_exit_status(write_config) -> None:
    path = write_config("[batch]\nmax_items = x\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(path), "check"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"ms1-service: {path}: [batch] max_items: expected an "
                                   "integer, got 'x'")
