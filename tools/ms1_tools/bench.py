"""``ms1-bench``: throughput and latency of the whole real pipeline on this machine.

It starts its own ``redis-server`` and ``ms4-sim`` (no rate limit, no latency), feeds
generated e-mails into the inbound stream from a separate producer process (as the
ingestor would), runs the ms1 service — Redis source, processor, batches, Redis
outbound stream, httpx, 202 — and prints:

More: docs/internals.md, ``ms1_tools.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ms1.hookspecs import hookimpl
from ms1.model import Batch
from ms1.pipeline import samples
from ms1.runtime import pluginmanager
from ms1.runtime.components import Components
from ms1.runtime.service import Service
from ms1_tools import fronts
from ms1_tools.sim_limits import SHAPES

# latency histogram: 0.1 ms buckets to 2 s, then 10 ms buckets to 120 s (constant memory)
_EDGES = [i / 10_000 for i in range(1, 20_001)] + [2 + i / 100 for i in range(1, 11_801)]


class LatencyRecorder:
    """Observer plugin: inbound-entry-to-202 latency of every delivered invoice."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_EDGES) + 1)
        self.delivered = 0
        self.requests = 0
        self.first_sent: float | None = None
        self.last_sent = 0.0
        self.sent_at: list[float] = []  # when each 202 came back (time.monotonic())
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.target = 0

    @hookimpl
    def ms1_batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        now = time.time()
        mono = time.monotonic()
        with self._lock:
            self.sent_at.append(mono)
            counts = self.counts
            for ref in batch.refs:
                waited = now - int(ref[:ref.index("-")]) / 1000
                # the bucket of bisect_left(_EDGES, waited), computed
                index = (math.ceil(waited * 10_000) - 1 if waited <= 2
                         else 19_999 + math.ceil((waited - 2) * 100))
                counts[min(max(index, 0), len(_EDGES))] += 1
            self.delivered += len(batch)
            self.requests += 1
            if self.first_sent is None:
                self.first_sent = now
            self.last_sent = now
            if self.delivered >= self.target:
                self.done.set()

    def percentile(self, q: float) -> float:
        total = sum(self.counts)
        if not total:
            return float("nan")
        rank = q * total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return _EDGES[min(i, len(_EDGES) - 1)]
        return _EDGES[-1]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def produce(config_path: str, count: int, rate: float, ready: bool = False) -> None:
    """Producer process: push ``count`` generated e-mails into the configured source (the
    inbound stream) with its own ``push`` (chunks of 500, pipelined), or one by one at
    ``rate``/s — as ``ms1-service enqueue`` does, so no Redis call lives here.

    ``ready``: generate every e-mail before the clock starts, as an ingestor has its
    e-mails at hand (the time measured is ms1's, not the sample generator's)."""
    pm = pluginmanager.make_plugin_manager()
    source = pluginmanager.build(pm, pluginmanager.load(pm, config_path), "source", inputs=[])
    emails: Iterable[bytes] = (sample.data for sample in samples.generate(count))
    if ready:
        emails = list(emails)
    started = time.time()
    chunk: list[bytes] = []
    for n, data in enumerate(emails):
        if rate:
            delay = started + n / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            source.push([data])
            continue
        chunk.append(data)
        if len(chunk) == 500:
            source.push(chunk)
            chunk = []
    source.push(chunk)
    print(json.dumps({"started": started, "ended": time.time()}), flush=True)
    source.close()


#: MS4's limit, 120 requests per 60 s, compressed ten-fold in time for --sweep
SWEEP_LIMIT = 120
SWEEP_WINDOW = 6.0


def share_of_ceiling(sent_at: Sequence[float], limit: int, window: float) -> float:
    """The window over the mean gap between request k and k-``limit`` (1.0: every request
    followed the one ``limit`` before it by exactly the window); NaN below limit+1."""
    times = sorted(sent_at)
    gaps = [times[k] - times[k - limit] for k in range(limit, len(times))]
    return window / (sum(gaps) / len(gaps)) if gaps else float("nan")


def steady_share(sent_at: Sequence[float], limit: int, window: float) -> float:
    """The share of a limiter's steady rate (``limit / window``) reached after its first
    window of learning: the rate of the 202s after the first window's end (their count
    less one over the time from the first to the last of them), over the limiter's rate.
    Every shape (sliding log or counter, fixed window, token or leaky bucket) lets
    ``limit / window`` a second through in the long run; what a burst adds comes once, in
    the first window. NaN with fewer than two 202s after it."""
    times = sorted(sent_at)
    if not times:
        return float("nan")
    after = [t for t in times if t > times[0] + window]
    if len(after) < 2 or after[-1] <= after[0]:
        return float("nan")
    return (len(after) - 1) / (after[-1] - after[0]) / (limit / window)


