"""Turn one inbound e-mail record into the MS4 invoice object, or a precise rejection.

More: docs/internals.md, ``ms1.pipeline.processor``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

from ms1.model import DEFAULT_MAX_PAYLOAD_BYTES
from ms1.pipeline.currencies import ISO_4217

__all__ = [
    "Accepted",
    "InvalidInvoice",
    "Rejected",
    "normalise_invoice",
    "unified_email_processor",
]

# ---------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------

_MAX_INVOICE_ID_CHARS: Final = 256
_MAX_VENDOR_NAME_CHARS: Final = 512
_MAX_LINE_ITEMS: Final = 1000
_MAX_MAGNITUDE: Final = 1e15
_MAX_INT_MAGNITUDE: Final = 10**15
# Rejected.raw is a readable copy for callers, bounded like a dead letter's payload by
# default (the dead letter itself keeps the original bytes, cut by its store to
# [dead_letters] max_payload_bytes).
_RAW_LIMIT_BYTES: Final = DEFAULT_MAX_PAYLOAD_BYTES
_REPR_CHARS: Final = 60

# A number written as text: with well-formed thousands separators ("1,500.00",
# "-1,234,567"), or plain ("1500.5", "-20", ".5", "1e3"). ASCII digits only: float()
# alone would also take "1_000", "١٢", "nan" or "infinity".
_NUMBER_TEXT = re.compile(
    r"[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?"
    r"|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
)
# A date-time: "YYYY-MM-DD", then "T" or " " and a time part.
_DATE_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[T ].+", re.DOTALL)

# What a text field must not contain once trimmed (see the module doc).
_FORBIDDEN_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)

# The C implementation behind json.dumps(..., ensure_ascii=False) for strings.
_json_string: Final = json.encoder.encode_basestring

_MAPPING: Final = (dict, Mapping)
_ARRAY: Final = (list, tuple)
_BYTES: Final = (bytes, bytearray, memoryview)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()
log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid invoice: ``payload`` is the MS4 object as compact UTF-8 JSON."""

    payload: bytes
    invoice_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """An e-mail that cannot be forwarded; ``reason`` starts with the field path."""

    reason: str
    message_id: str | None
    raw: str
    #: True when the reason is an internal error of the processor (a bug), not the input
    internal_error: bool = False


