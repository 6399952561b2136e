"""Helpers shared by the tests that run the real service in a subprocess."""

from __future__ import annotations

import json
import logging
import re
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy

from ms1 import redaction
from ms1.config import Config
from ms1.ops import logs
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service

Settings = Mapping[str, Mapping[str, object]]


def ini(sections: Settings) -> str:
    """INI text from ``{section: {key: value}}``."""
    return "".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
                   for name, keys in sections.items())


def service_ini(redis_url: str, *, ms4_url: str | None = None,
                settings: Settings | None = None) -> str:
    """A config for the service on Redis (source, queue and dead letters) sending to
    ``ms4_url`` with the http transport, or to the in-memory MS4 without one; short test
    timings. ``settings`` adds sections and keys or overrides these."""
    sections: dict[str, dict[str, object]] = {
        "source": {"name": "redis"},
        "queue": {"backend": "redis"},
        "dead_letters": {"backend": "redis"},
        "batch": {"max_wait": 0.2},
        "send": {"retry_initial": 0.05, "retry_max": 0.5, "requests_per_minute": 100_000},
        "ms4": {"transport": "http" if ms4_url else "memory"},
        "redis": {"url": redis_url, "block_timeout": 0.2, "socket_timeout": 2,
                  "connect_timeout": 1},
    }
    if ms4_url:
        sections["transport.http"] = {"base_url": ms4_url}
    for name, keys in (settings or {}).items():
        sections.setdefault(name, {}).update(keys)
    return ini(sections)


def fleet_configs(tmp_path: Path, redis_url: str, ms4_url: str,
                  send: Mapping[str, object], count: int = 3) -> list[Path]:
    """``count`` configs for instances sharing one Redis (the rate limiter too), each its
    own consumer, sending to ``ms4_url`` with these ``[send]`` settings."""
    configs = [tmp_path / f"fleet-{n}.ini" for n in range(count)]
    for n, config in enumerate(configs):
        config.write_text(service_ini(redis_url, ms4_url=ms4_url, settings={
            "ms1": {"log_level": "WARNING"}, "batch": {"max_wait": 0.05},
            "redis": {"consumer": f"fleet-{n}"},
            "send": {"rate_limiter": "redis", **send}}))
    return configs


def start_instances(procs: list[Any], tmp_path: Path, configs: list[Path], invoices: int,
                    env: Mapping[str, str]) -> list[Path]:
    """Queue ``invoices`` sample e-mails in the inbound stream (``enqueue`` with the first
    config), then start one ms1-service per config, each logging to ``ms1-N.log``; the
    logs."""
    from ms1.pipeline import samples

    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(invoices)))
    subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(configs[0]),
                    "enqueue", str(data)], check=True, capture_output=True, timeout=60,
                   env=dict(env))
    logs = [tmp_path / f"ms1-{n}.log" for n in range(len(configs))]
    for config, log in zip(configs, logs, strict=True):
        with log.open("wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ms1.cli", "--config", str(config)],
                env=dict(env), stdout=subprocess.DEVNULL, stderr=err))
    return logs


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` s have passed (its last
    answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for assertion messages."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def logging_restored() -> Iterator[None]:
    """Put back the root logger's handlers and level, the quiet loggers' levels and the
    known secrets, as they were (for tests that set logging up)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    known = redaction.KNOWN.snapshot()
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, lvl in quiet.items():
            logging.getLogger(name).setLevel(lvl)
        redaction.KNOWN.restore(known)


def run_in_process(pm: pluggy.PluginManager, config: Config, emails: Iterable[bytes],
                   timeout: float = 120) -> Service:
    """Run the service once in this process on ``emails`` (memory source, queue and dead
    letters; the transport the config names) and return it, everything delivered."""
    transport = pluginmanager.build_transport(pm, config)
    transport.set_api_key(config.api_key)
    parts = Components(source=MemorySource(emails, finite=True),
                       policy=pluginmanager.build_batch_policy(pm, config),
                       queue=MemoryQueue(), dead_letters=MemoryDeadLetters(),
                       transport=transport)
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(timeout)
    transport.close()
    assert summary.ok, summary.render()
    return service


def sim_control(url: str, **changes: Any) -> None:
    """Change the settings of the ms4-sim at ``url`` at once (``POST /_control``)."""
    request = urllib.request.Request(
        f"{url}/_control", data=json.dumps(changes).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


class SimProcess:
    """An ms4-sim in its own process (``args``: its options), steered through
    ``POST /_control``; started at once, stopped by :meth:`stop` or by ``procs``' owner."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], log: Path, *args: str) -> None:
        self.log = log
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ms1_tools.sim", "--port", "0", *args],
                cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=err)
        procs.append(self.proc)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        found = re.match(r"ms4-sim listening on (http://\S+)", line)
        assert found, f"ms4-sim did not start: {line!r}\n{tail(self.log)}"
        self.url = found.group(1)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._get("/stats"))

    def accepted(self) -> list[dict[str, Any]]:
        return list(self._get("/accepted"))

    def control(self, **changes: Any) -> None:
        sim_control(self.url, **changes)
