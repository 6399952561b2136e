"""Loading plugins and building components by the names the config gives.

Nothing here runs on import: :func:`make_plugin_manager` creates a fresh
manager each time it is called. Built-in plugins (``ms1_plugins.*``) and
third-party ones come through the same door, the ``ms1`` entry-point group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pluggy

from ms1 import hookspecs
from ms1.config import COMPONENT_KEYS, CORE_OPTIONS, Config, Option, load_config
from ms1.errors import PluginNotFoundError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ms1"


def make_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[object] = (),
) -> pluggy.PluginManager:
    """A new plugin manager with the hookspecs, the installed plugins and ``plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins:
        pm.register(plugin)
    return pm


def all_options(pm: pluggy.PluginManager) -> list[Option]:
    """The core options plus every plugin's."""
    options = list(CORE_OPTIONS)
    for contributed in pm.hook.ms1_config_options():
        options.extend(contributed)
    return options


def load(pm: pluggy.PluginManager, path: str) -> Config:
    """Read and validate ``path`` against the full schema, and check the component names."""
    config = load_config(path, all_options(pm))
    for kind in COMPONENT_KEYS:
        _check_installed(pm, config, kind)
    return config


def installed(pm: pluggy.PluginManager, kind: str) -> list[str]:
    """Names of the installed components of ``kind``, sorted."""
    names = {name for pairs in pm.hook.ms1_components() for k, name in pairs if k == kind}
    return sorted(names)


def _check_installed(pm: pluggy.PluginManager, config: Config, kind: str) -> None:
    section, key = COMPONENT_KEYS[kind]
    name = config.get_str(section, key)
    names = installed(pm, kind)
    if name not in names:
        listed = ", ".join(names) if names else "none (is ms1 installed? pip install -e .)"
        raise PluginNotFoundError(
            f"no installed plugin provides {kind.replace('_', ' ')} {name!r}; installed: {listed}",
            path=config.path, section=section, key=key)


_FACTORIES = {
    "source": "ms1_make_source",
    "batch_policy": "ms1_make_batch_policy",
    "queue": "ms1_make_queue",
    "dead_letters": "ms1_make_dead_letters",
    "transport": "ms1_make_transport",
    "rate_limiter": "ms1_make_rate_limiter",
}


def build(pm: pluggy.PluginManager, config: Config, kind: str, **extra: Any) -> Any:
    """Build the component of ``kind`` that the config names, through its factory hook."""
    _check_installed(pm, config, kind)
    section, key = COMPONENT_KEYS[kind]
    name = config.get_str(section, key)
    hook = getattr(pm.hook, _FACTORIES[kind])
    component = hook(name=name, config=config, **extra)
    if component is None:
        raise PluginNotFoundError(
            f"plugins declare {kind.replace('_', ' ')} {name!r} but none built it",
            path=config.path, section=section, key=key)
    log.debug("%s %r built by %s", kind, name, type(component).__name__)
    return component


class Observers:
    """Calls the observer hooks so that a failing plugin never breaks delivery."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        try:
            getattr(self._hook, hook_name)(**kwargs)
        except Exception:
            log.exception("plugin hook %s failed (ignored)", hook_name)


__all__: Sequence[str] = ["Observers", "all_options", "build", "installed", "load",
                          "make_plugin_manager"]