class InvalidInvoice(ValueError):
    """``raw_json`` cannot be made valid; ``str()`` is ``"<field>: <problem>"``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[InvalidInvoice], tuple[str, str]]:
        return (type(self), (self.field, self.problem))


def unified_email_processor(
    email: bytes | str | Mapping[str, Any], ref: str | None = None
) -> Accepted | Rejected:
    """Validate and normalise one e-mail record. Never raises.

    ``ref`` (where the e-mail came from: a stream entry id, ``file:line``) only names it
    in the log line of an internal error.
    """
    try:
        return _process(email, ref)
    except Exception as exc:  # last line of defence: this function must never raise
        return _internal_error(exc, None, email, ref)


def normalise_invoice(raw_json: Any) -> dict[str, Any]:
    """Return the MS4 object for ``raw_json`` (a mapping or a JSON text holding an object).

    The result has exactly the keys ``invoice_id``, ``vendor_name``, ``invoice_date``,
    ``total_amount``, ``currency`` and ``line_items``, in that order; each line item has
    exactly ``description``, ``quantity`` and ``unit_price``. Strings are plain ``str``
    free of unpaired surrogates, numbers plain ``int`` or finite ``float``.
    Raises :class:`InvalidInvoice` naming the first field that cannot be made valid.
    """
    if isinstance(raw_json, str):
        try:
            raw_json = _DECODER.decode(raw_json)
        except _DuplicateKey:
            path, key = _duplicate(raw_json, "raw_json")
            raise InvalidInvoice(path, _duplicate_problem(key)) from None
        except RecursionError:
            raise InvalidInvoice("raw_json", "not JSON: nested too deeply") from None
        except ValueError as exc:
            raise InvalidInvoice("raw_json", f"not JSON: {_clip(str(exc))}") from None
        if not isinstance(raw_json, _MAPPING):
            raise InvalidInvoice(
                "raw_json", f"JSON text does not hold an object (got {_kind(raw_json)})"
            )
    elif not isinstance(raw_json, _MAPPING):
        raise InvalidInvoice(
            "raw_json",
            f"expected an object or a JSON text holding one, got {_describe(raw_json)}",
        )
    return _normalise_mapping(raw_json)


# ---------------------------------------------------------------------------------------
# The e-mail envelope
# ---------------------------------------------------------------------------------------


def _process(email: Any, ref: str | None) -> Accepted | Rejected:
    if isinstance(email, str):
        text = email
    elif isinstance(email, _BYTES):
        try:
            text = str(email, "utf-8")
        except UnicodeDecodeError as exc:
            return _reject(f"email: not UTF-8: {exc.reason} at byte {exc.start}", None, email)
    elif isinstance(email, _MAPPING):
        return _process_object(email, email, ref)
    else:
        return _reject(
            f"email: expected bytes, text or a mapping, got {type(email).__name__}",
            None,
            email,
        )
    # A leading byte-order mark is harmless; json.loads refuses it.
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        obj = _DECODER.decode(text)
    except _DuplicateKey:
        path, key = _duplicate(text, "")
        return _reject(f"{path}: {_duplicate_problem(key)}", _peek_message_id(text), text)
    except RecursionError:
        return _reject("email: not valid JSON: nested too deeply", None, text)
    except ValueError as exc:  # JSONDecodeError, or an integer literal with too many digits
        return _reject(f"email: not valid JSON: {_clip(str(exc))}", None, text)
    if not isinstance(obj, dict):
        return _reject(f"email: not a JSON object (got {_kind(obj)})", None, text)
    return _process_object(obj, text, ref)


def _process_object(obj: Mapping[str, Any], original: Any, ref: str | None
                    ) -> Accepted | Rejected:
    value = obj.get("message_id", _MISSING)
    try:
        message_id = _text(value, None, False)
    except _Bad as exc:
        return _reject(f"message_id: {exc}", None, original)

    raw_json = obj.get("raw_json", _MISSING)
    if raw_json is _MISSING:
        return _reject("raw_json: missing", message_id, original)
    try:
        invoice = normalise_invoice(raw_json)
        payload = _encode_payload(invoice)
    except InvalidInvoice as exc:
        return _reject(str(exc), message_id, original)
    except Exception as exc:  # a bug: reported with the message id
        return _internal_error(exc, message_id, original, ref)
    return Accepted(payload=payload, invoice_id=invoice["invoice_id"], message_id=message_id)


def _internal_error(exc: Exception, message_id: str | None, original: Any,
                    ref: str | None) -> Rejected:
    """An unexpected exception (a bug): logged with its traceback, and a rejection saying
    so. Must be called from the ``except`` block (``log.exception``)."""
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    detail = _clip(text.encode("utf-8", "replace").decode("utf-8"))
    log.exception("internal error in the processor on e-mail %s (message_id %s): %s: %s",
                  ref or "?", message_id or "unknown", type(exc).__name__, detail)
    return Rejected(
        reason=f"email: internal error in the processor (a bug in ms1, the e-mail may be "
               f"valid): {type(exc).__name__}: {detail}",
        message_id=message_id,
        raw=_raw_text(original),
        internal_error=True,
    )


def _encode_payload(invoice: Mapping[str, Any]) -> bytes:
    """The compact JSON of a :func:`normalise_invoice` result, as UTF-8 bytes.

    Byte-identical to ``json.dumps(invoice, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False).encode("utf-8")`` for such a result (plain ``str``, ``int`` and
    finite ``float`` values, strings free of unpaired surrogates), about three times as
    fast: the general encoder dominated the cost of processing an e-mail.
    """
    items = ",".join(
        [
            f'{{"description":{_json_string(item["description"])},'
            f'"quantity":{item["quantity"]!r},"unit_price":{item["unit_price"]!r}}}'
            for item in invoice["line_items"]
        ]
    )
    return (
        f'{{"invoice_id":{_json_string(invoice["invoice_id"])},'
        f'"vendor_name":{_json_string(invoice["vendor_name"])},'
        f'"invoice_date":"{invoice["invoice_date"]}",'
        f'"total_amount":{invoice["total_amount"]!r},'
        f'"currency":"{invoice["currency"]}",'
        f'"line_items":[{items}]}}'
    ).encode()


def _reject(reason: str, message_id: str | None, original: Any) -> Rejected:
    return Rejected(reason=reason, message_id=message_id, raw=_raw_text(original))


# ---------------------------------------------------------------------------------------
# JSON with duplicate keys refused
# ---------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    """Internal: a JSON object names a key twice (the path is found afterwards)."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


