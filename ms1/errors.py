"""The one exception tree of ms1.

Lower layers (configparser, json, httpx, redis-py) raise their own exceptions;
ms1 translates them at its boundary with ``raise Ms1Error(...) from exc`` so
callers only ever catch these.

Every message goes through :func:`ms1.redaction.redact` when the error is made, so no
``str()``, ``repr()`` or ``args`` of an ms1 error holds a known secret or a URL password.
"""

from __future__ import annotations

from ms1.redaction import redact


class Ms1Error(Exception):
    """Base class of every error ms1 raises on purpose; its text arguments are redacted."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class ConfigError(Ms1Error):
    """The configuration is unusable. ``str()`` is one line naming file, section and key.

    The CLI prints it and exits with status 2.
    """

    def __init__(
        self, problem: str, *, path: str | None = None, section: str | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = redact(problem)
        self.path = path
        self.section = section
        self.key = key
        where = []
        if path:
            where.append(path)
        if section is not None:
            where.append(f"[{section}]" + (f" {key}" if key else ""))
        super().__init__(": ".join([*where, problem]))  # Ms1Error redacts the whole text


class PluginNotFoundError(ConfigError):
    """The config names a component (source, policy, ...) that no installed plugin provides."""


class PluginError(ConfigError):
    """An installed plugin is unusable: a hookimpl for a hook ms1 does not have (a typo),
    a hookimpl whose arguments the hook does not give, or a factory that built the wrong
    type. ``str()`` is one line naming the plugin and the hook; the CLI exits with 2."""


class QueueError(Ms1Error):
    """The queue backend could not complete an operation (the data is still where it was)."""


class SourceError(Ms1Error):
    """The source could not be read or acknowledged."""


class SubmitError(SourceError):
    """E-mails were not acknowledged as safe: they may or may not be in the inbound
    stream. Retry with ``key=`` :attr:`key`: a retry with the same key adds none twice."""

    def __init__(self, message: str, *, key: str, added: bool | None = None,
                 permanent: bool = False) -> None:
        super().__init__(message)
        self.key = key
        #: True: they are in the stream on the primary (replicas fell short); None: unknown
        self.added = added
        #: True: Redis refused for a reason no wait clears (a key of another type, an ACL
        #: that forbids the command or key): retrying is no use until that is fixed, so
        #: ``retry_for`` is not spent on it
        self.permanent = permanent


class TransportError(Ms1Error):
    """The transport could not get an answer from MS4 (connection error, timeout).

    The batch was not acknowledged by MS4 and stays queued. ``sent``: as
    :attr:`ms1.pipeline.transport.Response.sent`, when the request was out before the failure
    (None: it was not, or the transport does not say).
    """

    def __init__(self, *args: object, sent: float | None = None,
                 misconfigured: bool = False) -> None:
        """``misconfigured``: no retry can succeed until the configuration changes (the TLS
        handshake refused a certificate): every sender stops, as for a 3xx or a 404."""
        super().__init__(*args)
        self.sent = sent
        self.misconfigured = misconfigured


class ShutdownTimeout(Ms1Error):
    """Stopping took longer than ``shutdown_timeout``; undelivered batches stay queued."""
