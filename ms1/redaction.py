"""The one redaction of ms1: what ``check``, the logs, the errors and the reprs pass text
through before anyone sees it.

:func:`redact` replaces with ``***``

More: docs/internals.md, ``ms1.redaction``.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterable

__all__ = ["KNOWN", "MASK", "MIN_SECRET_LENGTH", "QUERY_SECRET_NAMES", "Redactor", "forms",
           "redact", "redact_shapes", "remember", "url_secrets"]

#: what a secret is replaced by
MASK = "***"
#: strings shorter than this are never treated as secrets
MIN_SECRET_LENGTH = 4

#: ``scheme://userinfo@``: the userinfo ends at the last ``@`` before the path
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/?#'\"<>\\]*)@")
#: names of query parameters whose value is a credential
QUERY_SECRET_NAMES = ("password", "passwd", "pass", "pwd", "auth", "token", "access_token",
                      "secret", "api_key", "apikey", "key", "x-api-key")
_QUERY = re.compile(r"(?i)([?&;](?:" + "|".join(map(re.escape, QUERY_SECRET_NAMES))
                    + r")=)[^&#;\s'\"<>\\]+")


def _userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match.group(1), match.group(2)
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{user}:{MASK}@" if colon else f"{scheme}{MASK}@"


def redact_shapes(text: str) -> str:
    """``text`` with URL passwords and password-like query values masked (no known
    secrets needed)."""
    if "@" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    return text


def forms(secret: str) -> set[str]:
    """Every way ``secret`` can be written out: itself, its ``repr``/bytes-repr/JSON inner
    text, percent-encoded (three ways), and each of its lines (if it has several); the
    ones shorter than :data:`MIN_SECRET_LENGTH` are left out."""
    found = {secret, repr(secret)[1:-1], repr(secret.encode("utf-8", "backslashreplace"))[2:-1],
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret),
             urllib.parse.quote_plus(secret)}
    lines = [line.strip() for line in secret.splitlines()]
    if len(lines) > 1:
        for line in lines:
            found |= forms(line)
    return {form for form in found if len(form) >= MIN_SECRET_LENGTH}


class Redactor:
    """A set of known secrets and the masking of all their forms. Thread-safe."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Know ``secrets`` (and all their forms) from now on; short ones are skipped."""
        new = {form for secret in secrets
               if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH
               for form in forms(secret)}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets = self._secrets | new
            self._compile()

    def _compile(self) -> None:
        # longest first, so a secret containing another is masked whole
        ordered = sorted(self._secrets, key=lambda s: (-len(s), s))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def snapshot(self) -> frozenset[str]:
        """The known forms (for tests: :meth:`restore` them later)."""
        return self._secrets

    def restore(self, snapshot: frozenset[str]) -> None:
        with self._lock:
            self._secrets = snapshot
            self._compile()

    def redact_known(self, text: str) -> str:
        """``text`` with every form of every known secret masked."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def redact(self, text: str) -> str:
        """``text`` with known secrets, URL passwords and query passwords masked."""
        return redact_shapes(self.redact_known(text)) if text else text


#: the secrets this process knows
KNOWN = Redactor()


def remember(*secrets: str) -> None:
    """Redact ``secrets`` everywhere from now on (API keys, passwords)."""
    KNOWN.add(*secrets)


def redact(text: str) -> str:
    """``text`` as it may be shown: every known secret in any form, URL userinfo passwords
    and password-like query values replaced by ``***``."""
    return KNOWN.redact(text)


def url_secrets(url: str) -> list[str]:
    """The credentials a URL holds (its userinfo password, password-like query values),
    decoded, for :func:`remember`; nothing if it does not parse. (A userinfo without a
    password is masked by shape only: it is often a plain user name.)"""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [urllib.parse.unquote(parts.password or "")]
        names = {name.lower() for name in QUERY_SECRET_NAMES}
        found += [value for name, value in urllib.parse.parse_qsl(parts.query)
                  if name.lower() in names]
    except ValueError:
        return []
    return [value for value in found if value]