#: the limiters of ``--limiters``: ms4-sim's shapes, and nginx and HAProxy in front of
#: an unlimited ms4-sim (``KIND[:BURST]``; the fronts and the sim's other shapes send no
#: Retry-After, as nginx and HAProxy do not)
LIMITERS = ("sim:sliding-log", "sim:sliding-counter", "sim:fixed-window", "sim:token-bucket:20",
            "sim:leaky-bucket:0", "nginx:0", "nginx:20", "haproxy")


@dataclass(frozen=True)
class Scenario:
    """One limiter in front of MS4: ms4-sim's own ``shape`` (``front`` None) or a real
    proxy ``front`` before an unlimited sim; ``burst`` -1: the shape's default."""

    name: str
    front: str | None = None
    shape: str = "sliding-log"
    burst: int = -1

    @classmethod
    def parse(cls, text: str) -> Scenario:
        parts = text.split(":")
        kind, rest = parts[0], parts[1:]
        try:
            if kind == "sim" and rest and rest[0] in SHAPES:
                burst = int(rest[1]) if len(rest) > 1 else -1
                return cls(text, None, rest[0], burst)
            if kind in fronts.KINDS and len(rest) <= 1:
                return cls(text, kind, burst=int(rest[0]) if rest else 0)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(
            f"not a limiter: {text!r} (sim:SHAPE[:BURST] with SHAPE one of {SHAPES}, "
            f"nginx[:BURST] or haproxy)")

    def sim_args(self, args: argparse.Namespace) -> list[str]:
        if self.front is not None:
            return ["--rate-limit", "0"]
        quiet = [] if self.shape == "sliding-log" else ["--retry-after-form", "none"]
        return ["--limiter", self.shape, "--burst", str(self.burst),
                *(["--count-denied"] if self.shape == "sliding-counter" else []), *quiet]


def _config(path: Path, redis_url: str, sim_url: str, args: argparse.Namespace) -> None:
    if args.sweep:  # ms1's defaults (adaptive concurrency), MS4's limit compressed
        send = (f"requests_per_minute = {args.sweep_limit}\n"
                f"rate_window = {args.sweep_window:g}\nms4_counts_at = {args.count_at}")
    else:
        send = ((f"threads = {args.threads}\n" if args.threads else "")
                + "requests_per_minute = 1000000")
    path.write_text(f"""[ms1]
log_level = WARNING
[source]
name = redis
read_chunk = 500
[queue]
backend = redis
[dead_letters]
backend = redis
[batch]
max_items = 50
max_wait = {args.max_wait}
[send]
{send}
[ms4]
transport = http
[transport.http]
base_url = {sim_url}
[redis]
url = {redis_url}
consumer = bench
""")


def _sim_stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
        stats: dict[str, object] = json.loads(answer.read())
    return stats


