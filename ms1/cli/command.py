"""``ms1-service``: the command line.

More: docs/internals.md, ``ms1.cli.command``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import pluggy

from ms1 import __version__
from ms1.cli import admin
from ms1.config import Config, render_defaults
from ms1.errors import ConfigError, Ms1Error
from ms1.heartbeat import call_within
from ms1.ops import deploy
from ms1.ops.logs import add_secret, escape_controls, setup_logging
from ms1.ops.notify import Notifier, Watchdog
from ms1.pipeline import samples
from ms1.redaction import redact
from ms1.runtime import pluginmanager, settings
from ms1.runtime.components import Components
from ms1.runtime.service import Service, Summary

log = logging.getLogger("ms1")

COMMANDS = ("run", "check", "samples", "enqueue", "status", "dlq", "top", "conf", "trace",
            "reconcile")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: a second SIGINT: exit at once, as a shell's Ctrl-C does (128 + SIGINT)
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: seconds closing the components (Redis connections, prefetched batches) may take at exit:
#: past it ms1 exits anyway, and what they still hold stays pending in a durable queue
CLOSE_TIMEOUT = 0.3
#: seconds between the main thread's checks that every pipeline thread still runs (a
#: signal wakes it at once)
ALIVE_CHECK = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ms1-service",
        description="Forward invoice metadata from MS1 e-mails to MS4 in batches.")
    parser.add_argument("--config", "-c", default=os.environ.get("MS1_CONFIG"),
                        help="INI config file (default: $MS1_CONFIG)")
    parser.add_argument("--block-plugin", action="append", default=[], metavar="NAME",
                        help="do not load the installed plugin NAME (its entry-point name, "
                             f"e.g. redis); repeatable; also ${pluginmanager.BLOCK_ENV}, "
                             "comma-separated")
    parser.add_argument("--version", action="version", version=f"ms1 {__version__}")
    # the global options again on every subcommand, so they may follow it too
    # (``ms1-service check --config F``); SUPPRESS keeps a value given before it
    globals_after = argparse.ArgumentParser(add_help=False)
    globals_after.add_argument("--config", "-c", default=argparse.SUPPRESS,
                               help="INI config file (default: $MS1_CONFIG)")
    globals_after.add_argument("--block-plugin", action="append", default=argparse.SUPPRESS,
                               metavar="NAME", help="do not load the installed plugin NAME")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[globals_after])
    run = command("run", "run the pipeline (the default command)")
    run.add_argument("--once", action="store_true",
                     help="process what the source holds, wait for delivery, print a "
                          "summary and exit (1 if anything is left undelivered or not "
                          "stored, or an input file could not be read)")
    run.add_argument("files", nargs="*", help="EmailMessage files (*.json, *.jsonl) for "
                                              "the files source")
    command("check", "validate the config (everything run would refuse) and "
                                 "print it, secrets and URL credentials redacted")
    enq = command("enqueue", "push EmailMessage files into the configured source")
    enq.add_argument("files", nargs="+", help="*.json (one e-mail) or *.jsonl (one per line)")
    status = command("status", "queue lengths, pending, consumers, dead letters")
    status.add_argument("--json", action="store_true",
                        help="print the status as one JSON object (raw text, JSON-escaped)")
    trace = command("trace", "what became of an invoice or e-mail (the ledger): batches, "
                             "attempts, MS4's answers; exit 1 if unknown")
    trace.add_argument("id", help="an invoice id or an e-mail's message id")
    trace.add_argument("--json", action="store_true",
                       help="print the timeline as one JSON object (raw text, JSON-escaped)")
    recon = command("reconcile", "account for every e-mail read in a period (the ledger): "
                                 "rejected, accepted, dead-lettered, pending; exit 1 if one "
                                 "is unexplained")
    recon.add_argument("--since", required=True, metavar="T",
                       help="from T: now, a span ago (90s, 30m, 24h, 7d) or ISO 8601 "
                            "(2026-12-06, 2026-12-06T08:00Z; no zone: UTC)")
    recon.add_argument("--until", metavar="T", help="until T (default now), as --since")
    form = recon.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true",
                      help="print the counts and unexplained e-mails as one JSON object")
    form.add_argument("--csv", action="store_true",
                      help="print one CSV row per e-mail read: what became of it")
    dlq = command("dlq", "the dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", parents=[globals_after],
                                  help="list dead letters (oldest first)")
    dlq_list.add_argument("--limit", type=int, default=20, metavar="N",
                          help="list at most N (default 20)")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per line")
    dlq_replay = dlq_sub.add_parser("replay", parents=[globals_after],
                                    help="put dead letters back on the outbound path")
    dlq_replay.add_argument("ids", nargs="*", help="dead-letter ids (see dlq list)")
    dlq_replay.add_argument("--all", action="store_true", help="replay every dead letter")
    top = command("top", "the overview of every running instance (as the web "
                                     "console shows it), live, until Ctrl-C")
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between two readings (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true",
                     help="print the overview as JSON (as /api/overview) and exit")
    smp = command("samples", "write generated sample e-mails as JSON lines")
    smp.add_argument("--count", type=int, default=1000, help="how many (default 1000)")
    smp.add_argument("--invalid-every", type=int, default=10, metavar="K",
                     help="every K-th e-mail is invalid, to exercise the dead letters "
                          "(default 10; 0: none)")
    smp.add_argument("--prefix", default="INV", help="invoice id prefix (default INV)")
    smp.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    conf = command("conf", "the operator's files shipped with ms1 (INI templates, systemd "
                           "unit, alert rules, dashboard) and every option's default")
    conf_sub = conf.add_subparsers(dest="conf_command", required=True)
    conf_sub.add_parser("list", parents=[globals_after], help="name the operator's files")
    conf_show = conf_sub.add_parser("show", parents=[globals_after],
                                    help="print one operator file")
    conf_show.add_argument("name", help="its name, as conf list gives it")
    conf_write = conf_sub.add_parser("write", parents=[globals_after],
                                     help="write every operator file under DIR (the unit's "
                                          "paths: this installation's, DIR)")
    conf_write.add_argument("directory", metavar="DIR", help="where (created if missing)")
    conf_write.add_argument("--force", action="store_true",
                            help="replace files that exist (default: keep them)")
    conf_sub.add_parser("defaults", parents=[globals_after],
                        help="print every option (ms1's and the installed plugins') at its "
                             "default, as a loadable INI file")
    return parser


class UnknownCommand(Exception):
    """The first word is no command and no file: a mistyped command."""


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert ``run`` where the first non-global argument stands, unless a command is given.
    A first word that is no command, no option and no existing file, and has neither
    ``/`` nor ``.`` (an input file's name has a suffix), is a mistyped command:
    :class:`UnknownCommand` (exit 2 naming it), not an input file of ``run``."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c", "--block-plugin"):
            i += 2
            continue
        if arg.startswith(("--config=", "--block-plugin=")) or arg in ("-h", "--help",
                                                                        "--version"):
            i += 1
            continue
        if arg in COMMANDS:
            return argv
        if not arg.startswith("-") and not any(c in arg for c in "/.") \
                and not os.path.exists(arg):
            raise UnknownCommand(arg)
        return [*argv[:i], "run", *argv[i:]]
    return [*argv, "run"]


def _fail(message: str, status: int) -> int:
    """One line on stderr (redacted, control characters escaped) and the status."""
    print(f"ms1-service: {escape_controls(redact(message))}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        words = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    except UnknownCommand as exc:
        return _fail(f"unknown command {str(exc)!r} (commands: {', '.join(COMMANDS)}; an "
                     "input file of run needs its suffix or path)", EXIT_USAGE)
    args = _parser().parse_args(words)
    if args.command == "samples":
        return _samples(args)
    if args.command == "conf" and args.conf_command != "defaults":
        return _conf(args)
    blocked = [name for value in args.block_plugin for name in pluginmanager.parse_blocked(value)]
    blocked += pluginmanager.blocked_from_env(os.environ)
    if args.command == "conf":
        try:
            pm = pluginmanager.make_plugin_manager(blocked=blocked)
        except ConfigError as exc:
            return _fail(str(exc), EXIT_USAGE)
        sys.stdout.write(render_defaults(pluginmanager.all_options(pm)))
        return EXIT_OK
    if not args.config:
        return _fail("no config file: give --config FILE or set $MS1_CONFIG", EXIT_USAGE)
    try:
        pm = pluginmanager.make_plugin_manager(blocked=blocked)
        config = pluginmanager.load(pm, args.config)
    except ConfigError as exc:  # PluginError too: a broken plugin stops the start
        return _fail(str(exc), EXIT_USAGE)
    if args.command == "check":
        try:  # what run refuses when it builds its parts: an unset secret, a TLS file ...
            _refusals_of_run(pm, config)
        except ConfigError as exc:
            return _fail(str(exc), EXIT_USAGE)
        # what the file holds, each line with its control characters escaped (a value may
        # hold any byte: it reaches the operator's terminal only so)
        sys.stdout.write("".join(escape_controls(line) + "\n"
                                 for line in config.render().splitlines()))
        return EXIT_OK
    service_settings = settings.service(config)
    setup_logging(service_settings.log_level, service_settings.log_format,
                  secrets=[config.api_key.reveal()] if config.api_key else [])
    try:
        if args.command in ("enqueue", "status", "dlq", "trace", "reconcile"):
            return admin.run(args, config, pm)
        if args.command == "top":
            from ms1.cli import top  # rich: only for the commands that draw

            return top.run(config, pm, interval=args.interval, once=args.once,
                           as_json=args.json)
        return _run(config, pm, args.files, once=args.once)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except Ms1Error as exc:
        return _fail(str(exc), EXIT_FAILED)


def _refusals_of_run(pm: pluggy.PluginManager, config: Config) -> None:
    """Build (and close) the parts ``run`` builds before it starts, so that ``check``
    refuses what ``run`` would: the transport (its API key resolved, TLS files loaded), the
    queue, the dead letters and the rate limiter (their secrets resolved; a Redis that
    answers is asked its eviction policy). The source is not built (a files source would
    read its inputs)."""
    builders = (pluginmanager.build_transport, pluginmanager.build_queue,
                pluginmanager.build_dead_letters, pluginmanager.build_rate_limiter)
    for build in builders:
        part = build(pm, config)
        with contextlib.suppress(Ms1Error):
            part.close()


def _run(config: Config, pm: pluggy.PluginManager, files: Sequence[str], *, once: bool) -> int:
    components = Components.build(pm, config, files)
    try:
        service = Service(config, pm, components, once=once)
    except BaseException:
        components.close()
        raise
    notifier = Notifier()
    restore_terminal: Callable[[], None] = _nothing
    if once:
        from ms1.cli import progressbar  # rich: only for the runs that may draw

        restore_terminal = progressbar.restore_cursor  # the bars' hidden cursor, at os._exit
    stop_requested = threading.Event()
    reload_requested = threading.Event()
    wake = threading.Event()  # either of them was set

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reload_requested.set()
            wake.set()
            return
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            if signum == signal.SIGINT:
                # at once: no drain, no summary. A durable queue keeps every batch and the
                # source every unacknowledged e-mail, for the next run
                log.warning("second SIGINT: exiting at once (status %d) without draining; a "
                            "durable queue keeps what was not delivered", EXIT_INTERRUPTED)
                restore_terminal()
                os._exit(EXIT_INTERRUPTED)
            log.info("received %s: already draining (a second SIGINT exits at once)", name)
            return
        log.info("received %s: draining", name)
        stop_requested.set()
        wake.set()

    handled = [signal.SIGTERM, signal.SIGINT] + ([] if once else [signal.SIGHUP])
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    watchdog: Watchdog | None = None
    try:
        if once:
            summary = _run_once(service, stop_requested)
            print(summary.render(), flush=True)
        else:
            service.start()
            if _wait_until_connected(service, stop_requested):
                notifier.ready(_status(service))
                log.info("ready")
            interval = notifier.watchdog_interval
            if interval is not None:
                watchdog = Watchdog(notifier, interval, healthy=service.healthy,
                                    status=lambda: _status(service), problem=service.health)
                watchdog.start()
            while not stop_requested.is_set():
                # a signal wakes it; a pipeline thread that died is seen within ALIVE_CHECK
                wake.wait(ALIVE_CHECK)
                wake.clear()
                if stop_requested.is_set():
                    break
                if reload_requested.is_set():
                    reload_requested.clear()
                    notifier.reloading()
                    _reload(service, pm)
                    notifier.ready(_status(service))
                if not service.alive():
                    log.critical("a pipeline thread died; shutting down")
                    break
            notifier.stopping("draining")
            summary = service.shutdown(service.settings.shutdown_timeout)
            log.info("stopped: %s", summary.render().replace("\n", "; "))
    finally:
        if watchdog is not None:
            watchdog.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:  # bounded: a frozen Redis must not hold the exit (shutdown_timeout + 2 s)
            call_within(components.close, CLOSE_TIMEOUT, "closing the components")
        except TimeoutError as exc:
            log.warning("%s; exiting anyway (unreleased batches stay pending in a durable "
                        "queue and are sent again)", exc)
        notifier.close()
    if once:
        return EXIT_OK if summary.ok else EXIT_FAILED
    if not summary.ok and not components.queue.durable:
        return EXIT_FAILED  # batches left in memory are lost
    if summary.lost:
        return EXIT_FAILED  # the queue found stored work gone: never a quiet exit 0
    return EXIT_OK if stop_requested.is_set() else EXIT_FAILED


def _nothing() -> None:
    pass


def _run_once(service: Service, stop: threading.Event) -> Summary:
    """``--once``: start, process what the source holds, deliver it; on a terminal with
    progress bars (:mod:`ms1.cli.progressbar`): e-mails read, invoices settled (delivered or
    dead-lettered by the senders) of those enqueued."""
    from ms1.cli import progressbar

    config = service.config
    display = progressbar.Display(progressbar.wanted(settings.service(config).log_format))
    with display:
        read = display.row("read", unit="e-mails")
        settled = display.row("delivered", unit="invoices")

        def poll() -> None:
            stats = service.stats.snapshot()
            emails = stats.get("emails_read", 0)
            if service.source_drained and emails >= stats.get("emails_taken", 0):
                read.finish(done=emails)  # all read and processed
            else:
                read.update(done=emails)
            enqueued = stats.get("invoices_enqueued", 0)
            # the senders' dead letters: the intake's (rejected) were never enqueued
            done = stats.get("invoices_delivered", 0) + max(
                0, stats.get("dead_lettered", 0) - stats.get("rejected", 0))
            settled.update(done=done, total=max(enqueued, done) or None)

        display.follow(poll)
        service.start()
        summary = service.run_once(settings.service(config).once_timeout, stop=stop)
        poll()
        if summary.undelivered is not None and summary.undelivered.empty:
            settled.finish()
    return summary


def _wait_until_connected(service: Service, stop: threading.Event) -> bool:
    """READY=1 only once the queue backend answers (Redis connected)."""
    waited = False
    while not stop.is_set():
        try:
            service.read_queue(1.0)
            return True
        except Ms1Error as exc:
            if not waited:
                log.warning("waiting for the queue backend before reporting ready: %s", exc)
            waited = True
            stop.wait(1.0)
    return False


def _status(service: Service) -> str:
    stats = service.stats.snapshot()
    text = (f"{stats.get('invoices_delivered', 0)} invoices delivered, "
            f"{stats.get('dead_lettered', 0)} dead-lettered")
    held_back = service.pacer.held_back()
    if held_back is not None:
        text += f"; {held_back}"
    return text


def _reload(service: Service, pm: pluggy.PluginManager) -> None:
    """SIGHUP: read the config file again; an invalid one is refused, the old one kept."""
    try:
        config = pluginmanager.load(pm, service.config.path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    if config.api_key is not None:
        add_secret(config.api_key.reveal())
    running = service.config
    restart = service.reload(config)  # the log is in the new format from here on
    applied = [f"[{sec}] {key}" for sec, key in running.changed(service.config)]
    if service.config.api_key != running.api_key:
        applied.append("the API key")
    log.info("configuration reloaded from %s; applied: %s", config.path,
             ", ".join(applied) or "no change")
    if restart:  # every changed key needing a restart, in this one line
        log.warning("changes that need a restart were not applied: %s", ", ".join(restart))


def _conf(args: argparse.Namespace) -> int:
    """``conf list``, ``conf show NAME``, ``conf write DIR``."""
    if args.conf_command == "list":
        width = max(map(len, deploy.FILES))
        for name, what in deploy.FILES.items():
            print(f"{name:<{width}}  {what}")
        return EXIT_OK
    if args.conf_command == "show":
        try:
            sys.stdout.write(deploy.read(args.name))
        except deploy.UnknownFile as exc:
            return _fail(str(exc), EXIT_USAGE)
        return EXIT_OK
    try:
        done = deploy.write(args.directory, force=args.force)
    except OSError as exc:
        return _fail(f"cannot write the operator's files to {args.directory}: {exc}",
                     EXIT_FAILED)
    for path in done.written:
        print(f"wrote {escape_controls(str(path))}")
    for path in done.kept:
        print(f"kept {escape_controls(str(path))} (it exists; --force replaces it)")
    return EXIT_OK


def _samples(args: argparse.Namespace) -> int:
    generated = samples.generate(args.count, invalid_every=args.invalid_every,
                                 prefix=args.prefix)
    if args.output == "-":
        out = sys.stdout.buffer
        for sample in generated:
            out.write(sample.data + b"\n")
        out.flush()
    else:
        samples.write_jsonl(args.output, generated)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
