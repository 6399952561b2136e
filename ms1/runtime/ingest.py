"""The ingestor's side of ms1's inbound stream: hand e-mails to ms1 so that a Redis
failover cannot lose them.

More: docs/internals.md, ``ms1.runtime.ingest``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

import pluggy

from ms1.config import Config
from ms1.errors import SubmitError as SubmitError  # re-exported: the ingestor imports it here
from ms1.pipeline.source import Source
from ms1.runtime import settings

__all__ = ["Inbound", "SubmitError", "Submitter", "submit"]


@runtime_checkable
class Submitter(Protocol):
    """A source that takes e-mails with an idempotency key (the ``redis`` source)."""

    def submit(self, emails: Sequence[bytes], *, key: str | None = None,
               retry_for: float = 0.0) -> str: ...


class Inbound:
    """The inbound stream of one ms1 config, for the ingestor (see the module doc).

    ``config``: the path of ms1's INI file (or a loaded :class:`~ms1.config.Config`); its
    ``[source] name`` must be a source that takes e-mails with a key (``redis``). Keep one
    ``Inbound`` open and call :meth:`submit` from any thread; :meth:`close` it at the end.
    """

    def __init__(self, config: str | Config, *, pm: pluggy.PluginManager | None = None
                 ) -> None:
        from ms1.runtime import pluginmanager  # the plugins load when an Inbound is made

        pm = pm or pluginmanager.make_plugin_manager()
        if isinstance(config, str):
            config = pluginmanager.load(pm, config)
        self._source: Source = pluginmanager.build_source(pm, config)
        if not isinstance(self._source, Submitter):
            self._source.close()
            raise config.error("source", "name", f"source {settings.source_name(config)!r} "
                               "takes no e-mails with a key (ms1.runtime.ingest submits to a "
                               "source that does: the redis source)")
        self._submitter: Submitter = self._source

    def submit(self, emails: Sequence[bytes | str], *, key: str | None = None,
               retry_for: float = 0.0) -> str:
        """Add ``emails`` (each one JSON ``EmailMessage``, bytes or text) to the inbound
        stream; return the key they were added under. Raises :class:`SubmitError` when
        they are not known to be safe (retry with its ``key``)."""
        data = [e.encode("utf-8") if isinstance(e, str) else bytes(e) for e in emails]
        return self._submitter.submit(data, key=key, retry_for=retry_for)

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Inbound:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def submit(config: str | Config, emails: Sequence[bytes | str], *, key: str | None = None,
           retry_for: float = 0.0) -> str:
    """One-off :meth:`Inbound.submit` (connects, submits, disconnects)."""
    with Inbound(config) as inbound:
        return inbound.submit(emails, key=key, retry_for=retry_for)