def run(args: argparse.Namespace, latency: float = 0.0,
        scenario: Scenario | None = None) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="ms1-bench-"))
    redis_port, sim_port = _free_port(), _free_port()
    scenario = scenario or Scenario("sim:sliding-log")
    front: fronts.Front | None = None
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--dir", str(tmp), "--save", "",
             "--appendonly", "no" if args.aof == "no" else "yes",
             *(["--appendfsync", args.aof] if args.aof != "no" else [])],
            stdout=subprocess.DEVNULL, text=True))
        limit = (["--rate-limit", str(args.sweep_limit), "--window", f"{args.sweep_window:g}",
                  "--latency", f"{latency:g}", "--count-at", args.count_at,
                  *scenario.sim_args(args)]
                 if args.sweep else ["--rate-limit", "0"])
        sim = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", str(sim_port),
                                *limit, "--api-key", "bench-key"],
                               stdout=subprocess.PIPE, text=True)
        procs.append(sim)
        assert sim.stdout is not None
        sim.stdout.readline()
        time.sleep(0.3)
        config_path = tmp / "bench.ini"
        sim_url = f"http://127.0.0.1:{sim_port}"
        ms4_url = sim_url
        if args.sweep and scenario.front is not None:
            front = fronts.start(scenario.front, tmp / "front", _free_port(), sim_port,
                                 args.sweep_limit, args.sweep_window, scenario.burst)
            ms4_url = front.url
        _config(config_path, redis_url, ms4_url, args)
        os.environ["MS1_MS4_API_KEY"] = "bench-key"
        producer_cmd = [sys.executable, "-m", "ms1_tools.bench", "--produce", str(config_path),
                        str(args.count), str(args.rate), "stream" if args.backlog else "ready"]

        cpu_before = _cpu()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        recorder = LatencyRecorder()
        recorder.target = args.count
        pm = pluginmanager.make_plugin_manager(plugins=[recorder])
        config = pluginmanager.load(pm, str(config_path))
        components = Components.build(pm, config)
        service = Service(config, pm, components)
        if args.backlog:
            started = time.time()
            out = subprocess.run(producer_cmd, capture_output=True, text=True, check=True)
            enqueued = json.loads(out.stdout)
            print(f"backlog: {args.count:,} e-mails queued in Redis in "
                  f"{enqueued['ended'] - enqueued['started']:.1f} s; starting ms1")
            drain_start = time.time()
            service.start()
        else:
            producer = subprocess.Popen(producer_cmd, stdout=subprocess.PIPE, text=True)
            procs.append(producer)
            service.start()
            started = time.time()
        backlog: list[tuple[int, int, int, int]] = []

        def sample() -> None:
            while not recorder.done.wait(0.1):
                with contextlib.suppress(Exception):
                    stats = components.queue.stats()
                    backlog.append((service._inbox.qsize(), stats.ready, stats.in_flight,
                                    service._outbox.qsize()))

        threading.Thread(target=sample, daemon=True).start()
        flight: list[tuple[int, int]] = []  # (requests in flight, concurrency target)

        def sample_flight() -> None:
            service.in_flight.take_peak()
            while not recorder.done.wait(0.01):  # from the first request on
                if flight or service.in_flight.current:
                    flight.append((service.in_flight.current, service.concurrency.target))

        threading.Thread(target=sample_flight, daemon=True).start()
        finished = recorder.done.wait(args.timeout)
        if backlog:
            n = len(backlog)
            inbox, ready, in_flight, to_commit = (sum(b[k] for b in backlog) / n
                                                  for k in range(4))
            print(f"mean backlog: inbox {inbox:.1f} chunks, to commit {to_commit:.1f}, "
                  f"outbound ready {ready:.1f}, in flight {in_flight:.1f} batches")
        ended = recorder.last_sent
        peak_in_flight = service.in_flight.take_peak()
        in_flight_mean = (statistics.fmean(f[0] for f in flight) if flight
                          else float("nan"))
        learned = service.pacer.limiter.shape
        floor = service.pacer.limiter.spacing_floor
        service.shutdown(10)
        dead_lettered = components.dead_letters.count()
        components.close()
        if args.sweep:
            answers = service.stats.snapshot()
            stats = _sim_stats(sim_url)
            by_status = stats["requests_by_status"]
            accepted = stats["unique_invoices_accepted"]
            assert isinstance(by_status, dict) and isinstance(accepted, int)
            window = args.sweep_window
            return {
                "latency_s": latency, "requests": len(recorder.sent_at),
                "seconds": (recorder.last_sent - recorder.first_sent
                            if recorder.first_sent is not None else float("nan")),
                "share": share_of_ceiling(recorder.sent_at, args.sweep_limit, window),
                # a slot is held past the window by the latency (MS4 counting answers) or
                # by count_margin, never past the answer (arrivals): the most a limiter
                # never risking a 429 reaches
                "theoretical_max": window / (window + (
                    latency if args.count_at == "answer"
                    else min(latency, config.get_float("send", "count_margin")))),
                "max_in_window": int(stats["max_in_window"]),  # type: ignore[call-overload]
                "in_flight_max": peak_in_flight,
                "in_flight_mean": in_flight_mean,
                "target_max": max((f[1] for f in flight), default=0),
                "target_mean": (statistics.fmean(f[1] for f in flight)
                                if flight else float("nan")),
                "answers_429": int(answers.get("responses_429", 0)),
                "answers": float(sum(v for k, v in answers.items()
                                     if k.startswith("responses_"))),
                "steady": steady_share(recorder.sent_at, args.sweep_limit, window),
                "burst": learned.burst if learned is not None else float("nan"),
                "spacing": max(learned.spacing, floor) if learned is not None else 0.0,
                "floor": floor,
                "duplicates": int(stats["duplicate_invoices"]),  # type: ignore[call-overload]
                "lost": args.count - accepted - dead_lettered,
                "dead_lettered": dead_lettered,
                "finished": float(finished),
            }
        if not finished:
            raise SystemExit(f"timed out: {recorder.delivered:,} of {args.count:,} delivered")
        if not args.backlog:
            assert producer.stdout is not None
            times = json.loads(producer.stdout.readline())
            started = times["started"]
            drain_start = started
        elapsed = ended - started
        drain = ended - drain_start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu = _cpu() - cpu_before
        usage, was = resource.getrusage(resource.RUSAGE_SELF), usage_before
        print(f"ms1 process: user {usage.ru_utime - was.ru_utime:.1f} s, system "
              f"{usage.ru_stime - was.ru_stime:.1f} s, voluntary context switches "
              f"{usage.ru_nvcsw - was.ru_nvcsw:,}, involuntary {usage.ru_nivcsw - was.ru_nivcsw:,}")
        result = {
            "invoices": args.count, "elapsed_s": elapsed, "invoices_per_s": args.count / elapsed,
            "drain_invoices_per_s": args.count / drain,
            "requests_per_s": recorder.requests / drain,
            "p50_ms": recorder.percentile(0.50) * 1000, "p99_ms": recorder.percentile(0.99) * 1000,
            "peak_rss_mib": rss, "cpu_us_per_invoice": cpu / args.count * 1e6,
            "in_flight_mean": in_flight_mean,
            "in_flight_max": peak_in_flight,
        }
        return result
    finally:
        if front is not None:
            front.stop()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def reference(path: str, count: int) -> float:
    out = subprocess.run([sys.executable, path, str(count)], capture_output=True, text=True,
                         check=True, timeout=3600).stdout
    match = re.search(r"end-to-end ([\d,]+)/s", out)
    if match is None:
        raise SystemExit(f"cannot read the reference's output: {out!r}")
    print(f"reference ({path}): {out.strip()}", flush=True)
    return float(match.group(1).replace(",", ""))


