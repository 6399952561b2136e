"""The plugin markers: ``@hookimpl`` on a plugin's hook functions, ``@hookspec`` on the
specifications in :mod:`ms1.hookspecs` (which re-exports both). Apart from the specs, so
that the modules implementing hooks (the metrics exporter) need not import them."""

import pluggy

#: the pluggy project name: the hooks' prefix (``ms1_``) and the entry-point group
PROJECT = "ms1"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
