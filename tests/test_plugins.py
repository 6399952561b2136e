"""Plugins: hookspecs are documented; a pip-installed third-party plugin is selected by name."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ms1 import hookspecs, pluginmanager

HERE = Path(__file__).parent
EXAMPLE = HERE / "plugin_dist" / "ms1-example-plugin"


def test_every_hook_is_documented_and_factories_are_firstresult() -> None:
    hooks = {name: fn for name, fn in vars(hookspecs).items()
             if name.startswith("ms1_") and callable(fn)}
    assert len(hooks) >= 12
    for name, fn in hooks.items():
        doc = inspect.getdoc(fn)
        assert doc and len(doc) > 40, f"{name} has no real docstring"
        opts = fn.ms1_spec
        assert opts["firstresult"] == name.startswith("ms1_make_"), name
        assert "firstresult" in doc if name.startswith("ms1_make_") else True
    for observer in ("ms1_batch_enqueued", "ms1_batch_sent", "ms1_batch_failed",
                     "ms1_payload_rejected"):
        assert observer in hooks


def test_builtins_come_through_the_entry_point_group() -> None:
    pm = pluginmanager.make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"memory", "files", "policies", "http", "redis"} <= names
    dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "ms1" in dists
    assert pluginmanager.installed(pm, "queue") == ["auto", "memory", "redis"]
    assert pluginmanager.installed(pm, "batch_policy") == ["batch", "unit"]


def test_no_plugin_manager_is_created_on_import() -> None:
    code = ("import sys, pluggy; import ms1.cli, ms1.service, ms1.hookspecs;"
            "import gc; print(sum(isinstance(o, pluggy.PluginManager) for o in gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "0"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed into its own directory like a real distribution."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(EXAMPLE)],
        check=True, timeout=300, capture_output=True)
    assert (target / "ms1_example_plugin.py").exists()
    return target


def run_service(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "ms1.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_third_party_plugin_selected_from_config(example_site: Path, tmp_path: Path) -> None:
    out = tmp_path / "sent.jsonl"
    config = tmp_path / "ms1.ini"
    config.write_text(f"[source.files]\nsample_count = 9\nsample_invalid_every = 0\n"
                      f"[batch]\npolicy = pairs\n[ms4]\ntransport = example\n"
                      f"[transport.example]\nout = {out}\n")
    proc = run_service(["--config", str(config), "--once"], example_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(line["body"]) for line in lines].count(2) == 4  # pairs: 4 x 2 + 1
    assert sorted(o["invoice_id"] for line in lines for o in line["body"]) == [
        f"INV-{i:07d}" for i in range(9)]
    assert proc.stdout.count("example-plugin saw batch") == 5  # its observer hook ran


def test_unknown_name_lists_installed_including_third_party(example_site: Path,
                                                            tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text("[ms4]\ntransport = carrier-pigeon\n")
    proc = run_service(["--config", str(config), "check"], example_site, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"ms1-service: {config}: [ms4] transport: no installed plugin provides transport "
        "'carrier-pigeon'; installed: example, http, memory")


def test_plugin_options_are_validated_like_core_ones(example_site: Path, tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text("[ms4]\ntransport = example\n[transport.example]\nstatus = 9000\n")
    proc = run_service(["--config", str(config), "check"], example_site, tmp_path)
    assert proc.returncode == 2
    assert "[transport.example] status: must be between 100 and 599, got 9000" in proc.stderr


def test_once_exits_1_and_says_what_is_left(example_site: Path, tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    config.write_text("[ms1]\nonce_timeout = 1\n[source.files]\nsample_count = 60\n"
                      "sample_invalid_every = 0\n[send]\nretry_initial = 0.05\n"
                      "[ms4]\ntransport = example\n[transport.example]\nstatus = 503\n")
    proc = run_service(["--config", str(config), "--once"], example_site, tmp_path)
    assert proc.returncode == 1
    assert "UNDELIVERED: 2 batches (60 invoices) still in in-memory queue 'memory'" in proc.stdout