class _Duplicated(dict[str, Any]):
    """Internal: an object that named ``key`` twice (only while looking for the path)."""

    key: str = ""


def _mark_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Duplicated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.key = key
            break
        seen.add(key)
    return marked


# json.loads() builds a decoder per call when given a hook: build them once.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_refuse_duplicates)
_MARKING_DECODER: Final = json.JSONDecoder(object_pairs_hook=_mark_duplicates)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _step(path: str, key: str) -> str:
    if _NAME.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_json_string(key)}]"


def _duplicate(text: str, root: str) -> tuple[str, str]:
    """(path, key) of the first duplicated key in ``text``, which has one; ``root`` is the
    path of ``text`` itself ("" for the e-mail)."""
    stack: list[tuple[str, Any]] = [(root, _MARKING_DECODER.decode(text))]
    while stack:  # depth first, in document order; no recursion
        path, value = stack.pop()
        if isinstance(value, _Duplicated):
            return _step(path, value.key), value.key
        if isinstance(value, dict):
            stack.extend((_step(path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return root or "email", "?"  # not reached: the first parse found a duplicate


def _duplicate_problem(key: str) -> str:
    return (f"duplicate key: the JSON names {_short(key)} more than once (ms1 does not "
            f"pick one)")


def _peek_message_id(text: str) -> str | None:
    """The e-mail's valid message id, if it has one, for a rejection found before it."""
    try:
        obj = _MARKING_DECODER.decode(text)
        if isinstance(obj, _Duplicated) and obj.key == "message_id":
            return None
        return _text(obj.get("message_id", _MISSING), None, False)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------
# raw_json
# ---------------------------------------------------------------------------------------


class _Bad(Exception):
    """Internal: a value cannot be made valid; the caller adds the field path."""


def _normalise_mapping(raw: Mapping[str, Any]) -> dict[str, Any]:
    get = raw.get
    field = "raw_json.invoice_id"
    index = -1
    sub = ""
    try:
        invoice_id = _invoice_id(get("invoice_id", _MISSING))
        field = "raw_json.vendor_name"
        vendor_name = _text(get("vendor_name", _MISSING), _MAX_VENDOR_NAME_CHARS, False)
        field = "raw_json.invoice_date"
        invoice_date = _date(get("invoice_date", _MISSING))
        field = "raw_json.total_amount"
        total_amount = _number(get("total_amount", _MISSING))
        field = "raw_json.currency"
        currency = _currency(get("currency", _MISSING))
        field = "raw_json.line_items"
        items = get("line_items")
        line_items: list[dict[str, Any]] = []
        if items is not None:
            if not isinstance(items, _ARRAY):
                raise _Bad(f"expected an array, got {_describe(items)}")
            if len(items) > _MAX_LINE_ITEMS:
                raise _Bad(f"too many items ({len(items)}, max {_MAX_LINE_ITEMS})")
            append = line_items.append
            for index, item in enumerate(items):  # noqa: B007 - index is read on error
                if not isinstance(item, _MAPPING):
                    sub = ""
                    raise _Bad(f"expected an object, got {_describe(item)}")
                sub = "description"
                description = _text(item.get("description", _MISSING), None, True)
                sub = "quantity"
                quantity = _number(item.get("quantity", _MISSING))
                sub = "unit_price"
                unit_price = _number(item.get("unit_price", _MISSING))
                append(
                    {"description": description, "quantity": quantity, "unit_price": unit_price}
                )
    except _Bad as exc:
        if index >= 0:
            field = f"raw_json.line_items[{index}]" + (f".{sub}" if sub else "")
        raise InvalidInvoice(field, str(exc)) from None
    return {
        "invoice_id": invoice_id,
        "vendor_name": vendor_name,
        "invoice_date": invoice_date,
        "total_amount": total_amount,
        "currency": currency,
        "line_items": line_items,
    }


def _absent(value: Any) -> str | None:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "missing (null)"
    return None


def _text(value: Any, max_chars: int | None, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise _Bad(_absent(value) or f"expected a string, got {_describe(value)}")
    text = value.strip()
    if not text and not allow_empty:
        raise _Bad(f"empty: {_short(value)}")
    if max_chars is not None and len(text) > max_chars:
        raise _Bad(f"too long ({len(text)} chars, max {max_chars}): {_short(text)}")
    _check_text(text)
    return text  # str.strip() returns a plain str even for a str subclass


def _check_text(text: str) -> None:
    """The text-field rule (module doc): no control, bidi control or unpaired surrogate
    in a trimmed text."""
    if text.isprintable():  # fast path: every character the rule forbids is unprintable
        return
    found = _FORBIDDEN_CHAR.search(text)
    if found is None:
        return
    point = ord(found.group())
    if 0xD800 <= point <= 0xDFFF:
        kind = "an unpaired surrogate"
    elif point >= 0x200E:
        kind = "a bidi control character"
    else:
        kind = "a control character"
    raise _Bad(f"contains {kind} U+{point:04X} at character {found.start()}: {_short(text)}")


def _invoice_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        # 900 bits is over 270 digits: too long anyway. str() of a huge int may even
        # raise (sys.int_info.default_max_str_digits), so do not try it.
        if value.bit_length() > 900:
            raise _Bad(f"too long (an integer of more than {_MAX_INVOICE_ID_CHARS} digits)")
        text = str(int(value))
        if len(text) > _MAX_INVOICE_ID_CHARS:
            raise _Bad(f"too long ({len(text)} digits, max {_MAX_INVOICE_ID_CHARS})")
        return text
    if isinstance(value, str):
        return _text(value, _MAX_INVOICE_ID_CHARS, False)
    raise _Bad(_absent(value) or f"expected a string or an integer, got {_describe(value)}")


def _date(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(
            _absent(value) or f"expected a date string (YYYY-MM-DD), got {_describe(value)}"
        )
    text = value.strip()
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        # date.fromisoformat() takes ASCII digits only, and with "-" at [4] and [7]
        # only the form YYYY-MM-DD (not the week date "2025-W44-6").
        try:
            date.fromisoformat(text)
        except ValueError as exc:
            raise _Bad(f"not a valid date ({exc}): {_short(value)}") from None
        return text
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        raise _Bad(f"not an ISO 8601 date (YYYY-MM-DD[THH:MM...]): {_short(value)}")
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise _Bad(f"not a valid ISO 8601 date-time: {_short(value)}") from None
    return match.group(1)


def _number(value: Any) -> int | float:
    kind = type(value)
    if kind is float or (kind is not int and isinstance(value, float)):
        if -_MAX_MAGNITUDE <= value <= _MAX_MAGNITUDE:  # False for NaN and +-inf
            return value if kind is float else float(value)
        if math.isfinite(value):
            raise _Bad(f"out of range (magnitude above 1e15): {_short(value)}")
        raise _Bad(f"not finite: {_short(value)}")
    if kind is int or (isinstance(value, int) and not isinstance(value, bool)):
        if -_MAX_INT_MAGNITUDE <= value <= _MAX_INT_MAGNITUDE:
            return value if kind is int else int(value)
        raise _Bad(f"out of range (magnitude above 1e15): {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_TEXT.fullmatch(text) is None:
            raise _Bad(f"not a number: {_short(value)}")
        number = float(text.replace(",", "") if "," in text else text)
        if -_MAX_MAGNITUDE <= number <= _MAX_MAGNITUDE:
            return number
        if math.isfinite(number):
            raise _Bad(f"out of range (magnitude above 1e15): {_short(value)}")
        raise _Bad(f"not finite: {_short(value)}")
    raise _Bad(_absent(value) or f"expected a number, got {_describe(value)}")


def _currency(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(_absent(value) or f"expected a currency code string, got {_describe(value)}")
    code = value.strip()
    _check_text(code)
    if len(code) == 3:
        code = code.upper()
        if code in ISO_4217:
            return code
    raise _Bad(f"not an ISO 4217 currency code: {_short(value)}")


# ---------------------------------------------------------------------------------------
# Describing values in reasons, and the raw text of a rejected input
# ---------------------------------------------------------------------------------------


class _SafeRepr(reprlib.Repr):
    """reprlib with bounded output that also copes with huge integers."""

    def __init__(self, level: int, items: int, chars: int) -> None:
        super().__init__()
        self.maxlevel = level
        self.maxstring = self.maxother = chars
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = items
        self.maxdeque = self.maxarray = self.maxdict = items

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int with more than 4300 digits raises ValueError.
        if x.bit_length() > 128:
            return f"<integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR: Final = _SafeRepr(level=3, items=6, chars=_REPR_CHARS)
# For the raw text of a mapping json.dumps() cannot encode; cut to 64 KiB afterwards.
_RAW_REPR: Final = _SafeRepr(level=50, items=2000, chars=_RAW_LIMIT_BYTES)


def _short(value: Any) -> str:
    """repr() of ``value``, at most about 60 characters; never raises."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    if len(text) > _REPR_CHARS:
        text = text[: _REPR_CHARS - 3] + "..."
    return text


def _kind(value: Any) -> str:
    """The JSON name of ``value``'s type (Python's for anything else)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, _ARRAY):
        return "array"
    if isinstance(value, _MAPPING):
        return "object"
    return type(value).__name__


def _describe(value: Any) -> str:
    return f"{_kind(value)}: {_short(value)}"


def _clip(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_default(value: Any) -> str:
    return _short(value)


def _raw_text(original: Any) -> str:
    """The input as text for the dead-letter record: valid UTF-8, at most 64 KiB."""
    try:
        if isinstance(original, str):
            text = original
        elif isinstance(original, _BYTES):
            # Never decode more than needed: each byte becomes at most 4 characters.
            text = str(bytes(original[: _RAW_LIMIT_BYTES + 4]), "utf-8", "backslashreplace")
        else:
            try:
                text = json.dumps(original, ensure_ascii=False, default=_json_default)
            except Exception:  # circular, non-string keys, huge integer, too deep, ...
                text = _RAW_REPR.repr(original)
        if text.isascii():
            return text[:_RAW_LIMIT_BYTES]
        # "replace" turns an unpaired surrogate into "?", so the result is valid UTF-8.
        data = text[: _RAW_LIMIT_BYTES + 1].encode("utf-8", "replace")
        if len(data) <= _RAW_LIMIT_BYTES:
            return text if _utf8_encodable(text) else data.decode("utf-8")
        # Cut at the byte limit; "ignore" drops a character split by the cut.
        return data[:_RAW_LIMIT_BYTES].decode("utf-8", "ignore")
    except Exception:
        return f"<unrepresentable {type(original).__name__}>"
