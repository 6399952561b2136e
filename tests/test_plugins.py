"""Plugins: hookspecs are documented; a pip-installed third-party plugin is selected by name."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from ms1 import hookspecs
from ms1.cli import command as cli
from ms1.config import Config
from ms1.errors import ConfigError, PluginError
from ms1.model import Batch, DeadLetter
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.pipeline.transport import MemoryTransport, Request, Response
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service

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
    code = ("import sys, pluggy; import ms1.cli.command, ms1.runtime.service, ms1.hookspecs;"
            "import gc; print(sum(isinstance(o, pluggy.PluginManager) for o in gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "0"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed into its own directory like a real distribution
    (built from a copy: pip builds in the source tree, which parallel workers share)."""
    target = tmp_path_factory.mktemp("site")
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("src") / EXAMPLE.name,
                             ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
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


# --- a misspelt or mis-signed hookimpl fails at start, naming plugin and hook --------------

class Misspelt:
    @hookspecs.hookimpl
    def ms1_batch_sentt(self, batch: Batch) -> None:  # the typo pluggy would ignore
        raise AssertionError("never called")


def test_misspelt_hookimpl_is_an_error_naming_plugin_and_hook() -> None:
    with pytest.raises(ConfigError) as caught:
        pluginmanager.make_plugin_manager(entry_points=False, plugins=[Misspelt()])
    message = str(caught.value)
    assert "\n" not in message
    assert "Misspelt" in message and "'ms1_batch_sentt'" in message
    assert "did you mean 'ms1_batch_sent'" in message


# --- observers are isolated: one failing plugin silences neither delivery nor the others ---

