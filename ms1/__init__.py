"""ms1: forwards invoice metadata from MS1 (the e-mail ingestor) to MS4 in batches.

Packages by concern: :mod:`ms1.pipeline` (the stages, in flow order), :mod:`ms1.runtime`
(plugins, components, the service), :mod:`ms1.ops` (metrics, fleet, logs, systemd, the
operator's files), :mod:`ms1.console`, :mod:`ms1.cli`; at the top the foundation
(:mod:`.model`, :mod:`.errors`, :mod:`.config`, :mod:`.redaction`, :mod:`.heartbeat`), the
plugin contract (:mod:`.hookspecs`, :mod:`.markers`, :mod:`.observers`) and :mod:`.api`,
what third-party plugins import. The built-in plugins are ``ms1_plugins`` (``plugins/``).
docs/architecture.md walks the data flow. Importing the package has no side effects.
"""

__version__ = "1.0.0"
