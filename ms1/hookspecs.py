"""Every hook ms1 calls: when, from which thread, what it gets, what it returns.

Plugins are modules or objects with functions marked ``@hookimpl``; they reach
ms1 through the ``ms1`` entry-point group (``[options.entry_points]`` in their
``setup.cfg``), exactly as the built-in plugins in ``ms1_plugins`` do. An
installed plugin is kept from loading by its entry-point name with
``ms1-service --block-plugin NAME`` or ``MS1_BLOCK_PLUGINS=NAME,...``.

More: docs/internals.md, ``ms1.hookspecs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ms1.markers import PROJECT as PROJECT  # re-exported: plugins import them from here
from ms1.markers import hookimpl as hookimpl
from ms1.markers import hookspec as hookspec

if TYPE_CHECKING:
    from ms1.config import Config, Option
    from ms1.model import Batch, DeadLetter
    from ms1.ops.fleet import Fleet
    from ms1.pipeline.batching import BatchPolicy
    from ms1.pipeline.deadletters import DeadLetterStore
    from ms1.pipeline.ledger import Ledger
    from ms1.pipeline.outbound import QueueBackend
    from ms1.pipeline.sending.limiter import RateLimiter
    from ms1.pipeline.source import Source
    from ms1.pipeline.transport import Transport


# --- declaration hooks -------------------------------------------------------


@hookspec
def ms1_config_options() -> Sequence[Option]:
    """Declare the INI options this plugin reads.

    Called from the main thread before a config file is read (at start, and on
    every reload), so the file can be validated against the whole schema: a key
    no plugin declares is an error. Use a section of your own (``[queue.redis]``,
    ``[transport.http]``) and give every option a default and a help text (shown
    by ``ms1-service check``). Mark an option ``reloadable=True`` only if your
    :func:`ms1_config_reloaded` applies a new value to what is running; any other
    option's change is reported by a reload as needing a restart.

    :return: the plugin's :class:`~ms1.config.Option` s. All results are merged
        (not ``firstresult``).
    """


@hookspec
def ms1_components() -> Sequence[tuple[str, str]]:
    """Declare the components this plugin can build, as ``(kind, name)`` pairs.

    ``kind`` is one of ``source``, ``batch_policy``, ``queue``, ``dead_letters``,
    ``transport``, ``rate_limiter``, ``fleet``, ``ledger``; ``name`` is what the config
    selects it by.
    Called from the main thread whenever a config is read (start, reload) and
    before each factory call, to check the config's choices and to list the
    installed names when a choice is unknown.

    :return: the pairs. All results are merged (not ``firstresult``).
    """


@hookspec
def ms1_component_traits() -> Sequence[tuple[str, str, str]]:
    """Declare what the core must know of a component before it is built, as
    ``(kind, name, trait)`` triples, so that it names no plugin itself.

    Traits: ``acks`` (a source that acknowledges what it hands over: it then needs a
    durable queue and durable dead letters, unless ``[source] allow_volatile``);
    ``volatile`` (a queue or dead-letter store that holds what it is given in memory only,
    or may fall back to it); ``fleet:NAME`` (a queue whose instances share the fleet
    ``NAME``: ``[fleet] backend = auto`` chooses it); ``ledger:NAME`` (the same for
    ``[ledger] backend = auto``). Called from the main thread whenever
    a config is read, like :func:`ms1_components`.

    :return: the triples. All results are merged (not ``firstresult``).
    """


# --- factory hooks (firstresult) ---------------------------------------------


@hookspec(firstresult=True)
def ms1_make_source(name: str, config: Config, inputs: Sequence[str]) -> Source | None:
    """Build the e-mail source selected by ``[source] name``.

    Called once at start, from the main thread (and by ``ms1-service enqueue`` and
    ``status``, with no inputs). ``inputs`` are the file arguments of the command
    line (possibly empty).

    :return: a :class:`~ms1.pipeline.source.Source` if ``name`` is yours, else None.
        ``firstresult``: the first non-None result is used; anything that is not a
        ``Source`` stops the start.
    :raise ~ms1.errors.ConfigError: for unusable settings (``config.error(...)``).
    """


@hookspec(firstresult=True)
def ms1_make_batch_policy(name: str, config: Config) -> BatchPolicy | None:
    """Build the batch policy selected by ``[batch] policy``.

    Called once at start, from the main thread; the batching thread then uses the
    instance alone. A reload (SIGHUP) does not call this hook again: it sets
    ``max_items``, ``max_bytes`` and ``max_wait`` from ``[batch]`` on the instance
    already built, where it has such attributes (from the main thread, while the
    batching thread runs), and a changed ``[batch] policy`` needs a restart.

    :return: a :class:`~ms1.pipeline.batching.BatchPolicy` if ``name`` is yours, else None.
        ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_queue(name: str, config: Config) -> QueueBackend | None:
    """Build the outbound queue backend selected by ``[queue] backend``.

    Called once at start, from the main thread (and by ``ms1-service status`` and
    ``dlq replay``). The instance is shared by the committer and every sender
    thread, so it must be thread-safe.

    :return: a :class:`~ms1.pipeline.outbound.QueueBackend` if ``name`` is yours, else None.
        ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    """Build the dead-letter store selected by ``[dead_letters] backend``.

    Called once at start, from the main thread (and by ``ms1-service status`` and
    ``dlq``). Shared by the committer and the sender threads: thread-safe.

    :return: a :class:`~ms1.pipeline.deadletters.DeadLetterStore` if ``name`` is yours,
        else None. ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    """Build the MS4 transport selected by ``[ms4] transport``.

    Called once at start, from the main thread. The API key is handed over
    afterwards with ``Transport.set_api_key`` (again on a reload that changes
    it). Shared by every sender thread: thread-safe.

    :return: a :class:`~ms1.pipeline.transport.Transport` if ``name`` is yours, else None.
        ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_rate_limiter(name: str, config: Config) -> RateLimiter | None:
    """Build the rate limiter selected by ``[send] rate_limiter``.

    Called once at start, from the main thread. It must hold ``[send]
    requests_per_minute`` requests per ``rate_window`` seconds for every caller
    that shares it (``memory``: the sender threads of this process; ``redis``:
    every instance on the Redis); a reload reconfigures it with
    ``RateLimiter.configure``. With ``[send] rate_shape = learn`` it should also pace
    by a learned :class:`~ms1.pipeline.sending.shape.Shape` (override ``acquire``, ``shape`` and
    ``learn``, as both built-in limiters do); one implementing only ``try_acquire``
    still works, with the window alone.

    :return: a :class:`~ms1.pipeline.sending.limiter.RateLimiter` if ``name`` is yours,
        else None. ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_fleet(name: str, config: Config) -> Fleet | None:
    """Build the fleet selected by ``[fleet] backend``: where every running instance
    publishes a snapshot of itself about once a second, for the web console and
    ``ms1-service top`` (see :mod:`ms1.ops.fleet`).

    Called once at start, from the main thread (and by the commands that read the fleet,
    in their own process). ``auto`` never reaches this hook: it is resolved first
    (:func:`ms1.runtime.pluginmanager.fleet_name`: ``redis`` when the outbound queue is on Redis,
    else ``memory``). Publishing runs in a thread of its own while console requests read:
    thread-safe. A fleet that cannot reach its backend raises
    :class:`~ms1.errors.Ms1Error` from ``publish``/``snapshots``; the publisher skips
    that beat.

    :return: a :class:`~ms1.ops.fleet.Fleet` if ``name`` is yours, else None.
        ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_ledger(name: str, config: Config) -> Ledger | None:
    """Build the invoice ledger selected by ``[ledger] backend`` (issue 24: what became
    of every e-mail and invoice, for ``ms1-service trace``).

    Called once at start, from the main thread (and by ``trace``). ``auto`` and ``off``
    never reach this hook: ``auto`` is resolved first (the store the outbound queue's
    plugin declares with the trait ``ledger:NAME``, else ``memory``). ``record`` is called
    from the committer and every sender thread: thread-safe; it raises
    :class:`~ms1.errors.QueueError` when the store cannot be reached (the caller holds the
    data and retries).

    :return: a :class:`~ms1.pipeline.ledger.Ledger` if ``name`` is yours, else None.
        ``firstresult``.
    """


# --- observer hooks ----------------------------------------------------------


@hookspec
def ms1_service_started(config: Config) -> None:
    """The pipeline threads are running; ``config`` is the one they run with.

    Called once, from the main thread, just after the threads were started: other
    observer hooks (``ms1_batch_enqueued`` ...) may already have been called.
    Not called by the admin commands. Return value ignored.
    """


@hookspec
def ms1_config_reloaded(old: Config, new: Config, changed: Sequence[tuple[str, str]]) -> None:
    """A reload (SIGHUP) took effect: apply your reloadable options here.

    Called once per accepted reload, from the main thread, after the core applied its
    reloadable options (the sender threads already read the new settings) and while
    the pipeline threads run: what you change must be safe to change under them (set
    an attribute the component reads per use, or take its lock). Not called for a file
    that was refused, nor by the admin commands.

    :param old: the configuration that was running.
    :param new: the one running now: the file's values for every reloadable key, the
        running values kept for keys that need a restart (so ``new`` never holds a
        value that is not in effect).
    :param changed: the ``(section, key)`` pairs whose value changed, sorted: every
        one is reloadable (core and plugins alike); empty when nothing did. Look for
        your own section's keys; the API key is no option (compare ``old.api_key``).
        Return value ignored; an exception is logged and skipped (the reload stands).
    """


@hookspec
def ms1_service_stopped() -> None:
    """Every pipeline thread has ended (or was given up on at the deadline).

    Called once, from the main thread, at the end of shutdown (SIGTERM, SIGINT,
    the end of ``--once``), after the last other observer call. Return value
    ignored.
    """


@hookspec
def ms1_batch_enqueued(batch: Batch) -> None:
    """A batch was closed and is now safely in the outbound queue.

    Called from the committer thread after the queue stored it (``put_many``),
    once per batch; and from a sender thread for each half when a batch is split
    after a 400/413. Return value ignored.
    """


@hookspec
def ms1_batch_sent(batch: Batch, status: int, attempt: int, latency: float) -> None:
    """MS4 accepted the batch (``status`` 202); it has been acked in the queue.

    Called from the sender thread that sent it, once per delivered batch.
    ``attempt`` is the attempt within this delivery, from 1 (a batch handed out
    again after a crash or a shutdown starts from 1 again); ``latency`` is the
    seconds the successful request took. Return value ignored.
    """


@hookspec
def ms1_batch_failed(
    batch: Batch, status: int | None, error: str, attempt: int, will_retry: bool,
) -> None:
    """A send of the batch did not end in 202.

    Called from the sender thread once per failed attempt. ``status`` is MS4's
    answer, or None when there was none (``error`` says why: timeout,
    connection refused, ...). ``will_retry`` is False when the batch leaves
    the sender without being delivered: split after 400/413 (then
    ``ms1_batch_enqueued`` for each half, or ``ms1_payload_rejected`` for a
    single object), or released back to the queue at the shutdown deadline
    (``status`` None, ``attempt`` 0). The batch stays queued unless it was split
    or dead-lettered. Return value ignored.
    """


@hookspec
def ms1_payload_rejected(letter: DeadLetter) -> None:
    """An object (or a whole e-mail) went to the dead letters.

    Called once per dead letter, after the dead-letter store kept it: from the
    committer thread for ``letter.stage`` ``processor`` (invalid e-mail) and
    ``batching`` (too large), from a sender thread for ``ms4`` (MS4 answered 400
    for it, or the batch was handed out more than ``[send] max_deliveries``
    times). Return value ignored.
    """
