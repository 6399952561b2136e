"""Chaos test: a seeded random schedule of faults against a real run, on every CI run.

Every part runs as in production, each in its own process: the service
(``python -m ms1.cli``: Redis source, Redis outbound queue, Redis dead letters, the Redis
rate limiter, the API key from ``[ms4] api_key_file``), its own ``redis-server`` (AOF,
``appendfsync always``) and ``ms4-sim``. A producer thread keeps adding valid e-mails
with known invoice ids to the inbound stream while the schedule, drawn from
``random.Random(seed)``, injects at random moments: kill -9 of the service (restarted,
sometimes under a new consumer name, so its entries are taken over), kill -9 of Redis
(restarted on the same data), MS4 500s, answers lost after MS4 accepted the batch (the
connection closed unanswered, or reset mid-answer), 429s with ``Retry-After`` as seconds
and as an HTTP-date, slow answers, 401 spells ended by a key rotation (key file written,
SIGHUP, the sim's key switched — in the three orders, one of them making an in-flight
old-key request come back 401 after the reload), and garbage inbound entries.

Then the faults stop, the service drains (polled: a failure once nothing has moved for
20 s) and is stopped with SIGTERM (exit 0), and the test asserts: no valid invoice lost
(each accepted by MS4, or dead-lettered because the sim rejects it on purpose); every
garbage entry dead-lettered with its raw content and a reason; duplicates only ever
under the original batch's ``Idempotency-Key`` and, beyond the re-sends after a lost
answer, at most ``threads x batch size`` invoices per kill (service or Redis); both
streams empty and nothing pending. It prints the seed, the schedule as executed (times
from the start of the fault phase) and the figures.

``MS1_CHAOS_SEED=<seed>`` replays a run (without it a random seed is drawn and printed);
``MS1_CHAOS_SECONDS`` sets the fault phase (default 35 s; the whole test takes 40-60 s):

    MS1_CHAOS_SEED=123 MS1_CHAOS_SECONDS=1800 .venv/bin/python -m pytest -s tests/test_chaos.py
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis as redis_py
from conftest import RedisServer
from support import SimProcess, service_ini, tail, wait_until

from ms1.pipeline import samples
from ms1_tools.sim import REJECT_EVERY_REASON, is_rejected_by_sim

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INBOUND, OUTBOUND, DEAD_LETTERS, GROUP = "ms1:emails", "ms1:outbound", "ms1:dead-letters", "ms1"
THREADS, BATCH = 4, 50
#: the sim rejects (400) about 1 invoice in this many: split, then dead-lettered
REJECT_EVERY = 97
#: the sim's latency outside slow spells
BASE_LATENCY = 0.01
DEFAULT_SECONDS = 35.0
#: the drain fails when nothing moves for STALL_TIMEOUT s (longer than a takeover needs:
#: visibility_timeout 6 s + a claim interval), or after DRAIN_TIMEOUT s in all
STALL_TIMEOUT = 20.0
DRAIN_TIMEOUT = 90.0
PREFIX = "CHAOS"


def catches(pid: int, signum: int) -> bool:
    """True once process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc).

    Before the service has installed its handlers, SIGHUP or SIGTERM would kill it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    found = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
    return found is not None and bool(int(found.group(1), 16) >> (signum - 1) & 1)


# --- ms4-sim in its own process ---------------------------------------------------------