def _report(args: argparse.Namespace, result: dict[str, float]) -> None:
    mode = "backlog" if args.backlog else (f"{args.rate:g}/s" if args.rate else "overlapped")
    senders = f"{args.threads} senders" if args.threads else "adaptive concurrency"
    print(f"ms1: {args.count:,} invoices ({mode}, {senders}, max_wait "
          f"{args.max_wait} s): end-to-end {result['invoices_per_s']:,.0f} invoices/s, "
          f"drain {result['drain_invoices_per_s']:,.0f}/s, "
          f"{result['requests_per_s']:,.0f} requests/s, inbound-to-202 p50 "
          f"{result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms, "
          f"peak RSS {result['peak_rss_mib']:.1f} MiB, ms1 CPU "
          f"{result['cpu_us_per_invoice']:.0f} us/invoice, requests in flight mean "
          f"{result['in_flight_mean']:.2f} most {result['in_flight_max']:.0f}", flush=True)


def _sweep_line(r: dict[str, float], name: str = "") -> str:
    return (f"{name:<22}{r['latency_s']:>6.2f} s  {r['steady']:>6.1%}  "
            f"{r['answers_429'] / max(1.0, r['answers']):>5.1%}  "
            f"{r['burst']:>5.0f} {r['spacing']:>5.1%}  "
            f"{r['share']:>6.1%}  {r['theoretical_max']:>6.1%}  "
            f"{r['share'] / r['theoretical_max']:>6.1%}  {r['in_flight_max']:>4.0f} / "
            f"{r['in_flight_mean']:>4.1f}  {r['target_max']:>4.0f} / {r['target_mean']:>4.1f}  "
            f"{r['answers_429']:>4.0f}  {r['lost']:>4.0f}  {r['requests']:>8.0f}  "
            f"{r['seconds']:>5.1f} s")


SWEEP_HEADER = ("limiter                 latency  steady  429 %  burst space   share     max  "
                "of max  in flight    target        429s  lost  requests   202s over")


def sweep(args: argparse.Namespace, latencies: Sequence[float]) -> list[dict[str, float]]:
    """Run ms1 (default settings) against the compressed limit at each latency, behind
    each limiter of ``--limiters``; print a line per run as it ends, then the table."""
    window = args.sweep_window
    print(f"sweep: {args.count:,} invoices per run (batches of 50), ms1 default settings "
          f"(adaptive concurrency), MS4 limit {args.sweep_limit} per {window:g} s on the "
          f"limiter and in ms1; steady = the 202s' rate after the first window over the "
          f"limit's rate; 429 % of ms1's answers; share (sliding log) = the window over the "
          f"mean gap between 202 k and k-{args.sweep_limit}; max = {window:g} / ({window:g} + "
          "latency); in flight and target: most / mean", flush=True)
    print(SWEEP_HEADER, flush=True)
    results = []
    lines = []
    for scenario in args.limiters:
        for latency in latencies:
            result = run(args, latency, scenario)
            results.append(result)
            lines.append(_sweep_line(result, scenario.name))
            print(lines[-1], flush=True)
    print()
    print(SWEEP_HEADER)
    for line in lines:
        print(line)
    if any(not r["finished"] for r in results):
        print(f"some latency timed out after {args.timeout:g} s: what was not delivered is "
              "counted lost")
    return results