class Recorder:
    """Records every observer call (several threads call it: list.append is atomic)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @hookspecs.hookimpl
    def ms1_service_started(self, config: Config) -> None:
        self.calls.append(("started", None))

    @hookspecs.hookimpl
    def ms1_service_stopped(self) -> None:
        self.calls.append(("stopped", None))

    @hookspecs.hookimpl
    def ms1_batch_enqueued(self, batch: Batch) -> None:
        self.calls.append(("enqueued", batch.id))

    @hookspecs.hookimpl
    def ms1_batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        self.calls.append(("sent", batch.id))

    @hookspecs.hookimpl
    def ms1_batch_failed(self, batch: Batch, status: int | None, error: str, attempt: int,
                         will_retry: bool) -> None:
        self.calls.append(("failed", (batch.id, status)))

    @hookspecs.hookimpl
    def ms1_payload_rejected(self, letter: DeadLetter) -> None:
        self.calls.append(("rejected", letter.message_id))


class Broken:
    """Raises from every observer hook; registered last, so pluggy calls it first."""

    @hookspecs.hookimpl
    def ms1_service_started(self, config: Config) -> None:
        raise RuntimeError("broken plugin: started")

    @hookspecs.hookimpl
    def ms1_service_stopped(self) -> None:
        raise RuntimeError("broken plugin: stopped")

    @hookspecs.hookimpl
    def ms1_batch_enqueued(self, batch: Batch) -> None:
        raise RuntimeError("broken plugin: enqueued")

    @hookspecs.hookimpl
    def ms1_batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        raise RuntimeError("broken plugin: sent")

    @hookspecs.hookimpl
    def ms1_batch_failed(self, batch: Batch, status: int | None, error: str, attempt: int,
                         will_retry: bool) -> None:
        raise RuntimeError("broken plugin: failed")

    @hookspecs.hookimpl
    def ms1_payload_rejected(self, letter: DeadLetter) -> None:
        raise RuntimeError("broken plugin: rejected")


def test_a_failing_observer_neither_stops_delivery_nor_silences_the_others(
        write_config, caplog: pytest.LogCaptureFixture) -> None:
    recorder, broken = Recorder(), Broken()
    pm = pluginmanager.make_plugin_manager(plugins=[recorder, broken])
    config = pluginmanager.load(pm, str(write_config(
        "[send]\nthreads = 2\nretry_initial = 0.001\nretry_max = 0.01\n"
        "requests_per_minute = 1000000\n")))
    emails = list(samples.generate(200, invalid_every=10))
    ms4_calls = 0

    def ms4(request: Request) -> Response:  # the first request fails once: a retry
        nonlocal ms4_calls
        ms4_calls += 1
        return Response(503 if ms4_calls == 1 else 202)

    transport = MemoryTransport(ms4)
    parts = Components(source=MemorySource((s.data for s in emails), finite=True),
                       policy=SizeBatchPolicy(20, 1_048_576, max_wait=3600),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport)
    caplog.set_level(logging.ERROR)
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(timeout=60)

    assert summary.ok, summary.render()
    delivered = sorted(o["invoice_id"] for r in transport.accepted for o in json.loads(r.body))
    valid = [s for s in emails if s.valid]
    assert delivered == sorted(s.invoice_id for s in valid)
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds[-1] == "stopped"  # "started" comes once the threads run: not always first
    assert kinds.count("started") == kinds.count("stopped") == 1
    assert kinds.count("enqueued") == kinds.count("sent") == len(transport.accepted) == 9
    assert kinds.count("failed") == 1
    assert kinds.count("rejected") == len(emails) - len(valid) == 20
    # each failure logged once, naming the plugin and the hook
    failures = [r for r in caplog.records if r.exc_info and "Broken" in r.getMessage()]
    assert len(failures) == len(recorder.calls)
    assert sum("'ms1_batch_sent'" in r.getMessage() for r in failures) == 9


class MisSigned:
    @hookspecs.hookimpl
    def ms1_batch_sent(self, batch: Batch, colour: str) -> None:  # no such argument
        raise AssertionError("never called")


def test_hookimpl_asking_for_an_argument_the_hook_does_not_give_is_an_error() -> None:
    with pytest.raises(PluginError) as caught:
        pluginmanager.make_plugin_manager(entry_points=False, plugins=[MisSigned()])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("plugin 'test_plugins.MisSigned': hook 'ms1_batch_sent': ")
    assert "colour" in message and "ms1_batch_sent gives (batch, status, attempt, latency)" \
        in message


def test_an_observer_hook_cannot_be_a_wrapper() -> None:
    class Wrapping:
        @hookspecs.hookimpl(wrapper=True)
        def ms1_batch_sent(self, batch: Batch) -> Iterator[None]:
            yield

    with pytest.raises(PluginError, match="'ms1_batch_sent': an observer hook cannot be a "
                                          "wrapper"):
        pluginmanager.make_plugin_manager(entry_points=False, plugins=[Wrapping()])


def test_observers_are_called_in_pluggys_order() -> None:
    calls: list[str] = []

    def plugin(name: str, **opts: bool) -> object:
        class Plugin:
            @hookspecs.hookimpl(**opts)
            def ms1_service_stopped(self) -> None:
                calls.append(name)
        return Plugin()

    pm = pluginmanager.make_plugin_manager(entry_points=False, plugins=[
        plugin("last", trylast=True), plugin("a"), plugin("first", tryfirst=True), plugin("b")])
    pm.hook.ms1_service_stopped()
    pluggy_order, calls[:] = calls[:], []
    pluginmanager.Observers(pm).service_stopped()
    assert calls == pluggy_order == ["first", "b", "a", "last"]


def test_a_factory_building_the_wrong_type_is_an_error(write_config) -> None:
    class Wrong:
        @hookspecs.hookimpl
        def ms1_components(self) -> list[tuple[str, str]]:
            return [("queue", "wrong")]

        @hookspecs.hookimpl
        def ms1_make_queue(self, name: str) -> object:
            return object() if name == "wrong" else None

    pm = pluginmanager.make_plugin_manager(plugins=[Wrong()])
    config = pluginmanager.load(pm, str(write_config("[queue]\nbackend = wrong\n")))
    with pytest.raises(PluginError, match=r"\[queue\] backend: queue 'wrong' was built as "
                                          r"builtins.object, which is not a "
                                          r"ms1.pipeline.outbound.QueueBackend"):
        pluginmanager.build_queue(pm, config)


# --- blocking an installed plugin by name ---------------------------------------------------

def test_a_blocked_builtin_plugin_is_not_loaded() -> None:
    pm = pluginmanager.make_plugin_manager(blocked=["redis"])
    assert pm.get_plugin("redis") is None and pm.is_blocked("redis")
    assert pluginmanager.installed(pm, "queue") == ["memory"]
    assert pluginmanager.blocked_names(pm) == ["redis"]


def test_blocking_a_name_nothing_has_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    pm = pluginmanager.make_plugin_manager(blocked=["kafka"])
    assert pluginmanager.installed(pm, "queue") == ["auto", "memory", "redis"]
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith(
        "blocked plugin 'kafka' is not installed, nothing to block; installed plugins: ")
    assert record.getMessage().endswith(", ".join(pluginmanager.entry_point_names()))
    assert {"memory", "redis"} <= set(pluginmanager.entry_point_names())


@pytest.mark.parametrize("how", ["option", "env"])
def test_config_naming_a_blocked_plugins_component_exits_2(
        how: str, write_config, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config("[queue]\nbackend = redis\n")
    args = ["--config", str(path), "check"]
    if how == "option":
        args = ["--block-plugin", "redis", *args]
        monkeypatch.delenv(pluginmanager.BLOCK_ENV, raising=False)
    else:
        monkeypatch.setenv(pluginmanager.BLOCK_ENV, "redis")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"ms1-service: {path}: [queue] backend: no installed plugin provides queue "
                   "'redis'; installed: memory (blocked: redis)\n")


def test_check_runs_with_an_unused_plugin_blocked(
        write_config, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(pluginmanager.BLOCK_ENV, "http, files")
    path = write_config("[source]\nname = memory\n")
    assert cli.main(["--config", str(path), "--block-plugin=redis", "check"]) == 0
    sections = {line for line in capsys.readouterr().out.splitlines() if line.startswith("[")}
    assert "[queue]" in sections
    assert "[redis]" not in sections and "[transport.http]" not in sections


def test_block_plugin_goes_before_the_default_command(write_config) -> None:
    path = write_config("")
    assert cli._with_default_command(["--block-plugin", "redis", "--config", str(path),
                                      "--once"]) == [
        "--block-plugin", "redis", "--config", str(path), "run", "--once"]


def test_a_broken_plugin_stops_the_cli_with_one_line(
        write_config, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real = pluginmanager.make_plugin_manager

    def with_misspelt(**kwargs: Any) -> pluggy.PluginManager:
        return real(**kwargs, plugins=[Misspelt()])

    monkeypatch.setattr(pluginmanager, "make_plugin_manager", with_misspelt)
    path = write_config("")
    assert cli.main(["--config", str(path), "check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "ms1-service: plugin 'test_plugins.Misspelt': unknown hook 'ms1_batch_sentt' (did you "
        "mean 'ms1_batch_sent'?); ms1's hooks are documented in ms1/hookspecs.py\n")


def fake_dist(site: Path, module: str, code: str) -> Path:
    """A minimal installed distribution (a .dist-info with an ``ms1`` entry point), no pip."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(code)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ms1]\n{module} = {module}\n")
    return site


