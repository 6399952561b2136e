"""Issue 22, "a CLI and config you can trust": each surprise a new user met, reproduced.

* ``ms1-service --config F statsu`` (a typo) started the service in the foreground with
  "input file statsu skipped": now exit 2 naming the unknown command;
* ``ms1-service check --config F`` was a usage error: global options now follow the
  subcommand too;
* ``check`` exited 0 for configs ``run`` refuses (an unset API-key variable, an unset
  ``password_env``): it now builds what run builds before it starts;
* inline comments were kept in values (the README's Cluster snippet failed, ``check``'s own
  output did not load): ``;`` after whitespace now starts a comment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each a subprocess

def ms1(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items()
               if key not in ("MS1_MS4_API_KEY", "MS1_CONFIG")}
    return subprocess.run([sys.executable, "-m", "ms1.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**environ, **(env or {})},
                          cwd=cwd)


def memory_ini(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ms1.ini"
    path.write_text("[queue]\nbackend = memory\n[ms4]\ntransport = memory\n" + extra)
    return path


def test_an_unknown_command_exits_2_naming_it(tmp_path: Path) -> None:
    result = ms1("--config", str(memory_ini(tmp_path)), "statsu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "unknown command 'statsu'" in result.stderr and "status" in result.stderr


def test_global_options_may_follow_the_subcommand(tmp_path: Path) -> None:
    config = memory_ini(tmp_path)
    result = ms1("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"effective configuration from {config}" in result.stdout


@pytest.mark.parametrize(("extra", "said"), [
    ("[ms4]\ntransport = http\n", "[ms4] api_key_env: the http transport needs an API key"),
    ("[redis]\npassword_env = MS1_TEST_UNSET_PASSWORD\n[queue]\nbackend = redis\n",
     "[redis] password_env: $MS1_TEST_UNSET_PASSWORD is not set")])
def test_check_refuses_what_run_refuses(tmp_path: Path, extra: str, said: str) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text("[ms4]\ntransport = memory\n" + extra if "[ms4]" not in extra
                      else "[queue]\nbackend = memory\n" + extra)
    checked = ms1("--config", str(config), "check")
    assert checked.returncode == 2, checked.stdout
    assert said in checked.stderr and str(config) in checked.stderr


def test_inline_comments_are_stripped_and_checks_output_loads(tmp_path: Path) -> None:
    config = memory_ini(tmp_path, "[batch]\nmax_wait = 0.5   ; half a second\n"
                                  "max_items = 20 ; a smaller batch\n")
    checked = ms1("--config", str(config), "check")
    assert checked.returncode == 0, checked.stderr
    again = tmp_path / "again.ini"
    again.write_text(checked.stdout)  # check's own output, comments and all
    reloaded = ms1("--config", str(again), "check")
    assert reloaded.returncode == 0, reloaded.stderr

    def values(text: str) -> list[str]:  # key = value, without the "; default" remark
        return [line.split(";", 1)[0].rstrip() for line in text.splitlines()
                if " = " in line and not line.startswith("#")]

    assert values(reloaded.stdout) == values(checked.stdout)
    assert "max_wait = 0.5" in values(checked.stdout)
    assert "max_items = 20" in values(checked.stdout)
