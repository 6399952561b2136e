"""The observer hooks, called through :class:`Observers`: typed, each plugin on its own.
The stages call them; :mod:`ms1.runtime.pluginmanager` makes the plugin manager."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pluggy

from ms1.config import Config
from ms1.model import Batch, DeadLetter

log = logging.getLogger(__name__)

#: the hooks called through :class:`Observers`, one plugin at a time
OBSERVER_HOOKS = ("ms1_service_started", "ms1_service_stopped", "ms1_config_reloaded",
                  "ms1_batch_enqueued", "ms1_batch_sent", "ms1_batch_failed",
                  "ms1_payload_rejected")


def plugin_label(name: str | None, plugin: object) -> str:
    """How a plugin is named in messages: its entry-point or module name, else its class."""
    if name and name != str(id(plugin)):
        return name
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


class Observers:
    """Calls the observer hooks, each plugin on its own (dramatiq's ``emit_after``).

    Every implementation is called in pluggy's order (last registered first,
    ``tryfirst``/``trylast`` respected) inside its own ``try``: one that raises is
    logged with its plugin's name and the hook's, and the others are still called;
    delivery never sees the exception. Implementations registered after this
    object was made (the metrics exporter) are called too.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def service_started(self, config: Config) -> None:
        self._call("ms1_service_started", config=config)

    def service_stopped(self) -> None:
        self._call("ms1_service_stopped")

    def config_reloaded(self, old: Config, new: Config,
                        changed: Sequence[tuple[str, str]]) -> None:
        self._call("ms1_config_reloaded", old=old, new=new, changed=tuple(changed))

    def batch_enqueued(self, batch: Batch) -> None:
        self._call("ms1_batch_enqueued", batch=batch)

    def batch_sent(self, batch: Batch, status: int, attempt: int, latency: float) -> None:
        self._call("ms1_batch_sent", batch=batch, status=status, attempt=attempt,
                   latency=latency)

    def batch_failed(self, batch: Batch, status: int | None, error: str, attempt: int,
                     will_retry: bool) -> None:
        self._call("ms1_batch_failed", batch=batch, status=status, error=error,
                   attempt=attempt, will_retry=will_retry)

    def payload_rejected(self, letter: DeadLetter) -> None:
        self._call("ms1_payload_rejected", letter=letter)

    def _call(self, hook: str, **kwargs: object) -> None:
        caller: pluggy.HookCaller = getattr(self._hook, hook)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's call order
            if impl.wrapper or impl.hookwrapper:
                continue  # refused by make_plugin_manager; no call to wrap here
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception:
                log.exception("observer plugin %r failed in hook %r (ignored)",
                              plugin_label(impl.plugin_name, impl.plugin), hook)


