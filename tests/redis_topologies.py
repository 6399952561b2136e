"""Redis that fails over, as real processes on loopback: a primary with one replica and
three Sentinels (``redis-server --sentinel``), and a Redis Cluster of three primaries with
one replica each (``redis-server --cluster-enabled yes``, ``redis-cli --cluster create``).

Every server runs in a temp dir of its own, on a free port, with AOF and ``appendfsync
always`` (as production should), and can be killed with SIGKILL and started again on the
same data. Timings are compressed so that a failover completes in a few seconds:
Sentinel's ``down-after-milliseconds`` 1000 and ``failover-timeout`` 3000, the cluster's
``cluster-node-timeout`` 1000. Whatever a fixture started is killed when the test ends,
however it ends.

Use from a test module (importing a fixture makes it the module's)::

    from redis_topologies import SentinelSetup, sentinel_setup_fixture  # noqa: F401

    def test_x(sentinel_setup: SentinelSetup) -> None: ...
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
from conftest import free_port

#: the Sentinel service name of the test topology
SERVICE = "ms1test"
#: seconds a server gets to answer after it was started
START_TIMEOUT = 20.0


def _wait(predicate: object, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``predicate`` (a callable returning truthy) until it holds, else fail."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (redis_py.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    where = f"; see {log}" if log is not None else ""
    raise RuntimeError(f"{what} within {timeout:.0f} s (last error: {last!r}){where}")


def acknowledged(primary: Node, replicas: int = 1, key: str = "redis-topologies:probe"
                 ) -> bool:
    """A write to ``primary`` (of ``key``, which it must serve) is acknowledged by
    ``replicas`` replicas within 0.2 s (WAIT): the replication link is up and answering
    (just after a full sync it is not, for a few hundred ms)."""
    client = primary.client(timeout=2)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set(key, str(time.time()))
        pipe.execute_command("WAIT", replicas, 200)
        return int(pipe.execute()[1]) >= replicas
    finally:
        client.close()


class Node:
    """One redis-server process (a primary, replica, Sentinel or cluster node)."""

    def __init__(self, directory: Path, args: list[str], *, port: int | None = None,
                 name: str = "redis", password: str | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.name = name
        self.args = args
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Node:
        assert not self.running, f"{self.name} already runs"
        self.proc = subprocess.Popen(
            ["redis-server", *self.args, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(timeout=1)
        try:
            _wait(lambda: self.proc is not None and self.proc.poll() is None and client.ping(),
                  START_TIMEOUT, f"{self.name} on port {self.port} did not answer", self.log)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """kill -9."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self, timeout: float = 5) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                              socket_connect_timeout=timeout, password=self.password)

    def info(self, section: str) -> dict[str, object]:
        client = self.client(timeout=2)
        try:
            return dict(client.info(section))
        finally:
            client.close()


def _data_args() -> list[str]:
    # repl-diskless-sync-delay 0: a replica's full sync starts at once (the default waits
    # 5 s for more replicas to share it)
    return ["--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--maxmemory-policy", "noeviction", "--repl-diskless-sync-delay", "0"]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (apt-get install -y redis-server)")


# --- primary + replica + three Sentinels ----------------------------------------------------


