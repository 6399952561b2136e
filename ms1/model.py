"""The records that travel through the pipeline.

They are small frozen dataclasses; payloads are the MS4 objects already
serialised to compact JSON bytes by the processor, and are never re-encoded:
a request body is a byte join of them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

BATCH_PATH = "/batch-metadata"
UNIT_PATH = "/metadata"
#: default of ``[dead_letters] max_payload_bytes``: payload bytes a dead letter keeps
DEFAULT_MAX_PAYLOAD_BYTES = 65536
#: the format of every stored entry this version writes (an outbound batch, a dead
#: letter), in the field :data:`FORMAT_FIELD`; an entry without it is format 1 (written
#: before formats were marked). A newer format is left untouched (:func:`entry_format`).
ENTRY_FORMAT = 1
FORMAT_FIELD = "v"


class NewerFormat(ValueError):
    """A stored entry of a format newer than this version reads (written by a newer ms1
    during a rolling upgrade): left untouched, never dead-lettered or dropped."""

    def __init__(self, version: int) -> None:
        super().__init__(f"format {version}, newer than the format {ENTRY_FORMAT} this ms1 "
                         "reads: written by a newer ms1; left untouched")
        self.version = version


def entry_format(value: object) -> int:
    """The format of a stored entry from its :data:`FORMAT_FIELD` (None: missing, format
    1); raise :class:`NewerFormat` for one newer than :data:`ENTRY_FORMAT`, ValueError
    for one that is no format number."""
    if value is None:
        return 1
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if not text.isdigit() or len(text) > 6 or int(text) < 1:
        raise ValueError(f"format {text[:20]!r} is not a format number")
    version = int(text)
    if version > ENTRY_FORMAT:
        raise NewerFormat(version)
    return version


# Per-invoice records are plain slots dataclasses, treated as read-only: a frozen one
# costs ~1 us more to build, and three are built per invoice on the hot path.
@dataclass(slots=True)
class InboundMessage:
    """One e-mail as a source hands it over: ``data`` is the EmailMessage JSON.

    ``ref`` identifies it for the source's ``ack`` (a stream entry id, ``file:line``).
    ``problem`` says why the source could not make an e-mail of what it read (``data``
    then holds what it read, raw): the intake makes it a dead letter, stage ``source``.
    """

    ref: str
    data: bytes
    problem: str | None = None


@dataclass(slots=True)
class Item:
    """A payload the processor accepted, on its way into a batch."""

    payload: bytes
    invoice_id: str
    message_id: str
    ref: str


def _batch_id(path: str, payloads: tuple[bytes, ...]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(path.encode())
    for payload in payloads:
        digest.update(b"\n")
        digest.update(payload)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Batch:
    """One MS4 request's worth of payloads.

    ``id`` is derived from the content, so the same batch has the same id on
    every retry, redelivery and even after being rebuilt from the same inbound
    entries following a crash: it is sent as ``Idempotency-Key``.
    ``refs`` are the inbound refs of the payloads (for a Redis source, stream entry ids,
    whose time part dates each e-mail's arrival); a backend may store them or not.
    """

    path: str
    payloads: tuple[bytes, ...]
    invoice_ids: tuple[str, ...]
    message_ids: tuple[str, ...]
    id: str = ""
    created_at: float = field(default_factory=time.time)
    refs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", _batch_id(self.path, self.payloads))

    @classmethod
    def of(cls, path: str, items: list[Item] | tuple[Item, ...]) -> Batch:
        return cls(
            path=path,
            payloads=tuple(i.payload for i in items),
            invoice_ids=tuple(i.invoice_id for i in items),
            message_ids=tuple(i.message_id for i in items),
            refs=tuple(i.ref for i in items),
        )

    @property
    def array(self) -> bool:
        """True when the body is a JSON array (``/batch-metadata``), False for one object."""
        return self.path != UNIT_PATH

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def body_size(self) -> int:
        """Bytes of :meth:`body`, without building it."""
        if not self.array:
            return len(self.payloads[0])
        return sum(map(len, self.payloads)) + max(1, len(self.payloads)) + 1

    def body(self) -> bytes:
        if not self.array:
            return self.payloads[0]
        return b"[" + b",".join(self.payloads) + b"]"

    def split(self) -> tuple[Batch, Batch]:
        """Halve the batch (to isolate the object MS4 rejected); each half has its own id."""
        if len(self.payloads) < 2:
            raise ValueError("a batch of one object cannot be split")
        mid = len(self.payloads) // 2
        return self._slice(0, mid), self._slice(mid, len(self.payloads))

    @classmethod
    def join(cls, batches: Sequence[Batch]) -> Batch:
        """One batch of ``batches``' objects, in order (the halves of batches split before
        a refusal storm was recognised, merged again): the halves of one batch joined give
        that batch back, id included. All must share one ``path``."""
        if not batches or len({batch.path for batch in batches}) != 1:
            raise ValueError("batches to join must be one or more, all of one path")
        refs = () if any(len(b.refs) != len(b) for b in batches) else tuple(
            ref for batch in batches for ref in batch.refs)
        return cls(
            path=batches[0].path,
            payloads=tuple(p for batch in batches for p in batch.payloads),
            invoice_ids=tuple(i for batch in batches for i in batch.invoice_ids),
            message_ids=tuple(m for batch in batches for m in batch.message_ids),
            created_at=min(batch.created_at for batch in batches),
            refs=refs,
        )

    def select(self, indexes: Iterable[int]) -> Batch:
        """The objects at ``indexes`` (0-based, in this order) as a batch of their own, with
        its own id (the rest of a refused batch, once the objects MS4 named are set aside)."""
        keep = list(indexes)
        return Batch(
            path=self.path,
            payloads=tuple(self.payloads[i] for i in keep),
            invoice_ids=tuple(self.invoice_ids[i] for i in keep),
            message_ids=tuple(self.message_ids[i] for i in keep),
            created_at=self.created_at,
            refs=tuple(self.refs[i] for i in keep) if len(self.refs) == len(self) else (),
        )

    def _slice(self, start: int, stop: int) -> Batch:
        return Batch(
            path=self.path,
            payloads=self.payloads[start:stop],
            invoice_ids=self.invoice_ids[start:stop],
            message_ids=self.message_ids[start:stop],
            created_at=self.created_at,
            refs=self.refs[start:stop],
        )

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r}, path={self.path!r}, size={len(self.payloads)})"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Something that will never reach MS4 as it is, with the reason why.

    ``stage`` says where it was stopped: ``processor`` (invalid e-mail),
    ``batching`` (too large for any batch), ``ms4`` (MS4 rejected it with 400;
    ``ms4_answer`` holds MS4's text), ``source`` (what the source read was no e-mail) or
    ``queue`` (a queue entry was no batch). ``payload`` is the MS4 object or, when it
    never became one, the raw e-mail (for ``source`` and ``queue``: what was read, raw).

    A store keeps at most ``[dead_letters] max_payload_bytes`` of a payload
    (:meth:`clipped`); a clipped letter says so: ``payload_size`` is then the original
    length, ``payload_sha256`` the SHA-256 (hex) of the whole original, and ``reason``
    ends with ``[payload clipped: ...]``. Both are None for a letter kept whole.
    """

    reason: str
    stage: str
    payload: bytes
    message_id: str | None = None
    invoice_id: str | None = None
    source_ref: str | None = None
    ms4_answer: str | None = None
    at: float = field(default_factory=time.time)
    id: str = ""
    payload_size: int | None = None
    payload_sha256: str | None = None
    #: set when a stored record was read back only in part (a field missing or
    #: unreadable: what was wrong); such a letter is shown as such and never replayed
    malformed: str | None = None

    def clipped(self, max_bytes: int) -> DeadLetter:
        """This letter with at most ``max_bytes`` of its payload (itself if it fits).

        The one place a dead letter is cut. The cut falls on a UTF-8 character boundary
        when the payload is text, so a clipped text stays text; clipping a clipped letter
        again keeps the first original's size and hash.
        """
        payload = self.payload
        if len(payload) <= max_bytes:
            return self
        cut = max_bytes
        # step back over UTF-8 continuation bytes (at most 3) so no character is split
        while cut > max_bytes - 3 and cut > 0 and payload[cut] & 0xC0 == 0x80:
            cut -= 1
        if self.payload_size is not None:  # already clipped: the original is described
            return replace(self, payload=payload[:cut])
        size = len(payload)
        digest = hashlib.sha256(payload).hexdigest()
        return replace(
            self, payload=payload[:cut], payload_size=size, payload_sha256=digest,
            reason=f"{self.reason} [payload clipped: first {cut} of {size} bytes kept, "
                   f"sha256 {digest}]")
