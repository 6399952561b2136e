"""Loading plugins, building components by the names the config gives, calling observers.

Nothing here runs on import: :func:`make_plugin_manager` creates a fresh
manager each time it is called. Built-in plugins (``ms1_plugins.*``) and
third-party ones come through the same door, the ``ms1`` entry-point group,
and any of them can be blocked by its entry-point name (``--block-plugin NAME``,
``$MS1_BLOCK_PLUGINS``).

Every hook name ms1 calls is spelt in this module only: the factories through
``build_source`` ... ``build_rate_limiter``, ``build_fleet`` (typed), the observers through the
typed methods of :class:`Observers`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import pluggy

from ms1 import hookspecs
from ms1.config import (
    COMPONENT_KEYS,
    CORE_OPTIONS,
    Config,
    Option,
    check_durability,
    load_config,
)
from ms1.errors import PluginError, PluginNotFoundError
from ms1.observers import OBSERVER_HOOKS, Observers, plugin_label
from ms1.ops.fleet import Fleet
from ms1.pipeline.batching import BatchPolicy
from ms1.pipeline.deadletters import DeadLetterStore
from ms1.pipeline.ledger import Ledger
from ms1.pipeline.outbound import QueueBackend
from ms1.pipeline.sending.limiter import RateLimiter
from ms1.pipeline.source import Source
from ms1.pipeline.transport import Transport
from ms1.runtime import settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ms1"
#: environment variable naming plugins not to load, comma-separated
BLOCK_ENV = "MS1_BLOCK_PLUGINS"

# --- the plugin manager ------------------------------------------------------------------


def make_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[object] = (), blocked: Iterable[str] = (),
) -> pluggy.PluginManager:
    """A new plugin manager with the hookspecs, the installed plugins and ``plugins``.

    ``blocked`` names entry points not to load (built-in ones too: ``redis``, ``http``);
    a name no entry point has is only warned about. Every hookimpl is checked against
    the hookspecs: a misspelt hook name, arguments the hook does not give, or a wrapper
    on an observer hook raise :class:`~ms1.errors.PluginError` naming plugin and hook.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    names = [name for name in dict.fromkeys(blocked) if name]
    for name in names:
        pm.set_blocked(name)
    try:
        if entry_points:
            _warn_unknown_blocked(names)
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in plugins:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _plugin_error(pm, exc) from None
    _check_observers(pm)
    return pm


def parse_blocked(text: str) -> list[str]:
    """Plugin names from ``--block-plugin`` / ``$MS1_BLOCK_PLUGINS``: comma-separated."""
    return [name.strip() for name in text.split(",") if name.strip()]


def blocked_from_env(environ: Mapping[str, str]) -> list[str]:
    """The plugin names ``$MS1_BLOCK_PLUGINS`` blocks (none if unset)."""
    return parse_blocked(environ.get(BLOCK_ENV, ""))