class SentinelSetup:
    """A primary, one replica and three Sentinels (quorum 2) watching service ``SERVICE``.

    ``nodes`` are the two data servers; which one is the primary changes with each failover
    (:meth:`primary`, asked of the Sentinels). :meth:`failover` kills the primary with
    SIGKILL and waits until the Sentinels name the replica; :meth:`restart` starts a killed
    server again on its data, and the Sentinels make it a replica of the new primary.
    """

    def __init__(self, directory: Path, *, password: str | None = None,
                 sentinel_password: str | None = None) -> None:
        _require("redis-server")
        self.dir = directory
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        first = Node(directory / "redis-a", [*_data_args(), *auth], name="redis-a",
                     password=password)
        second_port = free_port()
        second = Node(directory / "redis-b",
                      [*_data_args(), *auth, "--replicaof", "127.0.0.1", str(first.port)],
                      port=second_port, name="redis-b", password=password)
        self.nodes = [first, second]
        self.sentinels: list[Node] = []
        # each Sentinel is told its own id, the other two and the replica up front, so they
        # need not discover each other (hello messages every 2 s) before a failover can run
        ports = [free_port() for _ in range(3)]
        ids = [f"{n + 1:x}" * 40 for n in range(3)]
        for n in range(3):
            sdir = directory / f"sentinel-{n}"
            sdir.mkdir(parents=True)
            conf = sdir / "sentinel.conf"
            others = "".join(f"sentinel known-sentinel {SERVICE} 127.0.0.1 {ports[k]} {ids[k]}\n"
                             for k in range(3) if k != n)
            secrets = (f"sentinel auth-pass {SERVICE} {password}\n" if password else "") + \
                (f"requirepass {sentinel_password}\nsentinel sentinel-pass "
                 f"{sentinel_password}\n" if sentinel_password else "")
            conf.write_text(
                f"sentinel myid {ids[n]}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {first.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {second_port}\n" + others + secrets)
            self.sentinels.append(Node(sdir, [str(conf), "--sentinel"], port=ports[n],
                                       name=f"sentinel-{n}", password=sentinel_password))

    @property
    def sentinel_addresses(self) -> str:
        """``[redis] sentinels``: the three as ``host:port, ...``."""
        return ", ".join(s.address for s in self.sentinels)

    def start(self) -> SentinelSetup:
        for node in self.nodes:
            node.start()
        primary, replica = self.nodes
        _wait(lambda: replica.info("replication").get("master_link_status") == "up"
              and acknowledged(primary), START_TIMEOUT,
              "the replica did not sync with the primary", replica.log)
        for sentinel in self.sentinels:
            sentinel.start()
        # every Sentinel knows the replica and the two other Sentinels
        _wait(self._sentinels_ready, START_TIMEOUT, "the Sentinels did not find each other",
              self.sentinels[0].log)
        return self

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client(timeout=1)
            try:
                state = client.sentinel_master(SERVICE)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            finally:
                client.close()
        return True

    def primary_address(self, everyone: bool = False) -> str | None:
        """The primary as a majority of the Sentinels names it (``everyone``: as every
        running Sentinel names it); None if they do not agree so far."""
        votes: dict[str, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client(timeout=1)
            try:
                host, port = client.sentinel_get_master_addr_by_name(SERVICE)
                address = f"{host if isinstance(host, str) else host.decode()}:{port}"
                votes[address] = votes.get(address, 0) + 1
            except (redis_py.RedisError, TypeError, ValueError):
                continue
            finally:
                client.close()
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        needed = sum(1 for s in self.sentinels if s.running) if everyone else 2
        return best[0] if best is not None and best[1] >= needed else None

    def primary(self) -> Node:
        address = self.primary_address()
        for node in self.nodes:
            if node.address == address:
                return node
        raise AssertionError(f"the Sentinels name no known primary ({address})")

    def replica(self) -> Node:
        primary = self.primary()
        return next(node for node in self.nodes if node is not primary)

    def failover(self, timeout: float = 30.0) -> tuple[Node, Node, float]:
        """kill -9 the primary, wait until a majority of Sentinels names the replica and it
        answers as a primary. Returns (old primary, new primary, seconds it took)."""
        old, new = self.primary(), self.replica()
        started = time.monotonic()
        old.kill()
        self.wait_promoted(new, timeout)
        return old, new, time.monotonic() - started

    def wait_promoted(self, node: Node, timeout: float = 30.0) -> None:
        """Until ``node`` is the primary for every Sentinel (a Sentinel still naming the old
        one would take the old one, started again as a replica, for a failed primary and
        fail over once more) and answers as one."""
        def promoted() -> bool:
            return (self.primary_address(everyone=True) == node.address
                    and node.info("replication").get("role") == "master")

        _wait(promoted, timeout, f"the Sentinels did not promote {node.name}",
              self.sentinels[0].log)

    def restart(self, node: Node, timeout: float = 60.0) -> None:
        """Start a killed server again as a replica of the current primary (as the
        Sentinels would make it, some 8 s later), and wait until it is in sync (30 s was
        once too short in CI with the suite beside it: the last state seen is in the
        error)."""
        primary = self.primary()
        args = node.args
        node.args = [*args, "--replicaof", "127.0.0.1", str(primary.port)]
        try:
            node.start()
        finally:
            node.args = args

        seen: dict[str, object] = {}

        def in_sync() -> bool:
            info = node.info("replication")
            seen.update(role=info.get("role"), link=info.get("master_link_status"),
                        acked=None)
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
            seen["acked"] = acknowledged(primary)
            return bool(seen["acked"])

        try:
            _wait(in_sync, timeout, f"{node.name} did not come back as a replica", node.log)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; last seen: {seen}") from None

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.kill()


@pytest.fixture(name="sentinel_setup")
def sentinel_setup_fixture(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A primary, a replica and three Sentinels of this test's own."""
    setup = SentinelSetup(tmp_path / "sentinel")
    try:
        yield setup.start()
    finally:
        setup.stop()


# --- a three-primary Redis Cluster with one replica each ---------------------------------------


class ClusterSetup:
    """Six cluster nodes: three primaries, one replica each (``redis-cli --cluster create
    ... --cluster-replicas 1``). :meth:`primary_for` names the primary of a key's slot;
    :meth:`failover` kills it with SIGKILL and waits until its replica serves the slot."""

    def __init__(self, directory: Path, size: int = 6) -> None:
        _require("redis-server")
        _require("redis-cli")
        self.dir = directory
        self.nodes: list[Node] = []
        for n in range(size):
            port = free_cluster_port()
            self.nodes.append(Node(
                directory / f"node-{n}",
                [*_data_args(), "--cluster-enabled", "yes", "--cluster-config-file",
                 "nodes.conf", "--cluster-node-timeout", "1000",
                 "--cluster-require-full-coverage", "no"],
                port=port, name=f"node-{n}"))

    @property
    def url(self) -> str:
        """``[redis] url``: the first node (a startup node)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> str:
        """``[redis] cluster_nodes``: the other nodes."""
        return ", ".join(node.address for node in self.nodes[1:])

    def start(self) -> ClusterSetup:
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *[node.address for node in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n"
                               f"{create.stderr}")
        _wait(self._healthy, START_TIMEOUT * 2, "the cluster did not become ok",
              self.nodes[0].log)
        return self

    def _healthy(self) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            client = node.client(timeout=1)
            try:
                raw = client.execute_command("CLUSTER INFO")
            finally:
                client.close()
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            if "cluster_state:ok" not in text and "'cluster_state': 'ok'" not in text:
                return False
        # every replica in sync with its primary, and acknowledging its writes
        for node in self.nodes:
            if not node.running:
                continue
            info = node.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
            if info.get("role") == "master" and int(str(info.get("connected_slaves", 0))) \
                    and not acknowledged(node, key=self.key_served_by(node)):
                return False
        return True

    def key_served_by(self, primary: Node) -> str:
        """A key in one of the slots ``primary`` serves (for a probe write)."""
        client = primary.client(timeout=2)
        try:
            ranges = [(int(start), int(end)) for start, end, owner, *_ in
                      client.execute_command("CLUSTER SLOTS") if int(owner[1]) == primary.port]
        finally:
            client.close()
        for n in range(100_000):
            key = f"redis-topologies:probe:{n}"
            slot = key_slot(key)
            if any(start <= slot <= end for start, end in ranges):
                return key
        raise AssertionError(f"{primary.name} serves no slot")

    def _slot_owner(self, slot: int) -> str | None:
        """The address of the primary serving ``slot``, as a running node sees it."""
        for node in self.nodes:
            if not node.running:
                continue
            client = node.client(timeout=1)
            try:
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    if int(start) <= slot <= int(end):
                        host = primary[0].decode() if isinstance(primary[0], bytes) \
                            else primary[0]
                        return f"{host}:{int(primary[1])}"
            except redis_py.RedisError:
                continue
            finally:
                client.close()
        return None

    def node(self, address: str) -> Node:
        return next(node for node in self.nodes if node.address == address)

    def primary_for(self, key: str) -> Node:
        slot = key_slot(key)
        address = self._slot_owner(slot)
        assert address is not None, f"no node serves slot {slot}"
        return self.node(address)

    def replica_of(self, primary: Node) -> Node:
        """The node replicating ``primary`` (it is the one promoted on a failover)."""
        for node in self.nodes:
            if node is primary or not node.running:
                continue
            info = node.info("replication")
            if info.get("role") == "slave" and int(str(info.get("master_port"))) == primary.port:
                return node
        raise AssertionError(f"no replica of {primary.name}")

    def failover(self, key: str, timeout: float = 30.0) -> tuple[Node, Node, float]:
        """kill -9 the primary of ``key``'s slot and wait until its replica serves the slot
        (as every running node sees it). Returns (old primary, new primary, seconds)."""
        old = self.primary_for(key)
        new = self.replica_of(old)
        started = time.monotonic()
        old.kill()
        slot = key_slot(key)

        def promoted() -> bool:
            if new.info("replication").get("role") != "master":
                return False
            for node in self.nodes:
                if node.running and self._slot_owner_seen_by(node, slot) != new.address:
                    return False
            return True

        _wait(promoted, timeout, f"{new.name} was not promoted", new.log)
        return old, new, time.monotonic() - started

    def _slot_owner_seen_by(self, node: Node, slot: int) -> str | None:
        client = node.client(timeout=1)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                    return f"{host}:{int(primary[1])}"
        finally:
            client.close()
        return None

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a killed node again on its data: it rejoins as a replica of the node that
        took its place; this waits until it is in sync."""
        node.start()

        def in_sync() -> bool:
            info = node.info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
            primary = next(n for n in self.nodes if n.port == int(str(info["master_port"])))
            return acknowledged(primary, key=self.key_served_by(primary))

        _wait(in_sync, timeout, f"{node.name} did not rejoin as a replica", node.log)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def key_slot(key: str) -> int:
    """The cluster slot of ``key`` (its hash tag, if it has one)."""
    from redis.crc import key_slot as crc_slot

    return int(crc_slot(key.encode()))


@pytest.fixture(name="cluster_setup")
def cluster_setup_fixture(tmp_path: Path) -> Iterator[ClusterSetup]:
    """A Redis Cluster of this test's own: three primaries, one replica each."""
    setup = ClusterSetup(tmp_path / "cluster")
    try:
        yield setup.start()
    finally:
        setup.stop()


@contextlib.contextmanager
def stopped(*nodes: Node) -> Iterator[None]:
    """Kill these nodes on the way out, whatever happens."""
    try:
        yield
    finally:
        for node in nodes:
            node.kill()