def _limiters(text: str) -> list[Scenario]:
    names = LIMITERS if text.strip() == "all" else [p.strip() for p in text.split(",")
                                                     if p.strip()]
    return [Scenario.parse(name) for name in names]


def _latencies(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of seconds: {text!r}"
                                         ) from None
    if not values or any(not 0 <= v <= 60 for v in values):
        raise argparse.ArgumentTypeError(f"latencies must be in [0, 60] s: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms1-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int,
                        help="e-mails (default 50,000; with --sweep 15,000 per latency)")
    parser.add_argument("--backlog", action="store_true",
                        help="queue every e-mail in Redis before ms1 starts")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="light load: e-mails per second (0: as fast as possible)")
    parser.add_argument("--threads", type=int, default=0,
                        help="[send] threads: fixed concurrency (default: not set, adaptive)")
    parser.add_argument("--max-wait", type=float, default=0.05, help="[batch] max_wait (s)")
    parser.add_argument("--aof", choices=("no", "everysec", "always"), default="no",
                        help="Redis persistence (default no, like the reference loop)")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for every 202 (default 1800; with --sweep 120 "
                             "per latency, what is undelivered then counts as lost)")
    parser.add_argument("--sweep", type=_latencies, metavar="L1,L2,...",
                        help="MS4 latencies (s): ms1 with default settings against MS4's "
                             "limit compressed ten-fold, one table")
    parser.add_argument("--count-at", choices=("arrival", "answer"), default="arrival",
                        help="with --sweep: when ms4-sim counts a request against its limit, "
                             "and what ms1 is told ([send] ms4_counts_at; default arrival)")
    parser.add_argument("--limiters", type=_limiters, default=None, metavar="L1,L2,...",
                        help="with --sweep: the rate limiters MS4 sits behind, each run at "
                             "every latency: sim:SHAPE[:BURST] (ms4-sim's own: sliding-log, "
                             "sliding-counter, fixed-window, token-bucket, leaky-bucket), "
                             "nginx[:BURST] or haproxy (started from the Debian package "
                             "before an unlimited ms4-sim); 'all': "
                             + ",".join(LIMITERS) + " (default: sim:sliding-log)")
    parser.add_argument("--sweep-limit", type=int, default=SWEEP_LIMIT,
                        help="with --sweep: MS4's limit (default 120)")
    parser.add_argument("--sweep-window", type=float, default=SWEEP_WINDOW,
                        help="with --sweep: MS4's window, seconds (default 6: ten-fold "
                             "compressed)")
    parser.add_argument("--reference", metavar="LIMIT_PY",
                        help="also run the reference loop with the same count, right before "
                             "and right after ms1; print ms1's throughput as a ratio to "
                             "their mean")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --reference: rounds of reference, ms1, reference "
                             "(the machine is noisy: the median ratio is the figure)")
    parser.add_argument("--produce", nargs=4, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``ms1-bench``'s arguments, with the defaults that depend on the mode filled in."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 15_000 if args.sweep else 50_000
    if args.timeout is None:
        args.timeout = 120.0 if args.sweep else 1800.0
    if args.limiters is None:
        args.limiters = [Scenario("sim:sliding-log")]
    if args.sweep and (args.backlog or args.rate or args.reference):
        parser.error("--sweep runs every e-mail at once: no --backlog, --rate, --reference")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.produce:
        config_path, count, rate, mode = args.produce
        produce(config_path, int(count), float(rate), ready=mode == "ready")
        return 0
    if shutil.which("redis-server") is None:
        _parser().error("redis-server is not installed")
    if args.sweep:
        sweep(args, args.sweep)
        return 0
    if not args.reference:
        _report(args, run(args))
        return 0
    ratios = []
    for round_ in range(1, max(1, args.repeat) + 1):
        before = reference(args.reference, args.count)
        result = run(args)
        _report(args, result)
        after = reference(args.reference, args.count)
        ratio = result["invoices_per_s"] / ((before + after) / 2)
        ratios.append(ratio)
        print(f"round {round_}: ms1 {result['invoices_per_s']:,.0f}/s, reference "
              f"{before:,.0f}/s before and {after:,.0f}/s after: ratio ms1 / reference "
              f"end-to-end {ratio:.2f}", flush=True)
    if len(ratios) > 1:
        print(f"ratio over {len(ratios)} rounds: median {statistics.median(ratios):.2f}, "
              f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
