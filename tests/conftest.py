"""Shared fixtures: a real plugin manager (entry points of the installed package) and
config files written to a temp dir."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pluggy
import pytest

from ms1 import pluginmanager
from ms1.config import Config


@pytest.fixture
def pm() -> pluggy.PluginManager:
    return pluginmanager.make_plugin_manager()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "ms1.ini") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def make_config(pm: pluggy.PluginManager, write_config: Callable[[str], Path]
                ) -> Callable[[str], Config]:
    """Load a config from INI text through the full plugin schema."""

    def make(text: str = "") -> Config:
        return pluginmanager.load(pm, str(write_config(text)))

    return make


# --- a real redis-server per test session (and per test, where a test kills it) ----------

import contextlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import redis as redis_py  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own: temp dir, free port, AOF with appendfsync always.

    ``kill()`` is kill -9; ``stop()`` a clean shutdown; ``start()`` again on the same data.
    """

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.dir = directory
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--logfile", str(self.dir / "redis.log"),
                "--maxmemory-policy", "noeviction"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_py.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis_py.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {self.dir}/redis.log") \
                        from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def client(self) -> redis_py.Redis:
        return redis_py.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis for this test alone, which it may kill and restart."""
    server = RedisServer(tmp_path / "redis-data")
    server.dir.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts goes here; whatever still runs at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
