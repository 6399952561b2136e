"""Issue 22: installing, configuring and upgrading like real software.

* the operator's files ship in the package: ``ms1-service conf list | show | write``
  (before: only in a git clone; the unit hard-coded ``/opt/ms1/.venv/bin/ms1-service``
  and scored 3.7 in ``systemd-analyze security``);
* ``conf defaults`` prints a loadable INI; every option can be set from the environment
  (``MS1_<SECTION>_<KEY>``), and ``check`` says which values came from where;
* every ``ini`` snippet of the README loads; every flag has help;
* version 1.0.0, named in CHANGELOG.md; every stored entry carries its format.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pluggy
import pytest

from ms1 import __version__
from ms1.cli import command as cli
from ms1.config import Option, env_name, index_options, load_config
from ms1.errors import ConfigError
from ms1.ops import deploy
from ms1.runtime import pluginmanager

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


# --- the operator's files --------------------------------------------------------------

def test_conf_write_gives_every_operator_file_with_the_unit_made_for_this_install(
        tmp_path: Path) -> None:
    code, out, _ = run_cli("conf", "write", str(tmp_path / "etc"))
    assert code == 0
    for name in deploy.FILES:
        assert (tmp_path / "etc" / name).is_file(), name
        assert f"wrote {tmp_path / 'etc' / name}" in out
    unit = (tmp_path / "etc" / "ms1-service.service").read_text()
    assert "@" not in re.sub(r"@[a-z-]+", "", unit)  # placeholders all filled
    start = re.search(r"^ExecStart=(\S+) --config (\S+)$", unit, re.M)
    assert start is not None
    assert os.access(start.group(1), os.X_OK), start.group(1)
    assert start.group(2) == str(tmp_path / "etc" / "prod.ini")
    assert "/opt/ms1" not in unit
    # the INI templates load (with the variables they name)
    assert (tmp_path / "etc" / "prod.ini").read_text() == (ROOT / "conf" / "prod.ini").read_text()
    # an existing file is kept unless --force
    (tmp_path / "etc" / "dev.ini").write_text("# mine\n")
    code, out, _ = run_cli("conf", "write", str(tmp_path / "etc"))
    assert code == 0 and "kept" in out and (tmp_path / "etc" / "dev.ini").read_text() == "# mine\n"
    code, out, _ = run_cli("conf", "write", "--force", str(tmp_path / "etc"))
    assert code == 0 and (tmp_path / "etc" / "dev.ini").read_text() != "# mine\n"


def test_conf_list_and_show(tmp_path: Path) -> None:
    code, out, _ = run_cli("conf", "list")
    assert code == 0 and all(name in out for name in deploy.FILES)
    code, out, _ = run_cli("conf", "show", "alerts/ms1.rules.yml")
    assert code == 0 and out == (ROOT / "conf" / "alerts" / "ms1.rules.yml").read_text()
    code, _, err = run_cli("conf", "show", "nope.ini")
    assert code == 2 and "no operator file 'nope.ini'" in err and "prod.ini" in err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_written_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """``systemd-analyze security``: 3.7 before (ProtectClock, SystemCallFilter ...
    missing); the bound is 2.5."""
    assert run_cli("conf", "write", str(tmp_path))[0] == 0
    unit = tmp_path / "ms1-service.service"
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                if str(unit) in line or "ms1-service.service" in line]
    assert not problems, verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    print(f"\nsystemd-analyze security: {found.group(1)}")
    assert float(found.group(1)) <= 2.5


def _built(kind: str, out: Path) -> Path:
    """A wheel or sdist of this checkout, built offline with the installed setuptools, in
    a copy of the tree (a ``build/`` left by an earlier build would leak into the wheel)."""
    tree = out.parent / f"tree-{kind}"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "site", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    code = ("import sys; from setuptools import build_meta as b; "
            f"print(b.build_{kind}(sys.argv[1]))")
    built = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree,
                           capture_output=True, text=True, timeout=300, check=True)
    return out / built.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repo_writes_the_operator_files(tmp_path: Path) -> None:
    wheel = _built("wheel", tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    # issue 23: the simulator and the bench are a distribution of their own (tools/)
    assert not [n for n in names if "ms1_tools" in n or "sim" in Path(n).stem], names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ms4-sim" not in (site / entry_points).read_text()
    away = tmp_path / "elsewhere"
    away.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import ms1; "
            "from ms1.cli import command as cli; "
            "print(ms1.__file__); sys.exit(cli.main(['conf', 'write', 'etc']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=away, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(site))  # the wheel's ms1, not ours
    for name in deploy.FILES:
        assert (away / "etc" / name).is_file(), name


@pytest.mark.slow
def test_the_sdist_runs_its_tests(tmp_path: Path) -> None:
    sdist = _built("sdist", tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    (tree,) = (tmp_path / "src").iterdir()
    for needed in ("tests/conftest.py", "tests/support.py", "requirements/lock.txt",
                   "CHANGELOG.md", "ms1/ops/deploy/files/prod.ini"):
        assert (tree / needed).is_file(), needed
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider",
         "tests/test_config.py"], cwd=tree, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# --- options: defaults, environment, README snippets, help -------------------------------

def test_conf_defaults_prints_an_ini_that_loads_to_the_defaults(tmp_path: Path,
                                                               pm: pluggy.PluginManager) -> None:
    code, out, _ = run_cli("conf", "defaults")
    assert code == 0
    path = tmp_path / "defaults.ini"
    path.write_text(out)
    options = pluginmanager.all_options(pm)
    loaded = load_config(str(path), options, environ={})
    for (section, key), option in index_options(options).items():
        assert loaded.get(section, key) == option.default, (section, key)
        assert f"${env_name(section, key)}" in out
    # an option whose default applies only when set stays unset ([send] threads: set,
    # fixed concurrency; not set, adaptive)
    assert ("send", "threads") not in loaded.explicit


def test_an_option_set_from_the_environment_and_check_says_so(
        tmp_path: Path, pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ms1.ini"
    path.write_text("[queue]\nbackend = memory\n[ms4]\ntransport = memory\n"
                    "[send]\nrequests_per_minute = 100\n")
    monkeypatch.setenv("MS1_SEND_REQUESTS_PER_MINUTE", "90")
    monkeypatch.setenv("MS1_TRANSPORT_HTTP_CONNECT_TIMEOUT", "7")
    config = pluginmanager.load(pm, str(path))
    assert config.get_int("send", "requests_per_minute") == 90  # the environment wins
    assert config.get_float("transport.http", "connect_timeout") == 7
    code, out, _ = run_cli("check", "--config", str(path))
    assert code == 0
    assert "requests_per_minute = 90  ; from $MS1_SEND_REQUESTS_PER_MINUTE" in out
    assert "max_items = 50  ; default" in out
    assert re.search(r"^backend = memory$", out, re.M)  # the file's: no mark
    monkeypatch.setenv("MS1_SEND_REQUESTS_PER_MINUTE", "ninety")
    with pytest.raises(ConfigError) as caught:
        pluginmanager.load(pm, str(path))
    assert str(caught.value) == (f"{path}: [send] requests_per_minute: expected an integer, "
                                 "got 'ninety' (from $MS1_SEND_REQUESTS_PER_MINUTE)")


def test_two_options_sharing_one_variable_is_refused() -> None:
    options = [Option("transport.http", "x", "int", 1, "h"),
               Option("transport", "http_x", "int", 1, "h")]
    with pytest.raises(ValueError, match="MS1_TRANSPORT_HTTP_X"):
        index_options(options)


def test_a_hash_comment_after_a_value_is_named_in_the_refusal(tmp_path: Path) -> None:
    path = tmp_path / "ms1.ini"
    path.write_text("[batch]\nmax_items = 40   # fewer\n")
    with pytest.raises(ConfigError, match=r"max_items: .*an inline comment\? after a value "
                                          r"only ' ;' starts one"):
        load_config(str(path), environ={})


def _ini_snippets(text: str) -> list[str]:
    return re.findall(r"^```ini\n(.*?)^```", text, re.M | re.S)


def test_every_ini_snippet_of_the_readme_and_the_docs_loads(
        tmp_path: Path, pm: pluggy.PluginManager) -> None:
    """The README's Sentinel snippet passed check and then run failed; its Cluster
    snippet failed check (inline comments kept in values)."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    loaded = 0
    for document in documents:
        for n, snippet in enumerate(_ini_snippets(document.read_text())):
            if snippet.lstrip().startswith("[options."):  # a setup.cfg excerpt
                continue
            path = tmp_path / f"{document.stem}-{n}.ini"
            path.write_text(snippet)
            environ = {"MS1_REDIS_PASSWORD": "p", "MS1_MS4_API_KEY": "k"}
            load_config(str(path), pluginmanager.all_options(pm), environ=environ)
            loaded += 1
    assert loaded >= 2