def entry_point_names() -> list[str]:
    """Names of the installed plugins (the ``ms1`` entry points), sorted."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def blocked_names(pm: pluggy.PluginManager) -> list[str]:
    """The plugin names blocked in ``pm``, sorted."""
    return sorted(name for name, plugin in pm.list_name_plugin()
                  if plugin is None and pm.is_blocked(name))


def _warn_unknown_blocked(names: Sequence[str]) -> None:
    installed_names = entry_point_names()
    for name in names:
        if name not in installed_names:
            log.warning("blocked plugin %r is not installed, nothing to block; installed "
                        "plugins: %s", name, ", ".join(installed_names) or "none")


def _hook_names(pm: pluggy.PluginManager) -> list[str]:
    return sorted(name for name, caller in vars(pm.hook).items()
                  if not name.startswith("_") and caller.has_spec())


def _how_to_block(name: str) -> str:
    if name in entry_point_names():
        return f"; to start without it: --block-plugin {name}"
    return ""


def _plugin_error(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> PluginError:
    """One line naming the plugin and the hook, for pluggy's multi-line validation error."""
    plugin = exc.plugin
    unknown = sorted(hook for hook, caller in vars(pm.hook).items()
                     if not hook.startswith("_") and not caller.has_spec()
                     and any(impl.plugin is plugin for impl in caller.get_hookimpls()))
    if unknown:  # check_pending: hookimpls with no hookspec
        name = plugin_label(pm.get_name(plugin), plugin)
        known = _hook_names(pm)
        problems = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, known, n=1)
            problems.append(f"unknown hook {hook!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        dist = {id(p): d for p, d in pm.list_plugin_distinfo()}.get(id(plugin))
        where = f" (from {dist.metadata['Name']} {dist.version})" if dist is not None else ""
        return PluginError(f"plugin {name!r}{where}: {'; '.join(problems)}; ms1's hooks are "
                           f"documented in ms1/hookspecs.py{_how_to_block(name)}")
    # register() (before pluggy 1.7 it leaves the plugin half-registered): pluggy's message
    # is "Plugin 'name' for hook 'hook'\n...\nwhat is wrong"
    text = str(exc)
    found = re.search(r"Plugin '([^']*)'", text)
    name = plugin_label(found.group(1) if found else None, plugin)
    hook_found = re.search(r"hook '([^']*)'", text)
    hook = hook_found.group(1) if hook_found else "?"
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    reason = "; ".join(line for line in lines if not line.startswith("hook "))
    caller = getattr(pm.hook, hook, None)
    if caller is not None and caller.spec is not None:
        reason += f"; {hook} gives ({', '.join(caller.spec.argnames)})"
    return PluginError(f"plugin {name!r}: hook {hook!r}: {reason}{_how_to_block(name)}")


def _check_observers(pm: pluggy.PluginManager) -> None:
    for hook in OBSERVER_HOOKS:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                raise PluginError(
                    f"plugin {plugin_label(impl.plugin_name, impl.plugin)!r}: hook {hook!r}: an "
                    "observer hook cannot be a wrapper (wrapper=True/hookwrapper=True): ms1 "
                    f"calls each observer on its own{_how_to_block(impl.plugin_name)}")


# --- the config ----------------------------------------------------------------------------


def all_options(pm: pluggy.PluginManager) -> list[Option]:
    """The core options plus every plugin's."""
    options = list(CORE_OPTIONS)
    for contributed in pm.hook.ms1_config_options():
        options.extend(contributed)
    return options


def load(pm: pluggy.PluginManager, path: str) -> Config:
    """Read and validate ``path`` against the full schema (every option's own checks
    included), check the component names and that an acknowledging source has durable
    backends (:func:`~ms1.config.check_durability`). Builds nothing: ``check``, ``run``
    and a reload refuse the same files."""
    config = load_config(path, all_options(pm))
    for kind in COMPONENT_KEYS:
        _check_installed(pm, config, kind)
    _check_fleet(pm, config)
    check_durability(config, component_traits(pm))
    return config


def component_traits(pm: pluggy.PluginManager) -> set[tuple[str, str, str]]:
    """Every ``(kind, name, trait)`` the installed plugins declare."""
    return {(str(kind), str(name), str(trait)) for triples in pm.hook.ms1_component_traits()
            for kind, name, trait in triples}


def installed(pm: pluggy.PluginManager, kind: str) -> list[str]:
    """Names of the installed components of ``kind``, sorted."""
    names = {name for pairs in pm.hook.ms1_components() for k, name in pairs if k == kind}
    return sorted(names)


def _check_installed(pm: pluggy.PluginManager, config: Config, kind: str) -> None:
    section, key = COMPONENT_KEYS[kind]
    name = settings.component(config, kind)
    names = installed(pm, kind)
    if name not in names:
        listed = ", ".join(names) if names else "none (is ms1 installed? pip install -e .)"
        blocked = blocked_names(pm)
        if blocked:
            listed += f" (blocked: {', '.join(blocked)})"
        raise PluginNotFoundError(
            f"no installed plugin provides {kind.replace('_', ' ')} {name!r}; installed: {listed}",
            path=config.path, section=section, key=key)


# --- factories -------------------------------------------------------------------------------
# ``_make`` checks the built object against the table with isinstance; the ``cast`` in each
# ``build_*`` only tells mypy so (mypy will not take an abstract class as ``type[T]``).

#: kind -> (factory hook, the class what it builds must be an instance of)
_FACTORIES: dict[str, tuple[str, type[Any]]] = {
    "source": ("ms1_make_source", Source),
    "batch_policy": ("ms1_make_batch_policy", BatchPolicy),
    "queue": ("ms1_make_queue", QueueBackend),
    "dead_letters": ("ms1_make_dead_letters", DeadLetterStore),
    "transport": ("ms1_make_transport", Transport),
    "rate_limiter": ("ms1_make_rate_limiter", RateLimiter),
}


def _make(pm: pluggy.PluginManager, config: Config, kind: str, **extra: object) -> object:
    """Call ``kind``'s factory hook for the configured name; check what it built."""
    _check_installed(pm, config, kind)
    section, key = COMPONENT_KEYS[kind]
    name = settings.component(config, kind)
    hook, cls = _FACTORIES[kind]
    caller = getattr(pm.hook, hook)
    component = caller(name=name, config=config, **extra)
    if component is None:
        raise PluginNotFoundError(
            f"plugins declare {kind.replace('_', ' ')} {name!r} but none built it",
            path=config.path, section=section, key=key)
    if not isinstance(component, cls):
        made = type(component)
        raise PluginError(
            f"{kind.replace('_', ' ')} {name!r} was built as {made.__module__}."
            f"{made.__qualname__}, which is not a {cls.__module__}.{cls.__qualname__}",
            path=config.path, section=section, key=key)
    log.debug("%s %r built by %s", kind, name, type(component).__name__)
    return component


def build_source(pm: pluggy.PluginManager, config: Config,
                 inputs: Sequence[str] = ()) -> Source:
    """The source ``[source] name`` selects (``ms1_make_source``)."""
    return cast(Source, _make(pm, config, "source", inputs=list(inputs)))


def build_batch_policy(pm: pluggy.PluginManager, config: Config) -> BatchPolicy:
    """The batch policy ``[batch] policy`` selects (``ms1_make_batch_policy``)."""
    return cast(BatchPolicy, _make(pm, config, "batch_policy"))


def build_queue(pm: pluggy.PluginManager, config: Config) -> QueueBackend:
    """The outbound queue ``[queue] backend`` selects (``ms1_make_queue``); what it sets
    aside keeps at most ``[dead_letters] max_payload_bytes`` of a payload."""
    queue = cast(QueueBackend, _make(pm, config, "queue"))
    queue.max_payload_bytes = settings.service(config).max_payload_bytes
    return queue


def build_dead_letters(pm: pluggy.PluginManager, config: Config) -> DeadLetterStore:
    """The dead-letter store ``[dead_letters] backend`` selects (``ms1_make_dead_letters``),
    keeping at most ``[dead_letters] max_payload_bytes`` of a payload."""
    store = cast(DeadLetterStore, _make(pm, config, "dead_letters"))
    store.max_payload_bytes = settings.service(config).max_payload_bytes
    return store


def build_transport(pm: pluggy.PluginManager, config: Config) -> Transport:
    """The transport ``[ms4] transport`` selects (``ms1_make_transport``); no API key yet."""
    return cast(Transport, _make(pm, config, "transport"))


def build_rate_limiter(pm: pluggy.PluginManager, config: Config) -> RateLimiter:
    """The rate limiter ``[send] rate_limiter`` selects (``ms1_make_rate_limiter``)."""
    return cast(RateLimiter, _make(pm, config, "rate_limiter"))


#: ``[fleet] backend``: resolved by :func:`fleet_name`
FLEET_AUTO = "auto"


def _check_fleet(pm: pluggy.PluginManager, config: Config) -> None:
    """``[fleet] backend`` names an installed fleet (or is ``auto``)."""
    name = settings.fleet_backend(config)
    names = installed(pm, "fleet")
    if name != FLEET_AUTO and name not in names:
        listed = ", ".join([FLEET_AUTO, *names])
        blocked = blocked_names(pm)
        if blocked:
            listed += f" (blocked: {', '.join(blocked)})"
        raise PluginNotFoundError(f"no installed plugin provides fleet {name!r}; installed: "
                                  f"{listed}", path=config.path, section="fleet", key="backend")


def fleet_name(pm: pluggy.PluginManager, config: Config, queue_name: str | None = None) -> str:
    """The fleet ``[fleet] backend`` selects; ``auto``: the fleet the outbound queue's
    plugin declares its instances share (trait ``fleet:NAME``), when installed, else
    ``memory``. ``queue_name``: the name of the queue actually built (an ``auto`` queue
    that fell back to memory is ``memory``); without it, ``[queue] backend`` decides."""
    name = settings.fleet_backend(config)
    return name if name != FLEET_AUTO else _shared_with_queue(pm, config, queue_name, "fleet")


def _shared_with_queue(pm: pluggy.PluginManager, config: Config, queue_name: str | None,
                       kind: str) -> str:
    """What ``auto`` means for a ``kind`` (fleet, ledger): the one the outbound queue's
    plugin declares (trait ``<kind>:NAME``), when installed, else ``memory``.
    ``queue_name``: the queue actually built; without it, ``[queue] backend``."""
    queue = queue_name if queue_name is not None else settings.component(config, "queue")
    present = installed(pm, kind)
    shared = sorted(trait.partition(":")[2] for what, name, trait in component_traits(pm)
                    if what == "queue" and name == queue and trait.startswith(f"{kind}:"))
    return next((found for found in shared if found in present), "memory")


def build_fleet(pm: pluggy.PluginManager, config: Config, queue_name: str | None = None
                ) -> Fleet:
    """The fleet ``[fleet] backend`` selects (``ms1_make_fleet``; ``auto`` resolved by
    :func:`fleet_name`)."""
    _check_fleet(pm, config)
    name = fleet_name(pm, config, queue_name)
    fleet = pm.hook.ms1_make_fleet(name=name, config=config)
    if fleet is None:
        raise PluginNotFoundError(f"no installed plugin built fleet {name!r}; installed: "
                                  f"{', '.join(installed(pm, 'fleet')) or 'none'}",
                                  path=config.path, section="fleet", key="backend")
    if not isinstance(fleet, Fleet):
        made = type(fleet)
        raise PluginError(f"fleet {name!r} was built as {made.__module__}.{made.__qualname__}, "
                          "which is not a ms1.ops.fleet.Fleet", path=config.path, section="fleet",
                          key="backend")
    log.debug("fleet %r built by %s", name, type(fleet).__name__)
    return fleet


LEDGER_AUTO, LEDGER_OFF = "auto", "off"


def ledger_name(pm: pluggy.PluginManager, config: Config, queue_name: str | None = None
                ) -> str:
    """The ledger ``[ledger] backend`` selects; ``auto``: the store the outbound queue's
    plugin declares (trait ``ledger:NAME``), when installed, else ``memory``."""
    name = settings.ledger(config).backend
    return name if name != LEDGER_AUTO else _shared_with_queue(pm, config, queue_name,
                                                                "ledger")


def build_ledger(pm: pluggy.PluginManager, config: Config, queue_name: str | None = None
                 ) -> Ledger | None:
    """The ledger ``[ledger] backend`` selects (``ms1_make_ledger``), None when ``off``."""
    name = ledger_name(pm, config, queue_name)
    if name == LEDGER_OFF:
        return None
    if name not in installed(pm, "ledger"):
        listed = ", ".join([LEDGER_AUTO, LEDGER_OFF, *installed(pm, "ledger")])
        raise PluginNotFoundError(f"no installed plugin provides ledger {name!r}; installed: "
                                  f"{listed}", path=config.path, section="ledger",
                                  key="backend")
    ledger = pm.hook.ms1_make_ledger(name=name, config=config)
    if not isinstance(ledger, Ledger):
        raise PluginError(f"ledger {name!r} was not built as a ms1.pipeline.ledger.Ledger",
                          path=config.path, section="ledger", key="backend")
    return ledger


def build(pm: pluggy.PluginManager, config: Config, kind: str, **extra: Any) -> Any:
    """Build the component of ``kind`` that the config names (untyped; prefer ``build_*``)."""
    return _make(pm, config, kind, **extra)


__all__: Sequence[str] = [
    "BLOCK_ENV", "ENTRY_POINT_GROUP", "OBSERVER_HOOKS", "Observers", "all_options",
    "blocked_from_env", "blocked_names", "build", "build_batch_policy", "build_dead_letters",
    "build_fleet", "build_queue", "build_rate_limiter", "build_source", "build_transport",
    "entry_point_names", "fleet_name", "installed", "load", "make_plugin_manager", "parse_blocked",
]