MISSPELT_PLUGIN = """
from ms1.hookspecs import hookimpl

@hookimpl
def ms1_payload_rejectd(letter):
    pass
"""

MISSIGNED_PLUGIN = """
from ms1.hookspecs import hookimpl

@hookimpl
def ms1_service_started(config, when):
    pass
"""


def test_installed_plugin_with_a_misspelt_hook_stops_the_start_until_blocked(
        tmp_path: Path) -> None:
    site = fake_dist(tmp_path / "site", "typo_plugin", MISSPELT_PLUGIN)
    config = tmp_path / "ms1.ini"
    config.write_text("")
    proc = run_service(["--config", str(config), "check"], site, tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "ms1-service: plugin 'typo_plugin' (from typo_plugin 0.1): unknown hook "
        "'ms1_payload_rejectd' (did you mean 'ms1_payload_rejected'?); ms1's hooks are "
        "documented in ms1/hookspecs.py; to start without it: --block-plugin typo_plugin\n")
    proc = run_service(["--block-plugin", "typo_plugin", "--config", str(config), "check"],
                       site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_installed_plugin_with_a_wrong_signature_stops_the_start(tmp_path: Path) -> None:
    site = fake_dist(tmp_path / "site", "sig_plugin", MISSIGNED_PLUGIN)
    config = tmp_path / "ms1.ini"
    config.write_text("")
    proc = run_service(["--config", str(config), "--once"], site, tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("ms1-service: plugin 'sig_plugin': hook 'ms1_service_started': ")
    assert "'when'" in line and line.endswith(
        "ms1_service_started gives (config); to start without it: --block-plugin sig_plugin")
