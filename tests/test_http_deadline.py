"""The http transport against real sockets when MS4 misbehaves: informational answers
before the real one, answers that trickle in, answers too large to keep, a sender blocked
when the transport is closed, and SIGTERM of the real service while MS4 trickles."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import pytest
from test_http_transport import (
    BODY,
    Handler,
    Peer,
    Server,
    answer,
    client,
    post,
    replying,
    serving,
    wait_for,
)

from ms1.config import Config
from ms1.errors import TransportError
from ms1.model import BATCH_PATH
from ms1.pipeline import samples
from ms1.pipeline.batching import SizeBatchPolicy
from ms1.pipeline.deadletters import MemoryDeadLetters
from ms1.pipeline.outbound import MemoryQueue
from ms1.pipeline.source import MemorySource
from ms1.pipeline.transport import Request
from ms1.runtime.components import Components
from ms1.runtime.service import Service, Summary

EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
               b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
TRICKLE = 0.25  # seconds between two bytes of a trickling answer (read_timeout is 1 s)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    yield from serving()


def timed(call: Callable[[], object], limit: float) -> tuple[object, float]:
    """Run ``call`` in a thread: (its result or exception, seconds taken); fails the test
    if it is still running after ``limit`` s."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = call()
        except Exception as exc:
            outcome["value"] = exc
        outcome["elapsed"] = time.monotonic() - started
        done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(limit):
        pytest.fail(f"send still blocked after {limit} s")
    return outcome["value"], float(outcome["elapsed"])  # type: ignore[arg-type]


def run_service(make_config: Callable[[str], Config], pm: pluggy.PluginManager, url: str,
                n: int = 5, extra: str = "") -> Summary:
    """The real service (one sender, batches of 10) over HttpTransport until all is sent."""
    config = make_config(
        f"[send]\nthreads = 1\nretry_initial = 0.01\nretry_max = 0.05\n"
        f"requests_per_minute = 100000\n{extra}")
    transport = client(url, max_connections=1)
    parts = Components(source=MemorySource((s.data for s in samples.generate(n)), finite=True),
                       policy=SizeBatchPolicy(10, 1_000_000, 3600), queue=MemoryQueue(),
                       dead_letters=MemoryDeadLetters(), transport=transport)
    service = Service(config, pm, parts, once=True)
    service.start()
    summary = service.run_once(20)
    transport.close()
    return summary


# --- 1. informational answers are never final ---------------------------------------


def test_103_early_hints_is_not_taken_for_the_answer(serve) -> None:
    server = serve(replying(lambda n, req: EARLY_HINTS))
    transport = client(server.url)
    assert post(transport) == 202
    assert server.request_count() == 1
    assert post(transport) == 202  # its own answer, not the 202 left over from the first
    assert server.request_count() == 2
    transport.close()


def test_103_early_hints_through_the_sender_acks_the_batch_after_one_request(
        serve, make_config, pm) -> None:
    server = serve(replying(lambda n, req: EARLY_HINTS))
    summary = run_service(make_config, pm, server.url, n=5)
    assert summary.ok
    assert server.request_count() == 1
    stats = summary.stats
    assert stats.get("batches_delivered") == 1 and stats.get("invoices_delivered") == 5
    assert stats.get("responses_202") == 1 and not stats.get("send_failures")


def test_an_unasked_101_is_no_answer_and_the_connection_is_not_reused(serve) -> None:
    server = serve(replying(lambda n, req: SWITCHING if n == 1 else answer()))
    transport = client(server.url)
    # h11: a 101 without an Upgrade proposal is a protocol error, never an answer
    with pytest.raises(TransportError, match="RemoteProtocolError"):
        post(transport)
    assert post(transport) == 202
    assert server.connections == 2
    transport.close()


