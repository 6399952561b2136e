"""Shared fixtures: a real plugin manager (entry points of the installed package) and
config files written to a temp dir."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pluggy
import pytest

from ms1.config import Config
from ms1.runtime import pluginmanager


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
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import redis as redis_py  # noqa: E402

#: ports handed out by free_port(): below Linux's ephemeral range (32768-60999), so no
#: outgoing connection takes one while its server is down (a Redis killed and restarted
#: on the same port); one block per pytest-xdist worker, so two workers never get the
#: same port between free_port() and the server's bind
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20_000, 1_000, 12


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = PORT_BASE + (index % PORT_BLOCKS) * PORT_BLOCK
    return range(start, start + PORT_BLOCK)


_ports = _port_block()
_next_port = [random.randrange(len(_ports))]  # another run at the same time: elsewhere


def free_port() -> int:
    """A loopback port nothing listens on, from this worker's block; never the same one
    twice in a row (the block is used round-robin)."""
    for _ in range(len(_ports)):
        port = _ports[_next_port[0] % len(_ports)]
        _next_port[0] += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or in TIME_WAIT): the next one
            return port
    raise RuntimeError(f"no free port in {_ports}")


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
                "--maxmemory-policy", "noeviction",
                "--enable-protected-configs", "yes"]  # a test may CONFIG SET dir
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

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block: connections stay open, nothing is
        answered; it goes on (SIGCONT) however the block ends."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)


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


# --- parallel runs: pytest-xdist with --dist loadgroup (pyproject.toml's addopts) ---------
#
# Tests that measure -- speed ratios, shares of the rate ceiling, latency percentiles,
# RSS, fd limits -- carry @pytest.mark.xdist_group("measure"): loadgroup hands them to one
# worker as one unit, run one after the other; the largest unit, it is handed out first.
# That worker keeps the normal CPU priority for them; every other worker (and what its
# tests start: services, simulators, redis-servers) runs at nice NEIGHBOUR_NICE, so the
# measurements get the CPU first and the rest of the suite uses what they leave. Past
# its group the measure worker takes the same nice value (no test is favoured then).
#
# Even so, on two cores a few measurements came out distorted with the rest of the suite
# around them -- 4 senders 3.08-3.52x one (alone 3.7x; >= 3.5 asked), batch 38.6x unit
# (48x; >= 40), light-load p99 up to 207 ms (57-61 ms; <= 100), 11 requests in a 0.6 s
# window (<= 10), 429s and a 251st request in the ceiling sweep, a 429 with three
# instances at the ceiling (none; none). Those carry @pytest.mark.alone as well: they run
# first, and the other workers start their first test once they are done (about 105 s;
# with one other worker going on, the p99 and the sweep failed again).
MEASURE = "measure"
NEIGHBOUR_NICE = 10
ALONE_WAIT = 900.0  # s: the most the other workers wait for the alone tests to finish
#: the slow tests of these files (ms1-bench and the concurrency controller at the
#: ceiling) get the mark here, and these tests the alone mark, until their files carry
#: the marks themselves
MEASURE_FILES = ("tests/test_concurrency.py", "tests/test_bench_sweep.py")
ALONE_TESTS = (
    "tests/test_bench_sweep.py::"
    "test_light_load_keeps_few_requests_in_flight_and_adds_little_latency",
    "tests/test_concurrency.py::test_share_of_the_ceiling_with_default_settings_at_any_latency",
)


def groups(item: pytest.Item) -> list[str]:
    """The item's xdist_group names (as xdist reads them)."""
    return sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                   for mark in item.iter_markers("xdist_group")})


def alone(item: pytest.Item) -> bool:
    return item.get_closest_marker("alone") is not None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in ALONE_TESTS:
            item.add_marker(pytest.mark.alone)
        if ((alone(item) or (item.nodeid.partition("::")[0] in MEASURE_FILES
                             and item.get_closest_marker("slow") is not None))
                and not groups(item)):
            item.add_marker(pytest.mark.xdist_group(MEASURE))
    items.sort(key=lambda item: not alone(item))  # stable: the alone tests first


