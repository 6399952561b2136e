"""Stage 5: the transport, which carries one request to MS4 and brings back its answer.

A :class:`Transport` only moves bytes: it does not retry, pause or split — the
sender module decides what an answer means. It raises
:class:`~ms1.errors.TransportError` when there is no answer at all (connection
refused, timeout, connection dropped). Built in: :class:`MemoryTransport`, an
in-process MS4 that records every request and can be scripted, like httpx's
``MockTransport``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ms1.config import Secret
from ms1.errors import TransportError

_HEX32 = re.compile(r"[0-9a-f]{32}")


def traceparent(batch_id: str, attempt: int = 1) -> str:
    """``00-<trace id>-<span id>-01`` (W3C Trace Context, sampled): the trace id is the
    batch id when it is 32 lower-case hex digits (ms1's are), else its hash; the span id
    a hash of the batch id and the attempt. Never all zeros (invalid)."""
    trace = batch_id if _HEX32.fullmatch(batch_id) and batch_id.strip("0") else \
        hashlib.blake2b(batch_id.encode(), digest_size=16).hexdigest()
    span = hashlib.blake2b(f"{batch_id}/{attempt}".encode(), digest_size=8).hexdigest()
    if not trace.strip("0"):
        trace = "1".rjust(32, "0")
    if not span.strip("0"):
        span = "1".rjust(16, "0")
    return f"00-{trace}-{span}-01"


@dataclass(frozen=True, slots=True)
class Request:
    """One POST to MS4. ``body`` is sent as is; ``idempotency_key`` is the batch id;
    ``attempt``: which attempt at the batch this is (1 first)."""

    path: str
    body: bytes
    idempotency_key: str
    count: int
    attempt: int = 1

    @property
    def traceparent(self) -> str:
        """The W3C Trace Context ``traceparent`` of this request: the trace is the batch
        (its id, the ``Idempotency-Key``, is the trace id when it is 32 hex digits, else a
        hash of it), the span this attempt, so MS4's logs join ms1's by batch."""
        return traceparent(self.idempotency_key, self.attempt)


@dataclass(frozen=True, slots=True)
class Response:
    """MS4's answer. ``headers`` keys are lower case. ``sent``: ``time.monotonic()`` when
    the whole request had been handed to the network — the latest moment MS4 can have
    begun to receive it, where a rate limiter counting arrivals stamps it (None: the
    transport does not say; the sender then stamps the slot when the answer came)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    text: str = ""
    sent: float | None = None


class Transport(ABC):
    """Contract of a transport plugin. ``send`` is called from every sender thread at once."""

    name: str = "?"
    #: seconds one call may block by design (its own timeouts), None: not bounded here;
    #: the service warns when ``[ms1] watchdog_timeout`` is not above it
    longest_call: float | None = None

    @abstractmethod
    def send(self, request: Request) -> Response:
        """POST the request; return MS4's answer or raise TransportError if none came.
        Set :attr:`Response.sent` (and :attr:`TransportError.sent` once the request was
        out) when the transport knows it: with it the rate limiter spends no slot on the
        time a request spends at MS4."""

    def set_api_key(self, api_key: Secret | None) -> None:  # noqa: B027 - optional
        """Use this key from now on (called at start and on reload)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Close connections. Must not block, may be called twice, and ends a ``send`` in
        progress on another thread (with :class:`TransportError`) at once: the service
        calls it when the shutdown deadline has passed."""


Answer = Response | int | Exception
Handler = Callable[[Request], Answer]


class MemoryTransport(Transport):
    """An in-process MS4: records every request and answers 202 unless told otherwise.

    ``script(*answers)`` queues answers for the next requests (a status code, a
    :class:`Response`, or an exception to raise, e.g. ``TransportError``);
    ``handler`` answers the rest; without either every request gets 202. With
    ``expected_key`` set, a request carrying another key gets 401, like MS4.
    """

    name = "memory"

    def __init__(
        self, handler: Handler | None = None, *, expected_key: Secret | None = None,
    ) -> None:
        self.requests: list[Request] = []
        self.accepted: list[Request] = []
        self._script: deque[Answer] = deque()
        self._handler = handler
        self._expected_key = expected_key
        self._api_key: Secret | None = None
        self._lock = threading.Lock()

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._script.extend(answers)

    def set_api_key(self, api_key: Secret | None) -> None:
        with self._lock:
            self._api_key = api_key

    def send(self, request: Request) -> Response:
        sent = time.monotonic()
        with self._lock:
            self.requests.append(request)
            answer: Answer | None = self._script.popleft() if self._script else None
            wrong_key = self._expected_key is not None and self._api_key != self._expected_key
        if answer is None:
            if wrong_key:
                answer = Response(401, text="invalid API key")
            elif self._handler is not None:
                answer = self._handler(request)
            else:
                answer = 202
        if isinstance(answer, Exception):
            raise answer
        response = answer if isinstance(answer, Response) else Response(answer)
        if response.sent is None:
            response = dataclasses.replace(response, sent=sent)
        if response.status == 202:
            with self._lock:
                self.accepted.append(request)
        return response

    def accepted_payload_count(self) -> int:
        with self._lock:
            return sum(r.count for r in self.accepted)


__all__ = ["MemoryTransport", "Request", "Response", "Transport", "TransportError"]