def test_101_through_the_sender_is_a_breaker_failure_and_the_batch_is_resent(
        serve, make_config, pm, caplog) -> None:
    server = serve(replying(lambda n, req: SWITCHING if n == 1 else answer()))
    with caplog.at_level(logging.WARNING):
        summary = run_service(make_config, pm, server.url, n=5,
                              extra="breaker_failures = 1\nbreaker_reset = 0.1\n")
    assert summary.ok
    assert server.request_count() == 2
    stats = summary.stats
    assert stats.get("send_failures") == 1 and stats.get("responses_202") == 1
    assert stats.get("batches_delivered") == 1
    assert "circuit breaker open" in caplog.text  # the pacer counted the 101 as a failure


# --- 2. request_timeout: one deadline for the whole request -------------------------


def _trickle_body(peer: Peer, n: int, request: bytes) -> bool:
    peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n")
    peer.trickle(b"x" * 100, TRICKLE)  # each byte well within read_timeout
    return False


def _trickle_head(peer: Peer, n: int, request: bytes) -> bool:
    peer.trickle(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nX-Pad: " + b"a" * 100
                 + b"\r\n\r\n", TRICKLE)
    return False


@pytest.mark.parametrize("handle", [_trickle_body, _trickle_head], ids=["body", "head"])
def test_a_trickling_answer_ends_at_request_timeout(serve, handle: Handler) -> None:
    """A 202 whose body (or status line and headers) comes a byte at a time, each well
    within read_timeout: the request ends at request_timeout, not never."""
    server = serve(handle)
    transport = client(server.url, read_timeout=1.0, request_timeout=2.0)
    outcome, elapsed = timed(lambda: post(transport), limit=6)
    print(f"{outcome} after {elapsed:.2f} s")
    assert isinstance(outcome, TransportError), outcome
    assert "ReadTimeout" in str(outcome) and "within request_timeout 2 s" in str(outcome)
    assert 2.0 - 0.05 <= elapsed <= 3.0
    transport.close()


def test_a_body_ms4_does_not_read_ends_at_request_timeout() -> None:
    # a listening socket nobody accepts on: the kernel completes the connect, nobody reads
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        transport = client(url, write_timeout=30.0, request_timeout=2.0)
        body = b"[" + b" " * (32 << 20) + b"]"  # more than the socket buffers hold
        outcome, elapsed = timed(
            lambda: transport.send(Request(BATCH_PATH, body, "big", 1)), limit=6)
        transport.close()
    print(f"{outcome} after {elapsed:.2f} s")
    assert isinstance(outcome, TransportError), outcome
    assert "WriteTimeout" in str(outcome) and "within request_timeout 2 s" in str(outcome)
    assert 2.0 - 0.05 <= elapsed <= 3.0


def test_the_next_request_after_a_deadline_gets_a_fresh_connection(serve) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        if n == 1:
            peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n")
            peer.trickle(b"x" * 100, TRICKLE)
            return False
        peer.send(answer())
        return True

    server = serve(handle)
    transport = client(server.url, read_timeout=1.0, request_timeout=1.0)
    with pytest.raises(TransportError, match="within request_timeout 1 s"):
        post(transport)
    assert post(transport) == 202
    assert server.connections == 2
    transport.close()


# --- 3. max_answer_bytes: the answer's size does not decide ms1's memory -----------

BIG = 100 << 20  # 100 MiB
BLOCK = b"e" * 65536

MEASURE = textwrap.dedent("""\
    import json, sys
    from ms1.config import Secret
    from ms1.model import BATCH_PATH
    from ms1.pipeline.transport import Request
    from ms1_plugins.http_transport import HttpTransport

    def high_water_mark() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    transport = HttpTransport(sys.argv[1])
    transport.set_api_key(Secret("k"))
    warm = transport.send(Request(BATCH_PATH, b"[]", "warm", 0))  # imports, pool, TLS
    before = high_water_mark()
    big = transport.send(Request(BATCH_PATH, b"[]", "big", 0))
    after = high_water_mark()
    print(json.dumps({"warm": warm.status, "status": big.status, "text": len(big.text),
                      "before": before, "growth": after - before}))
""")


