"""ms1.ops.notify: real sd_notify datagrams on a real AF_UNIX socket, and the watchdog thread."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ms1.ops.notify import Notifier, Watchdog


class Receiver:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # as written in $NOTIFY_SOCKET
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def recv(self, timeout: float = 1.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        """Every datagram waiting now."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    rx = Receiver(str(tmp_path / "notify.sock"))
    yield rx
    rx.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    n = Notifier({"NOTIFY_SOCKET": receiver.address})
    yield n
    n.close()


def test_ready_with_status(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.enabled
    notifier.ready("running: 4 senders")
    assert receiver.recv() == "READY=1\nSTATUS=running: 4 senders"
    notifier.ready()
    assert receiver.recv() == "READY=1"


def test_reloading_carries_monotonic_usec(receiver: Receiver, notifier: Notifier) -> None:
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    after = time.monotonic_ns() // 1000
    first, second = receiver.recv().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_stopping_status_and_watchdog(receiver: Receiver, notifier: Notifier) -> None:
    notifier.stopping("draining")
    assert receiver.recv() == "STOPPING=1\nSTATUS=draining"
    notifier.stopping()
    assert receiver.recv() == "STOPPING=1"
    notifier.status("line one\nline two")
    assert receiver.recv() == "STATUS=line one line two"
    notifier.watchdog()
    assert receiver.recv() == "WATCHDOG=1"
    assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=x") is True
    assert receiver.recv() == "EXTEND_TIMEOUT_USEC=5000000\nSTATUS=x"


def test_abstract_namespace_socket() -> None:
    rx = Receiver(f"@ms1-test-{secrets.token_hex(8)}")
    n = Notifier({"NOTIFY_SOCKET": rx.address})
    try:
        assert n.notify("READY=1") is True
        assert rx.recv() == "READY=1"
    finally:
        n.close()
        rx.close()


def test_socket_reused_and_reopened_after_failure(tmp_path: Path) -> None:
    path = str(tmp_path / "again.sock")
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.notify("READY=1") is False  # nobody listening yet
    rx = Receiver(path)
    try:
        assert n.notify("READY=1") is True
        assert n.notify("WATCHDOG=1") is True
        assert [rx.recv(), rx.recv()] == ["READY=1", "WATCHDOG=1"]
        n.close()
        assert n.notify("STOPPING=1") is True  # close() then send: a new socket
        assert rx.recv() == "STOPPING=1"
    finally:
        n.close()
        rx.close()


def test_disabled_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    n.ready("x")
    n.reloading()
    n.stopping("y")
    n.status("z")
    n.watchdog()
    n.close()
    assert Notifier({"NOTIFY_SOCKET": ""}).enabled is False


def test_default_environ_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert Notifier().enabled


def test_missing_socket_path_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nope" / "notify.sock")})
    assert n.enabled
    assert n.notify("READY=1") is False
    n.ready("ok")
    n.reloading()
    n.stopping()
    n.status("s")
    n.watchdog()
    n.close()


def test_notify_is_thread_safe(receiver: Receiver, notifier: Notifier) -> None:
    expected = sorted(f"STATUS={i}-{j}" for i in range(4) for j in range(25))
    got: list[str] = []

    def read() -> None:  # concurrently: the kernel queues only ~10 datagrams
        while len(got) < len(expected):
            got.append(receiver.recv(timeout=2.0))

    def send(i: int) -> None:
        for j in range(25):
            assert notifier.notify(f"STATUS={i}-{j}")

    reader = threading.Thread(target=read)
    reader.start()
    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in senders:
        t.start()
    for t in [*senders, reader]:
        t.join(5)
    assert sorted(got) == expected


def test_full_receive_queue_does_not_block(receiver: Receiver) -> None:
    n = Notifier({"NOTIFY_SOCKET": receiver.address}, send_timeout=0.05)
    try:
        for _ in range(10_000):  # nobody reads: the queue fills up
            started = time.monotonic()
            if not n.notify("WATCHDOG=1"):
                break
        else:
            pytest.fail("the receive queue never filled up")
        assert time.monotonic() - started < 1.0
        receiver.drain()
        assert n.notify("READY=1") is True  # and sending works again
    finally:
        n.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "garbage"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval == expected


def lines(datagrams: list[str]) -> list[str]:
    return [line for d in datagrams for line in d.split("\n")]


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_watchdog_pings_only_while_healthy(receiver: Receiver, notifier: Notifier) -> None:
    healthy = threading.Event()
    healthy.set()
    dog = Watchdog(notifier, 0.05, healthy.is_set)
    dog.start()
    try:
        time.sleep(0.3)
        healthy.clear()
        time.sleep(0.12)  # let a tick in flight land
        while_healthy = lines(receiver.drain())
        assert while_healthy.count("WATCHDOG=1") >= 3
        assert set(while_healthy) == {"WATCHDOG=1"}  # no STATUS without a status callback
        time.sleep(0.25)
        assert receiver.drain() == []  # wedged: silence, so systemd restarts us
        healthy.set()
        wait_for(lambda: "WATCHDOG=1" in lines(receiver.drain()))
    finally:
        dog.stop()
    assert not any(t.name == "watchdog" and t.is_alive() for t in threading.enumerate())


def test_watchdog_sends_status_lines(receiver: Receiver, notifier: Notifier) -> None:
    ticks = iter(range(1000))
    dog = Watchdog(notifier, 0.05, lambda: True, status=lambda: f"tick {next(ticks)}\nok")
    dog.start()
    try:
        time.sleep(0.25)
    finally:
        dog.stop()
    got = lines(receiver.drain())
    assert got.count("WATCHDOG=1") >= 3
    statuses = [line for line in got if line.startswith("STATUS=")]
    assert len(statuses) == got.count("WATCHDOG=1")
    assert statuses[:2] == ["STATUS=tick 0 ok", "STATUS=tick 1 ok"]


def test_watchdog_failing_callbacks(receiver: Receiver, notifier: Notifier) -> None:
    def broken_health() -> bool:
        raise RuntimeError("boom")

    def broken_status() -> str:
        raise RuntimeError("boom")

    assert Watchdog(notifier, 1, broken_health).tick() is False
    assert receiver.drain() == []
    assert Watchdog(notifier, 1, lambda: True, status=broken_status).tick() is True
    assert receiver.recv() == "WATCHDOG=1"


def test_watchdog_thread_is_daemon_named_and_stops_promptly(notifier: Notifier) -> None:
    dog = Watchdog(notifier, 10.0, lambda: True)
    dog.start()
    dog.start()  # idempotent
    threads = [t for t in threading.enumerate() if t.name == "watchdog"]
    assert len(threads) == 1 and threads[0].daemon
    started = time.monotonic()
    dog.stop()
    assert time.monotonic() - started < 1.0
    assert not threads[0].is_alive()
    dog.stop()  # twice is fine


def test_watchdog_rejects_bad_interval(notifier: Notifier) -> None:
    with pytest.raises(ValueError):
        Watchdog(notifier, 0, lambda: True)