class Sim(SimProcess):
    """An ms4-sim process, steered through ``POST /_control``."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], tmp_path: Path, api_key: str,
                 seed: int) -> None:
        super().__init__(procs, tmp_path / "sim.log", "--api-key", api_key, "--rate-limit",
                         "0", "--latency", str(BASE_LATENCY), "--reject-every",
                         str(REJECT_EVERY), "--seed", str(seed))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=15)


# --- the service ---------------------------------------------------------------------------


class Service:
    """The ms1 service as a subprocess: started, killed -9, restarted, reloaded, stopped.

    Each start gets its own log file; a start under a new consumer name gets its own config
    file (the same in all else), so the old name's pending entries must be taken over."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], tmp_path: Path, *, sim_url: str,
                 redis_url: str, key_file: Path) -> None:
        self.procs, self.dir = procs, tmp_path
        self.sim_url, self.redis_url, self.key_file = sim_url, redis_url, key_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.consumers: list[str] = []
        self.log = tmp_path / "service-0.log"

    def config(self, consumer: str) -> Path:
        path = self.dir / f"ms1-{consumer}.ini"
        path.write_text(service_ini(self.redis_url, ms4_url=self.sim_url, settings={
            "ms1": {"shutdown_timeout": 10},
            "batch": {"max_items": BATCH},
            "send": {"threads": THREADS, "rate_limiter": "redis", "requests_per_minute": 6000,
                     "rate_window": 6, "retry_after_default": 1, "retry_after_max": 3,
                     "breaker_failures": 5, "breaker_reset": 1, "auth_probe_interval": 2},
            "ms4": {"api_key_file": self.key_file},
            "transport.http": {"connect_timeout": 1, "read_timeout": 5, "write_timeout": 5,
                               "pool_timeout": 5, "request_timeout": 5},
            "redis": {"consumer": consumer, "visibility_timeout": 6},
        }))
        return path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, consumer: str) -> None:
        assert not self.running
        self.log = self.dir / f"service-{self.starts}.log"
        self.starts += 1
        if consumer not in self.consumers:
            self.consumers.append(consumer)
        env = {k: v for k, v in os.environ.items() if k != "MS1_MS4_API_KEY"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ms1.cli", "--config", str(self.config(consumer))],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(self.proc)

    def died(self) -> str | None:
        """Why the service is gone though nobody stopped it (None while it runs)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the service exited by itself with {self.proc.returncode}:\n{tail(self.log)}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def signal(self, signum: int) -> None:
        """Send ``signum`` once the service handles it (it would die of it before)."""
        assert self.proc is not None
        pid = self.proc.pid
        assert wait_until(lambda: catches(pid, signum) or self.proc is None
                          or self.proc.poll() is not None, 30, interval=0.02), \
            f"the service installed no handler for {signal.Signals(signum).name} in 30 s"
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"the service did not exit {timeout} s after SIGTERM:\n{tail(self.log)}")

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace")
                         for path in sorted(self.dir.glob("service-*.log")))


# --- the producer: valid e-mails all along, garbage when the schedule says ----------------------

#: garbage inbound entries: no ``email`` field, binary names and values, no e-mail in it,
#: a valid e-mail with other fields beside it, one named in binary (README: set aside with
#: all its fields; text-named ones beside ``email`` are ignored, issue 21)
GARBAGE_KINDS = ("no_email", "binary_fields", "wrong_field_name", "extra_fields",
                 "binary_email", "not_json", "json_not_object", "empty_email",
                 "invalid_invoice")


def garbage(kind: str, n: int) -> dict[bytes, bytes]:
    """The fields of garbage entry number ``n`` of this kind."""
    if kind == "no_email":
        return {b"body": f"hello {n}".encode(), b"from": b"someone"}
    if kind == "binary_fields":
        return {b"\xff\xfe\x00" + bytes([n % 256]): b"\x80\x81\xfe\x00", b"x": b"\x00\xff"}
    if kind == "wrong_field_name":  # a valid e-mail under the wrong name: not delivered
        sample = next(samples.generate(1, prefix="WRONGFIELD", start=n))
        return {b"Email": sample.data}
    if kind == "extra_fields":
        sample = next(samples.generate(1, prefix="EXTRAFIELDS", start=n))
        return {b"email": sample.data, b"trace": b"\xff\x00 binary", b"\xfe": b"x"}
    if kind == "binary_email":
        return {b"email": b"\xff\xfe\x00\x80 not UTF-8 " + bytes([n % 256])}
    if kind == "not_json":
        return {b"email": b'{"message_id": "<garbage.%d@x>", "raw_json": {' % n}
    if kind == "json_not_object":
        return {b"email": b"[1, 2, %d]" % n}
    if kind == "empty_email":
        return {b"email": b""}
    if kind == "invalid_invoice":  # each of the sample generator's defects in turn
        sample = next(samples.generate(1, invalid_every=1, prefix="GARBAGE", start=n))
        assert not sample.valid
        return {b"email": sample.data}
    raise AssertionError(kind)


@dataclass
class Produced:
    valid: dict[str, str] = field(default_factory=dict)  # invoice id -> entry id
    garbage: dict[str, tuple[str, dict[bytes, bytes]]] = field(default_factory=dict)
    redis_errors: int = 0


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class Producer(threading.Thread):
    """Adds e-mails as the ingestor would, through Redis outages, never one twice.

    Entries get explicit, increasing ids and each chunk goes in one MULTI/EXEC, so after an
    error the stream's ``last-generated-id`` tells whether the chunk is in (all of it) or
    not (none of it): a retry never adds an entry twice, a failure never loses one."""

    def __init__(self, redis_url: str, rng: random.Random) -> None:
        super().__init__(name="producer", daemon=True)
        self.client = redis_py.Redis.from_url(redis_url, socket_timeout=2,
                                              socket_connect_timeout=1)
        self.rng = rng
        self.stopping = threading.Event()
        self.abort = threading.Event()  # the test is over: give up at once
        self.garbage_queue: queue.Queue[list[str]] = queue.Queue()
        self.produced = Produced()
        self.failure: BaseException | None = None
        self._last = (0, 0)
        self._next_valid = 0
        self._next_garbage = 0

    def _next_id(self) -> str:
        now = int(time.time() * 1000)
        ms, seq = (now, 0) if now > self._last[0] else (self._last[0], self._last[1] + 1)
        self._last = (ms, seq)
        return f"{ms}-{seq}"

    def _add(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        deadline = time.monotonic() + 120
        last = parse_id(entries[-1][0])
        while True:
            try:
                pipe = self.client.pipeline(transaction=True)
                for entry_id, fields in entries:
                    pipe.xadd(INBOUND, fields, id=entry_id)  # type: ignore[arg-type]
                pipe.execute()
                return
            except redis_py.RedisError:
                self.produced.redis_errors += 1
            while True:  # did the chunk go in before the error?
                if self.abort.is_set():
                    raise RuntimeError("producer: aborted")
                if time.monotonic() > deadline:
                    raise RuntimeError("producer: Redis unreachable for 120 s")
                try:
                    info = self.client.xinfo_stream(INBOUND)
                    top = parse_id(info["last-generated-id"].decode())
                except redis_py.ResponseError:  # no stream yet
                    top = (0, 0)
                except redis_py.RedisError:
                    time.sleep(0.1)
                    continue
                break
            if top >= last:
                return

    def run(self) -> None:
        try:
            while (not self.stopping.is_set() or not self.garbage_queue.empty()) \
                    and not self.abort.is_set():
                entries: list[tuple[str, dict[bytes, bytes]]] = []
                try:
                    kinds = self.garbage_queue.get_nowait()
                except queue.Empty:
                    kinds = []
                for kind in kinds:
                    fields = garbage(kind, self._next_garbage)
                    self._next_garbage += 1
                    entry_id = self._next_id()
                    entries.append((entry_id, fields))
                    self.produced.garbage[entry_id] = (kind, fields)
                if not self.stopping.is_set():
                    # a trickle, now and then a burst (a backlog: full batches, group commits)
                    burst = self.rng.random() < 0.02
                    count = self.rng.randint(300, 1500) if burst else self.rng.randint(1, 40)
                    for sample in samples.generate(count, prefix=PREFIX, start=self._next_valid):
                        entry_id = self._next_id()
                        entries.append((entry_id, {b"email": sample.data}))
                        self.produced.valid[sample.invoice_id] = entry_id
                    self._next_valid += count
                if entries:
                    self._add(entries)
                self.stopping.wait(self.rng.uniform(0.05, 0.25))
        except BaseException as exc:  # reported by the test
            self.failure = exc
        finally:
            self.client.close()


# --- the schedule ----------------------------------------------------------------------------


@dataclass(order=True)
class Step:
    """One primitive injection at ``at`` seconds into the fault phase."""

    at: float
    seq: int
    action: str  # service_kill, service_start, redis_kill, redis_start, sim, key_file,
    #              sighup, garbage
    args: dict[str, Any] = field(compare=False, default_factory=dict)
    fault: str = field(compare=False, default="")

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.action} {args}".strip() + (f"  [{self.fault}]" if self.fault else "")


#: fault -> weight; each is one or more steps, ended within the fault phase
FAULTS = {"service_kill": 3, "redis_kill": 2, "fail_500": 2, "lost_answers": 2, "fail_429": 2,
          "slow": 2, "key_rotation": 2, "garbage": 3}


def plan(rng: random.Random, seconds: float) -> list[Step]:
    """The whole schedule, drawn from ``rng`` before the run starts."""
    steps: list[Step] = []
    busy: dict[str, float] = defaultdict(float)  # resource -> busy until
    key_number = 1
    consumer_number = 0

    def add(at: float, action: str, fault: str, **args: Any) -> None:
        steps.append(Step(round(at, 3), len(steps), action, args, fault))

    t = 1.0
    names, weights = list(FAULTS), list(FAULTS.values())
    while True:
        t += rng.expovariate(1 / 1.0)
        if t >= seconds - 0.5:
            break
        fault = rng.choices(names, weights)[0]
        length = min(rng.uniform(0.5, 4.0), seconds - t)
        end = t + length
        resource = {"service_kill": "service", "redis_kill": "redis",
                    "key_rotation": "key", "fail_429": "sim_429", "garbage": "none",
                    "lost_answers": "sim_lost", "fail_500": "sim_500", "slow": "sim_latency"
                    }[fault]
        if busy[resource] > t:
            continue
        busy[resource] = end
        if fault == "service_kill":
            # restart at once or after a pause; now and then under a new consumer name
            if rng.random() < 0.3:
                consumer_number += 1
            add(t, "service_kill", fault)
            add(t + rng.uniform(0.0, min(1.5, length)), "service_start", fault,
                consumer=f"chaos-{consumer_number}")
        elif fault == "redis_kill":
            add(t, "redis_kill", fault)
            add(end, "redis_start", fault)
        elif fault == "fail_500":
            add(t, "sim", fault, fail_500=round(rng.choice([0.3, 0.6, 1.0]), 2))
            add(end, "sim", fault, fail_500=0.0)
        elif fault == "lost_answers":
            how = rng.choice(["drop", "reset"])
            add(t, "sim", fault, **{how: round(rng.uniform(0.2, 0.7), 2)})
            add(end, "sim", fault, **{how: 0.0})
        elif fault == "fail_429":
            add(t, "sim", fault, fail_429=round(rng.uniform(0.2, 0.9), 2),
                retry_after=rng.choice([1, 2, 3]),
                retry_after_form=rng.choice(["seconds", "http-date"]))
            add(end, "sim", fault, fail_429=0.0)
        elif fault == "slow":
            add(t, "sim", fault, latency=round(rng.uniform(0.2, 1.5), 2))
            add(end, "sim", fault, latency=BASE_LATENCY)
        elif fault == "key_rotation":
            end = t + min(length, rng.uniform(0.5, 2.5))
            busy[resource] = end
            key_number += 1
            key = f"chaos-key-{key_number}"
            order = rng.choice(["sim_first", "service_first", "in_flight"])
            if order == "sim_first":  # 401s until the service reloads the new key
                add(t, "sim", f"{fault} {order}", api_key=key)
                add(end, "key_file", f"{fault} {order}", key=key)
                add(end, "sighup", f"{fault} {order}")
            elif order == "service_first":  # the new key is refused until the sim has it
                add(t, "key_file", f"{fault} {order}", key=key)
                add(t, "sighup", f"{fault} {order}")
                add(end, "sim", f"{fault} {order}", api_key=key)
            else:  # old-key requests still in flight answer 401 after the reload
                add(t, "sim", f"{fault} {order}", latency=0.6)
                add(t + 0.3, "sim", f"{fault} {order}", api_key=key)
                add(t + 0.3, "key_file", f"{fault} {order}", key=key)
                add(t + 0.3, "sighup", f"{fault} {order}")
                add(max(end, t + 1.2), "sim", f"{fault} {order}", latency=BASE_LATENCY)
                busy["sim_latency"] = max(busy["sim_latency"], end, t + 1.2)
        else:
            add(t, "garbage", fault, kinds=rng.choices(GARBAGE_KINDS, k=rng.randint(1, 4)))
    return sorted(steps)


# --- checking the outcome ------------------------------------------------------------------


def decode_fields(payload: bytes) -> dict[bytes, bytes]:
    """The raw fields of a source dead letter (``{"fields": [[name, value], ...]}``)."""
    def raw(value: Any) -> bytes:
        if isinstance(value, dict):
            return base64.b64decode(value["base64"])
        return str(value).encode("utf-8")

    return {raw(name): raw(value) for name, value in json.loads(payload)["fields"]}


def pending(client: redis_py.Redis, stream: str) -> int:
    try:
        return int(client.xpending(stream, GROUP)["pending"])
    except redis_py.ResponseError:  # no such stream or group
        return 0


@dataclass
class Figures:
    emails: int = 0
    valid: int = 0
    garbage: int = 0
    accepted: int = 0
    rejected_by_sim: int = 0
    dead_letters: int = 0
    lost: list[str] = field(default_factory=list)
    wrongly_dead_lettered: list[str] = field(default_factory=list)
    garbage_missing: list[str] = field(default_factory=list)
    garbage_wrong: list[str] = field(default_factory=list)
    stray_letters: list[str] = field(default_factory=list)
    stray_accepted: list[str] = field(default_factory=list)  # garbage that reached MS4
    duplicate_invoices: int = 0
    duplicate_batches: int = 0
    resent_after_lost_answer: int = 0  # invoices
    resent_unexplained_batches: int = 0
    resent_unexplained: int = 0  # invoices
    other_key_duplicates: list[str] = field(default_factory=list)
    lost_answers: int = 0

    def line(self) -> str:
        return (f"e-mails {self.emails} (valid {self.valid}, garbage {self.garbage}), accepted "
                f"{self.accepted}, dead letters {self.dead_letters} (sim rejects "
                f"{self.rejected_by_sim}), lost {len(self.lost)}, duplicate invoices "
                f"{self.duplicate_invoices} in {self.duplicate_batches} batches (after a lost "
                f"answer: {self.resent_after_lost_answer} invoices of {self.lost_answers} lost "
                f"answers; otherwise: {self.resent_unexplained} invoices in "
                f"{self.resent_unexplained_batches} batches)")


def analyse(produced: Produced, accepted: list[dict[str, Any]],
            letters: list[tuple[str, dict[bytes, bytes]]]) -> Figures:
    figures = Figures(emails=len(produced.valid) + len(produced.garbage),
                      valid=len(produced.valid), garbage=len(produced.garbage),
                      dead_letters=len(letters))
    accepted_ids = {i for request in accepted for i in request["invoice_ids"]}
    figures.accepted = len(accepted_ids)
    figures.stray_accepted = sorted(accepted_ids - set(produced.valid))
    by_ref: dict[str, list[dict[bytes, bytes]]] = defaultdict(list)
    ms4_letters: dict[str, dict[bytes, bytes]] = {}
    for letter_id, fields in letters:
        stage = fields.get(b"stage", b"").decode()
        ref = fields.get(b"source_ref", b"").decode()
        invoice_id = fields.get(b"invoice_id", b"").decode()
        if stage == "ms4" and invoice_id:
            ms4_letters[invoice_id] = fields
        elif ref in produced.garbage:
            by_ref[ref].append(fields)
        else:
            figures.stray_letters.append(f"{letter_id}: {fields!r}"[:300])
    # every valid invoice: accepted, or dead-lettered because the sim rejects it
    for invoice_id in produced.valid:
        if is_rejected_by_sim(invoice_id, REJECT_EVERY):
            figures.rejected_by_sim += 1
            letter = ms4_letters.get(invoice_id)
            if letter is None or REJECT_EVERY_REASON not in letter[b"reason"].decode():
                figures.lost.append(invoice_id)
        elif invoice_id not in accepted_ids:
            figures.lost.append(invoice_id)
    figures.wrongly_dead_lettered = sorted(
        i for i in ms4_letters if not is_rejected_by_sim(i, REJECT_EVERY))
    # every garbage entry: dead-lettered with its raw content and a reason
    for entry_id, (kind, sent) in produced.garbage.items():
        found = by_ref.get(entry_id)
        if not found:
            figures.garbage_missing.append(f"{entry_id} ({kind}): {sent!r}")
            continue
        for fields in found:
            payload = fields.get(b"payload", b"")
            reason = fields.get(b"reason", b"").decode()
            stage = fields.get(b"stage", b"").decode()
            # its content: the e-mail as read (processor), or all its fields (source)
            try:
                kept = decode_fields(payload) == sent
            except (ValueError, KeyError, TypeError):
                kept = False
            if set(sent) == {b"email"}:
                ok = stage in ("processor", "source") and (payload == sent[b"email"] or kept)
            else:
                ok = stage == "source" and kept
            if not ok or not reason:
                figures.garbage_wrong.append(f"{entry_id} ({kind}): sent {sent!r}, letter "
                                             f"stage {stage!r} reason {reason!r} payload "
                                             f"{payload[:200]!r}")
    # duplicates: per Idempotency-Key, each re-acceptance is explained by an earlier lost
    # answer, or else by a kill (a batch MS4 accepted whose ack did not reach Redis)
    keys_of: dict[str, set[str]] = defaultdict(set)
    seen: set[str] = set()
    keys_seen: set[str] = set()
    lost_before: Counter[str] = Counter()
    for request in accepted:
        key, ids = str(request["idempotency_key"]), request["invoice_ids"]
        lost = request["answer"] != "202"
        figures.lost_answers += lost
        for invoice_id in ids:
            keys_of[invoice_id].add(key)
            figures.duplicate_invoices += invoice_id in seen
            seen.add(invoice_id)
        if key in keys_seen:
            figures.duplicate_batches += 1
            if lost_before[key] > 0:
                lost_before[key] -= 1
                figures.resent_after_lost_answer += len(ids)
            else:
                figures.resent_unexplained_batches += 1
                figures.resent_unexplained += len(ids)
        keys_seen.add(key)
        if lost:
            lost_before[key] += 1
    figures.other_key_duplicates = sorted(i for i, keys in keys_of.items() if len(keys) > 1)
    return figures


def drain(left: Callable[[], tuple[int, ...]], accepted: Callable[[], int]) -> bool:
    """Poll until nothing is left (True), or until nothing has moved -- neither what is left
    nor what MS4 accepted -- for STALL_TIMEOUT s, or DRAIN_TIMEOUT s have passed (False)."""
    started = moved = time.monotonic()
    last = (left(), accepted())
    while True:
        now_left = left()
        if not any(now_left):
            return True
        now = (now_left, accepted())
        if now != last:
            last, moved = now, time.monotonic()
        if time.monotonic() - moved > STALL_TIMEOUT or time.monotonic() - started > DRAIN_TIMEOUT:
            return False
        time.sleep(0.2)


# --- the test ------------------------------------------------------------------------------


@dataclass
class Run:
    seed: int
    seconds: float
    started: float = field(default_factory=time.monotonic)
    done: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.done.append(f"{time.monotonic() - self.started:7.2f} s  {text}")


@pytest.fixture
def chaos_seed() -> Iterator[int]:
    text = os.environ.get("MS1_CHAOS_SEED", "")
    seed = int(text) if text else random.SystemRandom().randrange(1, 1_000_000)
    print(f"\nchaos seed {seed} (replay: MS1_CHAOS_SEED={seed})", flush=True)
    yield seed


def test_chaos(own_redis: RedisServer, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
               chaos_seed: int) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when the service handles signals")
    seed = chaos_seed
    seconds = float(os.environ.get("MS1_CHAOS_SECONDS") or DEFAULT_SECONDS)
    rng = random.Random(seed)
    steps = plan(rng, seconds)
    run = Run(seed, seconds)
    report: list[str] = [f"chaos seed {seed}, fault phase {seconds:.0f} s, "
                         f"{len(steps)} steps planned (replay: MS1_CHAOS_SEED={seed})"]
    try:
        _chaos_run(own_redis, tmp_path, procs, rng, steps, run, report)
    finally:
        print("\n".join([*report[:1], "schedule (time since start of the fault phase):",
                         *run.done, *report[1:]]), flush=True)


def _chaos_run(own_redis: RedisServer, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
               rng: random.Random, steps: list[Step], run: Run, report: list[str]) -> None:
    key = "chaos-key-1"
    key_file = tmp_path / "ms4.key"

    def write_key(value: str) -> None:  # atomically: never an empty or half-written file
        temp = key_file.with_suffix(".tmp")
        temp.write_text(value + "\n")
        temp.replace(key_file)

    write_key(key)
    sim = Sim(procs, tmp_path, key, seed=rng.randrange(2**31))
    service = Service(procs, tmp_path, sim_url=sim.url, redis_url=own_redis.url,
                      key_file=key_file)
    service.start("chaos-0")
    producer = Producer(own_redis.url, random.Random(rng.randrange(2**31)))
    client = own_redis.client()
    run.started = time.monotonic()
    producer.start()
    try:
        _inject_and_check(own_redis, sim, service, producer, client, steps, run, report,
                          key=key, write_key=write_key)
    finally:
        producer.abort.set()
        client.close()


def _inject_and_check(own_redis: RedisServer, sim: Sim, service: Service, producer: Producer,
                      client: redis_py.Redis, steps: list[Step], run: Run, report: list[str],
                      *, key: str, write_key: Callable[[str], None]) -> None:
    redis_kills = 0
    service_down = False

    for step in steps:
        delay = run.started + step.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own pace, not a synchronisation
        problem = service.died() if not service_down else None
        assert problem is None, problem
        assert producer.failure is None, f"producer failed: {producer.failure!r}"
        args = step.args
        if step.action == "service_kill":
            service.kill()
            service_down = True
        elif step.action == "service_start":
            service.start(args["consumer"])
            service_down = False
        elif step.action == "redis_kill":
            own_redis.kill()
            redis_kills += 1
        elif step.action == "redis_start":
            own_redis.start()
        elif step.action == "sim":
            sim.control(**args)
        elif step.action == "key_file":
            key = args["key"]
            write_key(key)
        elif step.action == "sighup":
            if service_down:  # its restart reads the new key file
                run.note(f"sighup skipped: the service is down  [{step.fault}]")
                continue
            service.signal(signal.SIGHUP)
        elif step.action == "garbage":
            producer.garbage_queue.put(list(args["kinds"]))
        else:
            raise AssertionError(step.action)
        run.note(step.describe())

    delay = run.started + run.seconds - time.monotonic()
    if delay > 0:
        time.sleep(delay)  # the rest of the fault phase: the producer carries on

    # --- stop the faults, let the service drain -----------------------------------------
    sim.control(fail_500=0.0, fail_429=0.0, fail_401=0.0, drop=0.0, reset=0.0,
                latency=BASE_LATENCY, api_key=key)
    if own_redis.proc is None or own_redis.proc.poll() is not None:
        own_redis.start()
    if service_down:
        service.start(service.consumers[-1])
    producer.stopping.set()
    producer.join(130)
    assert not producer.is_alive(), "the producer did not finish"
    assert producer.failure is None, f"producer failed: {producer.failure!r}"
    produced = producer.produced
    run.note(f"faults stopped; produced {len(produced.valid)} valid e-mails and "
             f"{len(produced.garbage)} garbage entries")

    def left() -> tuple[int, ...]:
        """What is not settled yet; all zeros: nothing in either stream, nothing pending.
        Every e-mail is then with MS4 or in the dead letters -- or lost (reported below)."""
        problem = service.died()
        assert problem is None, problem
        return (int(client.xlen(INBOUND)), int(client.xlen(OUTBOUND)),
                pending(client, INBOUND), pending(client, OUTBOUND))

    finished = drain(left, lambda: int(sim.stats()["invoices_accepted"]))
    run.note(f"drained: {finished}; inbound {client.xlen(INBOUND)} (pending "
             f"{pending(client, INBOUND)}), outbound {client.xlen(OUTBOUND)} (pending "
             f"{pending(client, OUTBOUND)}), dead letters {client.xlen(DEAD_LETTERS)}")
    status = service.stop()
    run.note(f"service stopped with SIGTERM: exit {status}")

    accepted = sim.accepted()
    stats = sim.stats()
    sim.stop()
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(DEAD_LETTERS))
    letters = [(i.decode(), f) for i, f in entries]
    figures = analyse(produced, accepted, letters)
    kills = service.kills + redis_kills
    bound = kills * THREADS * BATCH
    log = service.log_text()
    report += [
        f"figures: {figures.line()}",
        f"kills: service {service.kills} (consumers {', '.join(service.consumers)}), Redis "
        f"{redis_kills}: duplicates not explained by a lost answer {figures.resent_unexplained}"
        f" <= {bound} ({kills} kills x {THREADS} senders x {BATCH})",
        f"sim: requests {stats['requests_by_status']}, duplicate invoices "
        f"{stats['duplicate_invoices']}, duplicate batches {stats['duplicate_batches']}",
        f"service logs: {log.count(' CRITICAL ')} CRITICAL, {log.count(' ERROR ')} ERROR, "
        f"{log.count(' WARNING ')} WARNING lines, {log.count('took over')} takeovers; "
        f"producer Redis errors {produced.redis_errors}",
    ]
    if not finished or status != 0:
        report.append(f"last service log:\n{tail(service.log, 60)}")

    assert not figures.lost, f"LOST {len(figures.lost)} invoices: {figures.lost[:20]}"
    assert not figures.wrongly_dead_lettered, \
        f"dead-lettered though MS4 accepts them: {figures.wrongly_dead_lettered[:20]}"
    assert not figures.garbage_missing, \
        f"garbage entries not dead-lettered: {figures.garbage_missing[:10]}"
    assert not figures.garbage_wrong, \
        f"garbage dead-lettered without its content or reason: {figures.garbage_wrong[:10]}"
    assert not figures.stray_letters, f"unexpected dead letters: {figures.stray_letters[:10]}"
    assert not figures.stray_accepted, \
        f"MS4 got invoices no valid e-mail holds: {figures.stray_accepted[:10]}"
    assert not figures.other_key_duplicates, \
        f"invoices accepted under more than one Idempotency-Key (a duplicate MS4 cannot " \
        f"identify): {figures.other_key_duplicates[:20]}"
    assert figures.duplicate_invoices == stats["duplicate_invoices"]
    assert figures.resent_unexplained <= bound, \
        f"{figures.resent_unexplained} duplicates beyond the lost answers, after {kills} kills"
    assert finished, f"not drained after the faults stopped (no progress for " \
                     f"{STALL_TIMEOUT:.0f} s, or {DRAIN_TIMEOUT:.0f} s in all)"
    assert status == 0, f"exit {status} after SIGTERM"
    assert int(client.xlen(INBOUND)) == 0 and int(client.xlen(OUTBOUND)) == 0
    assert pending(client, INBOUND) == 0 and pending(client, OUTBOUND) == 0


# --- the checker checked (fast: no processes) ----------------------------------------------


def _letter(stage: str, reason: str, payload: bytes, **more: str) -> dict[bytes, bytes]:
    fields = {b"stage": stage.encode(), b"reason": reason.encode(), b"payload": payload}
    return fields | {k.encode(): v.encode() for k, v in more.items()}


def test_analyse_finds_losses_bad_letters_and_unidentifiable_duplicates() -> None:
    """The chaos test's verdicts on a made-up outcome: it must see every kind of failure."""
    rejected = next(f"{PREFIX}-{i:07d}" for i in range(1000)
                    if is_rejected_by_sim(f"{PREFIX}-{i:07d}", REJECT_EVERY))
    fine = [f"{PREFIX}-{i:07d}" for i in range(1000)
            if not is_rejected_by_sim(f"{PREFIX}-{i:07d}", REJECT_EVERY)][:5]
    binary = {b"\xff": b"\x00\x80", b"x": b"y"}
    produced = Produced(valid={**{i: f"1-{n}" for n, i in enumerate(fine)}, rejected: "2-0"},
                        garbage={"3-0": ("binary_fields", binary),
                                 "3-1": ("not_json", {b"email": b"{nope"}),
                                 "3-2": ("empty_email", {b"email": b""}),
                                 "3-3": ("no_email", {b"a": b"b"})})
    accepted = [
        {"idempotency_key": "k1", "invoice_ids": [fine[0], fine[1]], "answer": "dropped"},
        {"idempotency_key": "k1", "invoice_ids": [fine[0], fine[1]], "answer": "202"},
        {"idempotency_key": "k1", "invoice_ids": [fine[0], fine[1]], "answer": "202"},
        {"idempotency_key": "k2", "invoice_ids": [fine[2], fine[1]], "answer": "202"},
        {"idempotency_key": "k3", "invoice_ids": ["STRANGER-1"], "answer": "202"},
    ]
    raw = json.dumps({"fields": [[{"base64": base64.b64encode(b"\xff").decode()},
                                  {"base64": base64.b64encode(b"\x00\x80").decode()}],
                                 ["x", "y"]]}).encode()
    letters = [
        ("9-0", _letter("ms4", REJECT_EVERY_REASON, b"{}", invoice_id=rejected)),
        ("9-1", _letter("ms4", "MS4 said no", b"{}", invoice_id=fine[3])),
        ("9-2", _letter("source", "no email field", raw, source_ref="3-0")),
        ("9-3", _letter("processor", "not JSON", b"{nope", source_ref="3-1")),
        ("9-4", _letter("processor", "", b"", source_ref="3-2")),  # no reason
        ("9-5", _letter("processor", "who knows", b"?", source_ref="7-7")),
    ]
    figures = analyse(produced, accepted, letters)
    assert figures.lost == [fine[3], fine[4]]
    assert figures.wrongly_dead_lettered == [fine[3]]
    assert [g.split(" ")[0] for g in figures.garbage_missing] == ["3-3"]
    assert [g.split(" ")[0] for g in figures.garbage_wrong] == ["3-2"]
    assert len(figures.stray_letters) == 1 and figures.stray_letters[0].startswith("9-5")
    assert figures.stray_accepted == ["STRANGER-1"]
    assert figures.other_key_duplicates == [fine[1]]
    # k1 again after its lost answer: explained; k1 a third time: a kill's re-send
    assert (figures.duplicate_batches, figures.resent_after_lost_answer,
            figures.resent_unexplained_batches, figures.resent_unexplained) == (2, 2, 1, 2)
    assert figures.duplicate_invoices == 5 and figures.lost_answers == 1