def huge(chunked: bool) -> Callable[[Peer, int, bytes], bool]:
    """A handler: a small 202 first, then a 202 with a 100 MiB body made on the fly."""

    def handle(peer: Peer, n: int, request: bytes) -> bool:
        if n == 1:
            peer.send(answer())
            return True
        if chunked:
            peer.send(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        else:
            peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n" % BIG)
            block = BLOCK
        for _ in range(BIG // len(BLOCK)):
            peer.send(block)
        if chunked:
            peer.send(b"0\r\n\r\n")
        return True

    return handle


@pytest.mark.xdist_group("measure")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mib_answer_keeps_rss_growth_under_10_mib(serve, chunked: bool) -> None:
    server = serve(huge(chunked))
    run = subprocess.run([sys.executable, "-c", MEASURE, server.url], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    print(f"RSS high-water mark before {result['before'] / 2**20:.1f} MiB, "
          f"growth {result['growth'] / 2**20:.2f} MiB")
    assert (result["warm"], result["status"]) == (202, 202)
    assert result["text"] <= 65536
    assert result["growth"] < 10 * 2**20


def test_an_answer_longer_than_max_answer_bytes_keeps_its_status_and_a_prefix(serve) -> None:
    text = b'{"error":"invalid object(s)"}' + b" " * 300_000
    server = serve(replying(lambda n, req: answer(400, text) if n == 1 else answer()))
    transport = client(server.url, max_answer_bytes=1024)
    response = transport.send(Request(BATCH_PATH, BODY, "i", 1))
    assert response.status == 400
    assert response.text == text[:1024].decode()
    assert post(transport) == 202  # and the transport goes on
    transport.close()


# --- close(): never blocks, and wakes a sender blocked in a read ---------------------


def test_close_returns_at_once_and_wakes_a_sender_blocked_in_a_read(serve) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        peer.stopped.wait(60)  # never answers
        return False

    server = serve(handle)
    transport = client(server.url, read_timeout=30.0, request_timeout=30.0)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def send() -> None:
        try:
            outcome["value"] = post(transport)
        except Exception as exc:
            outcome["value"] = exc
        done.set()

    threading.Thread(target=send, daemon=True).start()
    assert wait_for(lambda: server.request_count() == 1)
    started = time.monotonic()
    transport.close()
    assert time.monotonic() - started < 1.0
    assert done.wait(1.0), "the sender is still blocked after close()"
    assert isinstance(outcome["value"], TransportError), outcome
    with pytest.raises(TransportError, match="closed"):
        post(transport)


# --- SIGTERM of the real service while MS4 trickles ----------------------------------


@pytest.mark.slow
def test_sigterm_exits_within_shutdown_timeout_while_ms4_trickles(serve, tmp_path: Path
                                                                  ) -> None:
    def handle(peer: Peer, n: int, request: bytes) -> bool:
        peer.trickle(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 1.0)
        return False

    server = serve(handle)
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(20)))
    config = tmp_path / "ms1.ini"
    config.write_text(textwrap.dedent(f"""\
        [ms1]
        shutdown_timeout = 3
        [source]
        name = files
        [queue]
        backend = memory
        [dead_letters]
        backend = memory
        [batch]
        max_items = 10
        max_wait = 0.2
        [send]
        threads = 2
        requests_per_minute = 100000
        [ms4]
        transport = http
        [transport.http]
        base_url = {server.url}
        read_timeout = 30
        request_timeout = 30
        """))
    log = tmp_path / "service.log"
    service = subprocess.Popen(
        [sys.executable, "-m", "ms1.cli", "--config", str(config), str(data)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "MS1_MS4_API_KEY": "k"})
    try:
        assert wait_for(lambda: server.request_count() == 2, 20), log.read_text()[-2000:]
        signalled = time.monotonic()
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    print(f"SIGTERM to exit: {took:.1f} s")
    assert took <= 3 + 2, f"exit took {took:.1f} s (shutdown_timeout 3)\n" + log.read_text()
