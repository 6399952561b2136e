"""The admin commands of ``ms1-service``: ``enqueue``, ``status``, ``dlq list``, ``dlq replay``
(and :func:`replay`, which puts dead letters back on the outbound path).

They build only the components they need, through the same plugins as the service,
and work on whatever backends the config names (Redis in production).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pluggy

from ms1.cli import ledger
from ms1.config import Config
from ms1.errors import ConfigError, Ms1Error
from ms1.ops import overview
from ms1.ops.logs import escape_controls
from ms1.pipeline.deadletters import letter_to_json
from ms1.pipeline.replay import replay
from ms1.pipeline.source import MAX_EMAIL_BYTES, OnSkip, read_inputs
from ms1.runtime import pluginmanager, settings
from ms1.runtime.components import C

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: e-mails ``enqueue`` pushes to the source per call
ENQUEUE_CHUNK = 1000


def run(args: argparse.Namespace, config: Config, pm: pluggy.PluginManager) -> int:
    if args.command == "enqueue":
        return enqueue(config, pm, args.files)
    if args.command == "status":
        return status(config, pm, as_json=args.json)
    if args.command == "trace":
        return ledger.trace(config, pm, args.id, as_json=args.json)
    if args.command == "reconcile":
        return ledger.reconcile_command(config, pm, since=args.since, until=args.until,
                                        form="json" if args.json else
                                        "csv" if args.csv else "text")
    if args.dlq_command == "list":
        return dlq_list(config, pm, limit=args.limit, as_json=args.json)
    if not args.all and not args.ids:
        raise ConfigError("dlq replay: give dead-letter ids or --all")
    return dlq_replay(config, pm, None if args.all else args.ids)


def _emails(paths: list[str], max_bytes: int, skip: OnSkip) -> Iterator[tuple[bytes, int]]:
    """The e-mails in ``paths``, read by the files source's rules
    (:func:`ms1.pipeline.source.read_inputs`), each with about how many bytes of the inputs are read
    once it is (for the progress bar: its file's bytes read so far, a whole file once
    done). An input that cannot be read, and an e-mail over ``max_bytes`` (named
    ``path:line``), go to ``skip`` instead."""
    before = 0  # bytes of the inputs read to their end
    for path in paths:
        within = 0
        for message in read_inputs([path], max_bytes, skip):
            within += len(message.data) + 1  # its line and the line end (about)
            if message.problem is not None:
                skip(message.ref, f"{message.problem}; not enqueued")
                continue
            yield message.data, before + within
        before += _size(path)


def _size(path: str) -> int:
    """The size of the regular file ``path``; 0 for anything else (never opened)."""
    try:
        info = os.stat(path)
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _max_email_bytes(config: Config) -> int:
    """``[source.files] max_email_bytes``; its default when the files plugin is blocked."""
    try:
        return settings.max_email_bytes(config)
    except ConfigError:
        return MAX_EMAIL_BYTES


def enqueue(config: Config, pm: pluggy.PluginManager, files: list[str]) -> int:
    """Push e-mails into the configured source (the inbound stream) as they are: the
    service validates them, so a broken one ends in the dead letters, not here.

    Inputs are read like the files source reads them; each one that cannot be read (and
    each e-mail over ``[source.files] max_email_bytes``) is reported on one line and
    skipped, the rest is pushed, ``ENQUEUE_CHUNK`` e-mails at a time; exit 1 if anything
    was skipped."""
    skipped: list[tuple[str, str]] = []

    def skip(name: str, why: str) -> None:
        skipped.append((name, why))
        print(f"ms1-service: enqueue: skipped {name}: {why}", file=sys.stderr)

    from ms1.cli import progressbar  # rich: only for the commands that draw

    source = pluginmanager.build_source(pm, config)
    count = 0
    display = progressbar.Display(progressbar.wanted(settings.service(config).log_format))
    try:
        with display:
            bar = display.row("enqueue", unit="e-mails", measures_bytes=True,
                              total=sum(_size(path) for path in files) or None)
            chunk: list[bytes] = []
            for data, read in _emails(files, _max_email_bytes(config), skip):
                chunk.append(data)
                if len(chunk) >= ENQUEUE_CHUNK:
                    count += source.push(chunk)
                    chunk = []
                    bar.update(done=read, count=count)
            if chunk:
                count += source.push(chunk)
            bar.finish(count=count)
    except Ms1Error:
        print(f"ms1-service: enqueue: {count} e-mails were enqueued before this error",
              file=sys.stderr)
        raise
    finally:
        source.close()
    more = f"; {len(skipped)} skipped (see above)" if skipped else ""
    print(f"enqueued {count} e-mails into source {source.name!r}{more}")
    return EXIT_FAILED if skipped else EXIT_OK


def _probe(component: C, describe: Callable[[C], dict[str, Any]]) -> dict[str, Any]:
    """``describe(component)``, or the error that prevented it; then close ``component``."""
    try:
        return describe(component)
    except Ms1Error as exc:
        return {"error": str(exc)}
    finally:
        component.close()


def _sending(config: Config, queue: dict[str, Any]) -> dict[str, Any]:
    """What status can say of sending without a running instance: MS4's ceiling, and when
    the queue's backlog will have drained at it (one request per batch;
    :func:`ms1.ops.overview.sending`, the rule the console and ``top`` use too). How many
    requests each instance has in flight, its concurrency target and what holds its
    senders back are on its /metrics (``ms1_requests_in_flight``,
    ``ms1_concurrency_target``, ``ms1_held_back_seconds_total``) and in the console."""
    return overview.sending(settings.ceiling(config), queue)


def _pace(config: Config, pm: pluggy.PluginManager) -> dict[str, Any]:
    """The pace learned of MS4's limiter (shared: the Redis limiter's; the in-process one
    knows only its running process's, on its /metrics) and what MS4 last announced of its
    limit, as the running instances published it."""
    found: dict[str, Any] = {}
    if settings.component(config, "rate_limiter") != "memory":
        with contextlib.suppress(Ms1Error):
            limiter = pluginmanager.build_rate_limiter(pm, config)
            try:
                shape = limiter.learn(lambda shape: None)
            finally:
                limiter.close()
            if shape is not None:
                found["pace"] = {"burst": shape.burst, "spacing": shape.spacing,
                                 "cuts": shape.cuts}
    with contextlib.suppress(Ms1Error):
        fleet = pluginmanager.build_fleet(pm, config)
        try:
            announced = sorted({str(p["announced"]) for snap in fleet.snapshots()
                                if isinstance(p := snap.get("pace"), dict)
                                and isinstance(p.get("announced"), str)})
        finally:
            fleet.close()
        if announced:
            found["announced"] = announced
    return found


def status(config: Config, pm: pluggy.PluginManager, *, as_json: bool) -> int:
    parts: dict[str, Any] = {
        "source": _probe(pluginmanager.build_source(pm, config), lambda s: s.describe()),
        "queue": _probe(pluginmanager.build_queue(pm, config), lambda q: q.describe()),
        "dead_letters": _probe(pluginmanager.build_dead_letters(pm, config),
                               lambda d: {"backend": d.name, "count": d.count()}),
    }
    # a part that could not be read: exit 1 (a script or a probe must see it), after
    # printing all that could be
    unread = EXIT_FAILED if any("error" in info for info in parts.values()) else EXIT_OK
    parts["sending"] = _sending(config, parts["queue"])
    parts["sending"].update(_pace(config, pm))
    if as_json:
        print(json.dumps(parts, indent=2, default=str))
        return unread
    sending = parts.pop("sending")
    for kind, info in parts.items():
        consumers = info.pop("consumers", None) if isinstance(info, dict) else None
        fields = ", ".join(f"{k} {v}" for k, v in info.items())
        print(escape_controls(f"{kind.replace('_', ' ')}: {fields}"))
        for consumer in consumers or []:
            print(escape_controls(f"  consumer {consumer['name']}: pending "
                                  f"{consumer['pending']}, idle {consumer['idle_s']} s"))
    line = (f"sending: MS4's ceiling {sending['ceiling']} "
            f"({sending['ceiling_invoices_per_minute']:,} invoices/min in full batches)")
    if "drained_in_s" in sending:
        line += (f"; backlog {sending['backlog_batches']} batches "
                 f"({sending['backlog_invoices']} invoices) drained in about "
                 f"{sending['drained_in_s']:g} s at the ceiling")
    print(line)
    pace = sending.get("pace")
    if isinstance(pace, dict):
        print(f"  pace learned of MS4's limiter: bursts of at most {pace['burst']:.0f}, "
              f"{pace['spacing']:.1%} spacing ({pace['cuts']} cuts so far)")
    for text in sending.get("announced") or []:
        print(f"  MS4 announces: {escape_controls(text)}")
    print("  per instance (requests in flight, concurrency target, seconds held back by "
          "cause): its /metrics")
    return unread


def dlq_list(config: Config, pm: pluggy.PluginManager, *, limit: int, as_json: bool) -> int:
    store = pluginmanager.build_dead_letters(pm, config)
    try:
        letters = store.list(limit=limit)
        total = store.count()
    finally:
        store.close()
    for letter in letters:
        if as_json:
            print(json.dumps(letter_to_json(letter), ensure_ascii=False))
        else:  # text read from the store (MS4's answer included): escaped, on one line
            who = letter.invoice_id or letter.message_id or letter.source_ref or "?"
            line = f"{letter.id}  {letter.stage:<9} {who}  {letter.reason}"
            if letter.malformed:
                line += f"  [malformed: {letter.malformed}]"
            print(escape_controls(line))
    if not as_json:
        print(f"({len(letters)} of {total} dead letters shown)", file=sys.stderr)
    return EXIT_OK


def dlq_replay(config: Config, pm: pluggy.PluginManager, ids: list[str] | None) -> int:
    from ms1.cli import progressbar  # rich: only for the commands that draw

    store = pluginmanager.build_dead_letters(pm, config)
    queue = pluginmanager.build_queue(pm, config)
    ledger = pluginmanager.build_ledger(pm, config, queue.name)
    service = settings.service(config)
    display = progressbar.Display(progressbar.wanted(service.log_format))
    try:
        if not queue.durable:
            raise ConfigError(f"dlq replay needs a durable queue; [queue] backend = "
                              f"{queue.name!r} would forget the batches when this command ends",
                              path=config.path, section="queue", key="backend")
        with display:
            bar = display.row("replay", unit="letters")

            def replayed(done: int, total: int) -> None:
                bar.update(done=done, total=total)

            result = replay(store, queue, ids=ids,
                            max_items=int(service.batch_limits["max_items"]),
                            max_bytes=int(service.batch_limits["max_bytes"]),
                            on_progress=replayed, ledger=ledger)
            bar.finish()
    finally:
        queue.close()
        store.close()
        if ledger is not None:
            ledger.close()
    print(f"replayed {result.replayed} dead letters in {result.batches} batches")
    for letter_id, reason in result.still_invalid:
        print(escape_controls(f"kept {letter_id}: still invalid: {reason}"))
    return EXIT_OK if not result.still_invalid else EXIT_FAILED