class _Worker:
    """This xdist worker's part: its priority, and waiting for the alone tests."""

    first = True
    niced = False
    alone_ids: tuple[str, ...] = ()
    done: Path | None = None  # exists once the alone tests are over

    @classmethod
    def alone_over(cls) -> None:
        if cls.done is not None and not cls.done.exists():
            cls.done.touch()


@pytest.hookimpl(tryfirst=True)  # before the fixtures start anything
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    first, _Worker.first = _Worker.first, False
    if MEASURE in groups(item):
        return  # (the measure worker: the group is its first unit, all of it)
    if not _Worker.niced:  # a neighbour, or the measure worker past its group
        _Worker.niced = True
        os.nice(NEIGHBOUR_NICE)  # this thread, and every thread and process it starts
    if first:
        deadline = time.monotonic() + ALONE_WAIT
        while (_Worker.alone_ids and _Worker.done is not None
               and not _Worker.done.exists() and time.monotonic() < deadline):
            time.sleep(0.05)  # polls a file another process writes: no event to wait on
    _Worker.alone_over()  # (the measure worker, past its alone tests)


def pytest_runtest_logfinish(nodeid: str) -> None:
    if _Worker.alone_ids and nodeid == _Worker.alone_ids[-1]:
        _Worker.alone_over()


def pytest_sessionfinish() -> None:
    _Worker.alone_over()


# pytest 9.2 builds a test's nodeid from a structured id, so xdist 3.8's loadgroup, which
# appends "@group" to the old _nodeid attribute, no longer groups anything, silently
# (pytest-dev/pytest-xdist#1386). Until it does again, each worker writes down the groups
# of the tests it collected and the controller's scheduler reads them: the same
# loadgroup, through xdist's documented hooks.
GROUPS_DIR = "ms1_xdist_groups"  # the key in each worker's workerinput
_groups_dir_key = pytest.StashKey[str]()


def _groups_dir(config: pytest.Config) -> str:
    if _groups_dir_key not in config.stash:
        config.stash[_groups_dir_key] = tempfile.mkdtemp(prefix="ms1-xdist-groups-")
    return config.stash[_groups_dir_key]


def pytest_configure_node(node: Any) -> None:  # in the controller, for each worker
    node.workerinput[GROUPS_DIR] = _groups_dir(node.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _groups_dir_key in config.stash:
        shutil.rmtree(config.stash[_groups_dir_key], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before the worker tells the controller it has collected
def pytest_collection_finish(session: pytest.Session) -> None:
    where = getattr(session.config, "workerinput", {}).get(GROUPS_DIR)
    if where is None:
        return
    if session.config.getvalue("loadgroup"):  # (else the alone tests are anywhere)
        _Worker.alone_ids = tuple(item.nodeid for item in session.items if alone(item))
        _Worker.done = Path(where) / "alone-done"
    lines = [f"{item.nodeid}\t{'_'.join(names)}\n" for item in session.items
             if (names := groups(item))]
    path = Path(where) / os.environ.get("PYTEST_XDIST_WORKER", "worker")
    path.with_suffix(".tmp").write_text("".join(lines))
    path.with_suffix(".tmp").replace(path.with_suffix(".txt"))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupsFromWorkers(LoadGroupScheduling):
        group_of: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # "@group" in the nodeid: xdist did it
            if scope != nodeid:
                return scope
            if self.group_of is None:  # every worker has collected by now
                self.group_of = {}
                for path in Path(_groups_dir(config)).glob("*.txt"):
                    for line in path.read_text().splitlines():
                        test, _, group = line.rpartition("\t")
                        self.group_of[test] = group
            return self.group_of.get(nodeid, nodeid)

    return GroupsFromWorkers(config, log)


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ledger: the in-memory one, and the Redis one on a real redis-server (the same
    contract tests run over both)."""
    from ms1.pipeline.ledger import Ledger, MemoryLedger
    from ms1_plugins.redis import RedisLink
    from ms1_plugins.redis.ledger import RedisLedger

    if request.param == "memory":
        store: Ledger = MemoryLedger()
    else:
        link = RedisLink(request.getfixturevalue("redis_url")).use()
        store = RedisLedger(link, key="t:ledger", retention_days=30)
    yield store
    store.close()
