"""The ledger's cost (issue 24): ``python -m ms1_tools.ledger_bench --count 1000000``
starts its own ``redis-server``, records ``count`` invoices spread over the last 24 hours
as the service does (per batch of 50: ``batched``, then ``accepted`` with its attempt; the
newest 1 % left pending, their batches in the outbound stream), then prints the bytes
Redis holds per invoice, ``trace`` latency over random invoice and message ids, and the
time ``reconcile`` takes for the whole day."""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from ms1.model import Batch
from ms1.pipeline.ledger import Attempt, Ledger, LedgerEvent
from ms1.pipeline.reconcile import reconcile
from ms1.runtime import pluginmanager

BATCH = 50
DAY = 86400.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batch(n: int, at: float) -> Batch:
    first = n * BATCH
    return Batch("/batch-metadata",
                 tuple(b'{"invoice_id":"INV-2026-%08d"}' % (first + i) for i in range(BATCH)),
                 tuple(f"INV-2026-{first + i:08d}" for i in range(BATCH)),
                 tuple(f"<{first + i:08d}.{n:x}@mail.example.com>" for i in range(BATCH)),
                 created_at=at,
                 refs=tuple(f"{int(at * 1000)}-{i}" for i in range(BATCH)))


def _record(ledger: Ledger, n: int, at: float, pending: bool) -> Batch:
    batch = _batch(n, at)
    ledger.record([LedgerEvent("batched", batch.id, batch.invoice_ids, batch.message_ids,
                               batch.refs, at=at, read_after=at)])
    if not pending:
        ledger.record([LedgerEvent(
            "accepted", batch.id, batch.invoice_ids, batch.message_ids, batch.refs,
            at=at + 0.6, read_after=at, attempts=(Attempt(at + 0.5, 202, 0.08,
                                                          f"00-{batch.id}-{n:016x}-01"),))])
    return batch


def run(count: int, traces: int, threads: int) -> dict[str, float]:
    batches = max(1, count // BATCH)
    with tempfile.TemporaryDirectory(prefix="ms1-ledger-bench-") as tmp:
        port = _free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--dir", tmp, "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            ini = Path(tmp) / "bench.ini"  # the parts as the service builds them
            ini.write_text(f"[queue]\nbackend = redis\n[ledger]\nbackend = redis\n"
                           f"[redis]\nurl = {url}\nconsumer = bench\n")
            pm = pluginmanager.make_plugin_manager()
            config = pluginmanager.load(pm, str(ini))
            queue = pluginmanager.build_queue(pm, config)
            ledger = pluginmanager.build_ledger(pm, config, queue.name)
            assert ledger is not None
            before = int(client.info("memory")["used_memory"])
            now = time.time()
            start = now - DAY + 60
            pending_from = batches - max(1, batches // 100)
            written = time.perf_counter()

            def one(n: int) -> Batch:
                return _record(ledger, n, start + (DAY - 120) * n / batches, n >= pending_from)

            with ThreadPoolExecutor(threads) as pool:
                made = list(pool.map(one, range(batches), chunksize=64))
            written = time.perf_counter() - written
            queue.put_many(made[pending_from:])
            ledger_bytes = int(client.info("memory")["used_memory"]) - before
            queue_bytes = sum(int(client.memory_usage(key) or 0)
                              for key in client.scan_iter("ms1:*")
                              if not key.startswith(b"ms1:ledger"))
            ledger_bytes -= queue_bytes
            rng = random.Random(7)
            latencies = []
            for _ in range(traces):
                batch = made[rng.randrange(batches)]
                i = rng.randrange(BATCH)
                id = batch.invoice_ids[i] if rng.random() < 0.5 else batch.message_ids[i]
                began = time.perf_counter()
                found = ledger.trace(id)
                latencies.append(time.perf_counter() - began)
                assert found is not None, id
            began = time.perf_counter()
            result = reconcile(ledger, queue, now - DAY, now, now=now + 3600)
            reconciled = time.perf_counter() - began
            assert result.read == batches * BATCH and result.balanced, result.summary()
            peaks = {}  # the most Python memory each form holds at once (traced: slower)
            for listed in (True, False):
                tracemalloc.start()
                try:
                    again = reconcile(ledger, queue, now - DAY, now, now=now + 3600,
                                      listed=listed)
                    peaks[listed] = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                assert again.summary() == result.summary()
                del again
            queue.close()
            ledger.close()
        finally:
            server.terminate()
            server.wait(10)
    latencies.sort()
    return {"invoices": batches * BATCH, "write_s": written,
            "bytes_per_invoice": ledger_bytes / (batches * BATCH),
            "trace_p50_ms": statistics.median(latencies) * 1000,
            "trace_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
            "reconcile_day_s": reconciled, "pending": result.count("pending"),
            "reconcile_listed_mb": peaks[True] / 1e6, "reconcile_counted_mb": peaks[False] / 1e6}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms1_tools.ledger_bench",
                                     description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="invoices to record")
    parser.add_argument("--traces", type=int, default=1000, help="trace calls timed")
    parser.add_argument("--threads", type=int, default=4, help="writers")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")
    figures = run(args.count, args.traces, args.threads)
    print(f"ledger of {figures['invoices']:,} invoices over 24 h "
          f"(written in {figures['write_s']:.1f} s): "
          f"{figures['bytes_per_invoice']:.0f} bytes per invoice in Redis; "
          f"trace p50 {figures['trace_p50_ms']:.2f} ms, p99 {figures['trace_p99_ms']:.2f} ms; "
          f"reconcile of the day {figures['reconcile_day_s']:.2f} s "
          f"({figures['pending']:,.0f} pending checked against the queue); its peak Python "
          f"memory {figures['reconcile_listed_mb']:.1f} MB listing every e-mail (--csv), "
          f"{figures['reconcile_counted_mb']:.1f} MB counting (the service's reconciler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run"]