def _actions(parser: argparse.ArgumentParser, where: str) -> list[tuple[str, Any]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((where, action))
    return found


def test_every_flag_and_argument_has_help() -> None:
    missing = [f"{where}: {action.dest}" for where, action in
               _actions(cli._parser(), "ms1-service") if not action.help]
    assert not missing


# --- releases ------------------------------------------------------------------------------

def test_the_version_is_1_0_or_later_and_the_changelog_names_it() -> None:
    code, out, _ = 0, "", ""
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(io.StringIO()) as o:
        cli.main(["--version"])
    code, out = int(exited.value.code or 0), o.getvalue()
    assert code == 0 and out.strip() == f"ms1 {__version__}"
    major = int(__version__.split(".")[0])
    assert major >= 1
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M)
    assert "## [Unreleased]" in changelog


def test_checks_output_loads_to_the_same_configuration(tmp_path: Path,
                                                       pm: pluggy.PluginManager) -> None:
    """check's output is itself a config: loaded, it gives the same values, and an option
    whose default applies only when set ([send] threads) stays unset — before, the
    printed ``threads = 4  ; default`` made a loaded copy run fixed at 4 senders."""
    path = tmp_path / "ms1.ini"
    path.write_text("[queue]\nbackend = memory\n[ms4]\ntransport = memory\n")
    code, out, _ = run_cli("check", "--config", str(path))
    assert code == 0 and ";threads = 4  ; not set: adaptive concurrency" in out
    again = tmp_path / "again.ini"
    again.write_text(out)
    first = pluginmanager.load(pm, str(path))
    second = pluginmanager.load(pm, str(again))
    assert first.changed(second) == []
    assert ("send", "threads") not in second.explicit
