"""Every hook ms1 calls, with when, what it gets, what it returns.

Plugins are modules or objects with functions marked ``@hookimpl``; they reach
ms1 through the ``ms1`` entry-point group (``[options.entry_points]`` in their
``setup.cfg``), exactly as the built-in plugins in ``ms1_plugins`` do.

There are three families:

* **declaration** hooks, called once at start: the options a plugin adds to
  the config schema and the component names it can build;
* **factory** hooks (``firstresult``), called once per component at start:
  the plugin whose name matches returns an instance, every other returns None;
* **observer** hooks, called as things happen, from the thread where they
  happen: they must be quick and must not raise (an exception is logged and
  ignored so a metrics plugin can never stop delivery).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ms1.batching import BatchPolicy
    from ms1.config import Config, Option
    from ms1.deadletters import DeadLetterStore
    from ms1.model import Batch, DeadLetter
    from ms1.outbound import QueueBackend
    from ms1.sending.limiter import RateLimiter
    from ms1.source import Source
    from ms1.transport import Transport

PROJECT = "ms1"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --- declaration hooks -------------------------------------------------------


@hookspec
def ms1_config_options() -> Sequence[Option]:
    """Declare the INI options this plugin reads.

    Called once, before the config file is read, so the file can be validated
    against the whole schema: a key no plugin declares is an error. Use a
    section of your own (``[queue.redis]``, ``[transport.http]``) and give every
    option a default and a help text (shown by ``ms1-service check``).

    :return: the plugin's :class:`~ms1.config.Option` s. All results are merged.
    """


@hookspec
def ms1_components() -> Sequence[tuple[str, str]]:
    """Declare the components this plugin can build, as ``(kind, name)`` pairs.

    ``kind`` is one of ``source``, ``batch_policy``, ``queue``, ``dead_letters``,
    ``transport``, ``rate_limiter``; ``name`` is what the config selects it by. Called at start to
    validate the config's choices and to list the installed names when a choice
    is unknown. All results are merged.
    """


# --- factory hooks (firstresult) ---------------------------------------------


@hookspec(firstresult=True)
def ms1_make_source(name: str, config: Config, inputs: Sequence[str]) -> Source | None:
    """Build the e-mail source selected by ``[source] name``.

    Called once at start. ``inputs`` are the file arguments of the command line
    (possibly empty). Return a :class:`~ms1.source.Source` if ``name`` is yours,
    else None. ``firstresult``: the first non-None result is used.
    Raise :class:`~ms1.errors.ConfigError` for unusable settings.
    """


@hookspec(firstresult=True)
def ms1_make_batch_policy(name: str, config: Config) -> BatchPolicy | None:
    """Build the batch policy selected by ``[batch] policy``.

    Called once at start (and on reload). Return a
    :class:`~ms1.batching.BatchPolicy` if ``name`` is yours, else None.
    ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_queue(name: str, config: Config) -> QueueBackend | None:
    """Build the outbound queue backend selected by ``[queue] backend``.

    Called once at start. Return a :class:`~ms1.outbound.QueueBackend` if ``name``
    is yours, else None. ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    """Build the dead-letter store selected by ``[dead_letters] backend``.

    Called once at start. Return a :class:`~ms1.deadletters.DeadLetterStore` if
    ``name`` is yours, else None. ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    """Build the MS4 transport selected by ``[ms4] transport``.

    Called once at start. Return a :class:`~ms1.transport.Transport` if
    ``name`` is yours, else None. The API key is handed over afterwards with
    ``Transport.set_api_key``. ``firstresult``.
    """


@hookspec(firstresult=True)
def ms1_make_rate_limiter(name: str, config: Config) -> RateLimiter | None:
    """Build the rate limiter selected by ``[send] rate_limiter``.

    Called once at start. It must hold ``[send] requests_per_minute`` requests per
    ``rate_window`` seconds for every caller that shares it (``memory``: the sender
    threads of this process; ``redis``: every instance on the Redis). Return a
    :class:`~ms1.sending.limiter.RateLimiter` if ``name`` is yours, else None. ``firstresult``.
    """


# --- observer hooks ----------------------------------------------------------


@hookspec
def ms1_service_started(config: Config) -> None:
    """The pipeline threads are running. Called once, from the main thread."""


@hookspec
def ms1_service_stopped() -> None:
    """Every pipeline thread has ended. Called once, from the main thread."""


@hookspec
def ms1_batch_enqueued(batch: Batch) -> None:
    """A batch was closed and is now safely in the outbound queue.

    Called from the batching thread after ``QueueBackend.put`` returned. Also
    called for each part when a batch is split after a 400.
    """


@hookspec
def ms1_batch_sent(batch: Batch, status: int, attempt: int, latency: float) -> None:
    """MS4 accepted the batch (``status`` 202); it has been acked in the queue.

    Called from the sender thread. ``attempt`` counts sends of this batch by
    this process, from 1; ``latency`` is the seconds the successful request took.
    """


@hookspec
def ms1_batch_failed(
    batch: Batch, status: int | None, error: str, attempt: int, will_retry: bool,
) -> None:
    """A send of the batch did not end in 202.

    Called from the sender thread once per failed attempt. ``status`` is MS4's
    answer, or None when there was none (``error`` says why: timeout,
    connection refused, ...). ``will_retry`` is False when the batch leaves
    the sender without being delivered (split after 400, released at shutdown).
    The batch stays queued unless it was split or dead-lettered.
    """


@hookspec
def ms1_payload_rejected(letter: DeadLetter) -> None:
    """An object (or a whole e-mail) went to the dead letters.

    Called after the dead-letter store kept it, from the thread that rejected
    it. ``letter.stage`` says where: ``processor`` (invalid e-mail),
    ``batching`` (too large) or ``ms4`` (MS4 answered 400 for it).
    """
