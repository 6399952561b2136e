"""Every hook ms1 calls: when, from which thread, what it gets, what it returns.

Plugins are modules or objects with functions marked ``@hookimpl``; they reach
ms1 through the ``ms1`` entry-point group (``[options.entry_points]`` in their
``setup.cfg``), exactly as the built-in plugins in ``ms1_plugins`` do. An
installed plugin is kept from loading by its entry-point name with
``ms1-service --block-plugin NAME`` or ``MS1_BLOCK_PLUGINS=NAME,...``.

Every ``@hookimpl`` is checked when the plugins are loaded, before anything
runs: a function named ``ms1_...`` that is not one of the hooks below (a typo
such as ``ms1_batch_sentt``), or one asking for an argument its hook does not
give, stops the start with one line naming the plugin and the hook (exit 2).
A hookimpl may take any subset of its hook's arguments, by name.

There are three families:

* **declaration** hooks (all results merged): the options a plugin adds to
  the config schema and the component names it can build. Called from the
  main thread whenever a config file is read: at start, and again on every
  reload (SIGHUP), so they must return the same thing each time.
* **factory** hooks (``firstresult``): called once per component at start, from
  the main thread; the plugin whose name matches returns an instance, every
  other returns None. A reload never calls them again: see *Reload* below. The
  admin commands (``enqueue``, ``status``, ``dlq``) build the parts they need the
  same way, in their own process.
* **observer** hooks (results ignored): called as things happen, from the
  thread where they happen (main, committer or a sender thread), so an
  implementation must be thread-safe and quick: delivery waits for it. ms1
  calls each implementation on its own (in pluggy's order: last registered
  first, ``tryfirst``/``trylast`` respected): one that raises is logged with
  its plugin's name and the hook's and skipped; the others are still called and
  delivery goes on. Observer hookimpls cannot be wrappers (``wrapper=True``,
  ``hookwrapper=True``): that is refused when the plugins are loaded.

Reload (SIGHUP)
---------------

The config file is read again and validated against the whole schema (the
declaration hooks are called again); an invalid file is refused and the running
configuration kept. Nothing is rebuilt. Every option says where it is declared
whether a reload applies it: ``Option(..., reloadable=True)``; the default,
False, means a change needs a restart. For the keys that changed:

* **reloadable core options** are applied by the core at once: ``[ms1] log_level``,
  ``log_format`` (the same log handler and redaction, a new format),
  ``shutdown_timeout``; ``[source] read_chunk``; ``[batch] max_items``,
  ``max_bytes``, ``max_wait`` (set on the batch policy, where it has such an
  attribute); ``[dead_letters] max_payload_bytes``; ``[send] threads`` (a sender
  removed finishes its current batch first), ``retry_initial``, ``retry_max``,
  ``max_deliveries`` (read by the senders per delivery and per retry),
  ``requests_per_minute``, ``rate_window`` (``RateLimiter.configure``),
  ``retry_after_default``, ``retry_after_max``, ``breaker_failures``,
  ``breaker_reset``, ``auth_probe_interval``, ``refusal_json_details``,
  ``refusal_index_pattern`` (read per refusal); ``[ms4] api_key_env``,
  ``api_key_file`` and the key itself (``Transport.set_api_key``; ends a 401 spell);
* **reloadable plugin options** are applied by the plugin that declares them, in
  :func:`ms1_config_reloaded`, called once the core has applied its part;
* **every other changed key** (component choices, URLs, Redis and HTTP settings,
  ``[metrics] address``, and any plugin option not marked reloadable) keeps its
  running value, and all of them are named in ONE log line, WARNING ``changes that
  need a restart were not applied: [section] key, ...``. They are named again on
  every later reload until ms1 is restarted.
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
    ``transport``, ``rate_limiter``, ``fleet``; ``name`` is what the config selects it by.
    Called from the main thread whenever a config is read (start, reload) and
    before each factory call, to check the config's choices and to list the
    installed names when a choice is unknown.

    :return: the pairs. All results are merged (not ``firstresult``).
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
