"""Tests of ms1.pipeline.processor: normalisation, rejection reasons, and never raising."""

from __future__ import annotations

import copy
import json
import pickle
import re
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms1.pipeline.currencies import ISO_4217
from ms1.pipeline.processor import (
    Accepted,
    InvalidInvoice,
    Rejected,
    normalise_invoice,
    unified_email_processor,
)

MESSAGE_ID = "<20251101.1234@mail.vendor-a.example>"
RAW: dict[str, Any] = {
    "invoice_id": "INV-2025-001",
    "vendor_name": "Vendor A",
    "invoice_date": "2025-11-01",
    "total_amount": 1500.00,
    "currency": "USD",
    "line_items": [{"description": "Item 1", "quantity": 2, "unit_price": 500.00}],
}
EMAIL: dict[str, Any] = {
    "message_id": MESSAGE_ID,
    "received_at": "2025-11-01T09:30:00Z",
    "sender": "billing@vendor-a.example",
    "subject": "Invoice INV-2025-001",
    "raw_json": RAW,
}
EXPECTED_PAYLOAD = (
    b'{"invoice_id":"INV-2025-001","vendor_name":"Vendor A","invoice_date":"2025-11-01",'
    b'"total_amount":1500.0,"currency":"USD","line_items":[{"description":"Item 1",'
    b'"quantity":2,"unit_price":500.0}]}'
)
KEYS = ["invoice_id", "vendor_name", "invoice_date", "total_amount", "currency", "line_items"]
ITEM_KEYS = ["description", "quantity", "unit_price"]
RAW_LIMIT = 64 * 1024
_MISSING = object()


def email_with(**changes: Any) -> dict[str, Any]:
    """EMAIL with raw_json fields replaced (a value of _MISSING deletes the key)."""
    raw = copy.deepcopy(RAW)
    for key, value in changes.items():
        if value is _MISSING:
            del raw[key]
        else:
            raw[key] = value
    return {**EMAIL, "raw_json": raw}


def reference_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def accepted(email: Any) -> Accepted:
    result = unified_email_processor(email)
    assert isinstance(result, Accepted), result
    return result


def rejected(email: Any) -> Rejected:
    result = unified_email_processor(email)
    assert isinstance(result, Rejected), result
    return result


def output(**changes: Any) -> dict[str, Any]:
    out = json.loads(accepted(email_with(**changes)).payload)
    assert isinstance(out, dict)
    return out


# ---------------------------------------------------------------------------------------
# The example, in every input form
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        pytest.param(EMAIL, id="mapping"),
        pytest.param(json.dumps(EMAIL), id="str"),
        pytest.param(json.dumps(EMAIL).encode(), id="bytes"),
        pytest.param(json.dumps(EMAIL, indent=2, ensure_ascii=False).encode(), id="pretty"),
        pytest.param(b"\xef\xbb\xbf" + json.dumps(EMAIL).encode(), id="utf8-bom"),
        pytest.param(bytearray(json.dumps(EMAIL).encode()), id="bytearray"),
        pytest.param({**EMAIL, "raw_json": json.dumps(RAW)}, id="raw_json-double-encoded"),
        pytest.param(json.dumps({**EMAIL, "raw_json": json.dumps(RAW)}), id="double-encoded-str"),
    ],
)
def test_example_round_trip_exact_bytes(email: Any) -> None:
    result = accepted(email)
    assert result.payload == EXPECTED_PAYLOAD
    assert result.invoice_id == "INV-2025-001"
    assert result.message_id == MESSAGE_ID


def test_example_payload_matches_reference_encoder() -> None:
    result = accepted(EMAIL)
    assert result.payload == reference_dumps(json.loads(result.payload))
    assert list(json.loads(result.payload)) == KEYS


def test_input_is_not_mutated() -> None:
    email = copy.deepcopy(EMAIL)
    email["raw_json"]["currency"] = " usd "
    before = copy.deepcopy(email)
    accepted(email)
    assert email == before


def test_accepted_and_rejected_are_frozen() -> None:
    result = accepted(EMAIL)
    with pytest.raises(AttributeError):
        result.payload = b""  # type: ignore[misc]
    bad = rejected("[]")
    with pytest.raises(AttributeError):
        bad.reason = ""  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,500.00", 1500.0),
        ("1500.5", 1500.5),
        ("-20", -20.0),
        ("+20", 20.0),
        (" 1500 ", 1500.0),
        ("1,234,567.891", 1234567.891),
        ("-1,000", -1000.0),
        ("0", 0.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("1000000000000000", 1e15),
    ],
)
def test_amount_strings(text: str, expected: float) -> None:
    out = output(total_amount=text)
    assert out["total_amount"] == expected
    assert type(out["total_amount"]) is float


@pytest.mark.parametrize(
    ("value", "expected_type"),
    [(1500, int), (1500.0, float), (0, int), (-3, int), (10**15, int), (-1e15, float)],
)
def test_json_numbers_keep_their_type(value: float, expected_type: type) -> None:
    out = output(total_amount=value)
    assert out["total_amount"] == value
    assert type(out["total_amount"]) is expected_type


def test_int_amount_stays_int_in_payload() -> None:
    payload = accepted(email_with(total_amount=1500)).payload
    assert b'"total_amount":1500,' in payload


@pytest.mark.parametrize(
    ("value", "expected"),
    [("usd", "USD"), (" eur ", "EUR"), ("Chf", "CHF"), ("XAU", "XAU"), ("xof", "XOF")],
)
def test_currency_normalised(value: str, expected: str) -> None:
    assert output(currency=value)["currency"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-11-01", "2025-11-01"),
        ("  2025-11-01  ", "2025-11-01"),
        ("2025-11-01T09:30:00Z", "2025-11-01"),
        ("2025-11-01T09:30:00+02:00", "2025-11-01"),
        ("2025-11-01T23:30:00-05:00", "2025-11-01"),  # date as written, no conversion
        ("2025-11-01T00:30:00+14:00", "2025-11-01"),
        ("2025-11-01 09:30", "2025-11-01"),
        ("2025-11-01T09:30:00.123456", "2025-11-01"),
        ("2024-02-29", "2024-02-29"),
    ],
)
def test_invoice_date_normalised(value: str, expected: str) -> None:
    assert output(invoice_date=value)["invoice_date"] == expected


def test_strings_are_stripped() -> None:
    out = output(
        invoice_id="  INV-1 \n",
        vendor_name="\tVendor A  ",
        line_items=[{"description": "  Item 1 ", "quantity": 1, "unit_price": 1}],
    )
    assert out["invoice_id"] == "INV-1"
    assert out["vendor_name"] == "Vendor A"
    assert out["line_items"][0]["description"] == "Item 1"


def test_message_id_is_stripped() -> None:
    assert accepted({**EMAIL, "message_id": "  <a@b>  "}).message_id == "<a@b>"


@pytest.mark.parametrize(("value", "expected"), [(12345, "12345"), (0, "0"), (-7, "-7")])
def test_int_invoice_id(value: int, expected: str) -> None:
    result = accepted(email_with(invoice_id=value))
    assert result.invoice_id == expected
    assert json.loads(result.payload)["invoice_id"] == expected


@pytest.mark.parametrize("value", [_MISSING, None, []])
def test_missing_or_empty_line_items(value: Any) -> None:
    out = output(line_items=value)
    assert out["line_items"] == []
    assert list(out) == KEYS


def test_line_items_normalised() -> None:
    out = output(
        line_items=[
            {"description": "", "quantity": "2", "unit_price": "1,000.50", "sku": "X"},
            {"unit_price": 3, "quantity": 1.5, "description": "b"},
        ]
    )
    assert out["line_items"] == [
        {"description": "", "quantity": 2.0, "unit_price": 1000.5},
        {"description": "b", "quantity": 1.5, "unit_price": 3},
    ]
    for item in out["line_items"]:
        assert list(item) == ITEM_KEYS


def test_extra_keys_dropped_and_order_fixed() -> None:
    raw = dict(reversed(list(RAW.items())))
    raw["notes"] = "drop me"
    raw["total_amount_cents"] = 150000
    result = accepted({**EMAIL, "raw_json": raw, "extra": [1, 2]})
    assert result.payload == EXPECTED_PAYLOAD


def test_max_sizes_accepted() -> None:
    out = output(
        invoice_id="i" * 256,
        vendor_name="v" * 512,
        line_items=[{"description": "d", "quantity": 1, "unit_price": 1}] * 1000,
    )
    assert len(out["line_items"]) == 1000


def test_non_ascii_text_is_kept_unescaped() -> None:
    result = accepted(email_with(vendor_name="Müller & Söhne — 株式会社 😀"))
    assert "Müller & Söhne — 株式会社 😀".encode() in result.payload


def test_special_characters_are_escaped_like_json_dumps() -> None:
    # control characters are rejected (the text-field rule); what is left to escape:
    vendor = 'a "quoted" \\ back/slash \u2028\u2029 </script> \ufeff'
    result = accepted(email_with(vendor_name=vendor))
    assert result.payload == reference_dumps(json.loads(result.payload))
    assert json.loads(result.payload)["vendor_name"] == vendor.strip()


def test_ignored_envelope_fields_are_not_validated() -> None:
    email = {"message_id": "m", "raw_json": RAW, "received_at": float("nan"), "sender": None}
    assert accepted(email).payload == EXPECTED_PAYLOAD
    assert accepted(json.dumps(email)).payload == EXPECTED_PAYLOAD  # NaN literal, ignored


# ---------------------------------------------------------------------------------------
# Rejections of raw_json fields
# ---------------------------------------------------------------------------------------

FIELD_REJECTIONS: list[Any] = [
    # invoice_id
    ("invoice_id", _MISSING, "raw_json.invoice_id", "missing"),
    ("invoice_id", None, "raw_json.invoice_id", "missing (null)"),
    ("invoice_id", "", "raw_json.invoice_id", "empty"),
    ("invoice_id", "   ", "raw_json.invoice_id", "empty"),
    ("invoice_id", "x" * 257, "raw_json.invoice_id", "too long (257 chars, max 256)"),
    ("invoice_id", 10**300, "raw_json.invoice_id", "too long"),
    ("invoice_id", 10**5000, "raw_json.invoice_id", "too long"),
    ("invoice_id", True, "raw_json.invoice_id", "got boolean: True"),
    ("invoice_id", 1.5, "raw_json.invoice_id", "got number: 1.5"),
    ("invoice_id", ["a"], "raw_json.invoice_id", "got array: ['a']"),
    ("invoice_id", "\ud800", "raw_json.invoice_id", "unpaired surrogate"),
    # vendor_name
    ("vendor_name", _MISSING, "raw_json.vendor_name", "missing"),
    ("vendor_name", "", "raw_json.vendor_name", "empty"),
    ("vendor_name", "v" * 513, "raw_json.vendor_name", "too long (513 chars, max 512)"),
    ("vendor_name", 5, "raw_json.vendor_name", "expected a string, got number: 5"),
    ("vendor_name", {"n": 1}, "raw_json.vendor_name", "got object"),
    # invoice_date
    ("invoice_date", "01/11/2025", "raw_json.invoice_date", "'01/11/2025'"),
    ("invoice_date", "2025-13-01", "raw_json.invoice_date", "month must be in 1..12"),
    ("invoice_date", "2025-02-30", "raw_json.invoice_date", "not a valid date"),
    ("invoice_date", "2025-11-01T25:00", "raw_json.invoice_date", "not a valid ISO 8601"),
    ("invoice_date", "2025-11-01Tjunk", "raw_json.invoice_date", "not a valid ISO 8601"),
    ("invoice_date", "2025-11-01T", "raw_json.invoice_date", "not an ISO 8601 date"),
    ("invoice_date", "2025-W44-6", "raw_json.invoice_date", "not an ISO 8601 date"),
    ("invoice_date", "20251101", "raw_json.invoice_date", "not an ISO 8601 date"),
    ("invoice_date", "2025-1-1", "raw_json.invoice_date", "not an ISO 8601 date"),
    ("invoice_date", "\uff12\uff10\uff12\uff15-11-01", "raw_json.invoice_date", "not a valid date"),
    ("invoice_date", "", "raw_json.invoice_date", "not an ISO 8601 date"),
    ("invoice_date", 20251101, "raw_json.invoice_date", "got number: 20251101"),
    ("invoice_date", None, "raw_json.invoice_date", "missing (null)"),
    # total_amount
    ("total_amount", "abc", "raw_json.total_amount", "not a number: 'abc'"),
    ("total_amount", "1,50,0", "raw_json.total_amount", "not a number: '1,50,0'"),
    ("total_amount", "1,5000", "raw_json.total_amount", "not a number"),
    ("total_amount", ",500", "raw_json.total_amount", "not a number"),
    ("total_amount", "1_000", "raw_json.total_amount", "not a number"),
    ("total_amount", "\u0661\u0662", "raw_json.total_amount", "not a number"),
    ("total_amount", "$1500", "raw_json.total_amount", "not a number"),
    ("total_amount", "", "raw_json.total_amount", "not a number: ''"),
    ("total_amount", "nan", "raw_json.total_amount", "not a number: 'nan'"),
    ("total_amount", "inf", "raw_json.total_amount", "not a number: 'inf'"),
    ("total_amount", "-Infinity", "raw_json.total_amount", "not a number"),
    ("total_amount", "1e400", "raw_json.total_amount", "not finite: '1e400'"),
    ("total_amount", "9" * 400, "raw_json.total_amount", "not finite"),
    ("total_amount", float("nan"), "raw_json.total_amount", "not finite: nan"),
    ("total_amount", float("inf"), "raw_json.total_amount", "not finite: inf"),
    ("total_amount", float("-inf"), "raw_json.total_amount", "not finite: -inf"),
    ("total_amount", 1e16, "raw_json.total_amount", "out of range"),
    ("total_amount", 10**15 + 1, "raw_json.total_amount", "out of range"),
    ("total_amount", -(10**5000), "raw_json.total_amount", "out of range"),
    ("total_amount", "2e15", "raw_json.total_amount", "out of range"),
    ("total_amount", True, "raw_json.total_amount", "expected a number, got boolean: True"),
    ("total_amount", None, "raw_json.total_amount", "missing (null)"),
    ("total_amount", _MISSING, "raw_json.total_amount", "missing"),
    ("total_amount", [1], "raw_json.total_amount", "got array"),
    # currency
    ("currency", "US$", "raw_json.currency", "not an ISO 4217 currency code: 'US$'"),
    ("currency", "EURO", "raw_json.currency", "not an ISO 4217 currency code: 'EURO'"),
    ("currency", "ABC", "raw_json.currency", "not an ISO 4217 currency code: 'ABC'"),
    ("currency", "XXX", "raw_json.currency", "not an ISO 4217"),
    ("currency", "XTS", "raw_json.currency", "not an ISO 4217"),
    ("currency", "DEM", "raw_json.currency", "not an ISO 4217"),
    ("currency", "", "raw_json.currency", "not an ISO 4217"),
    ("currency", 840, "raw_json.currency", "got number: 840"),
    ("currency", _MISSING, "raw_json.currency", "missing"),
    # line_items
    ("line_items", "Item 1", "raw_json.line_items", "expected an array, got string"),
    ("line_items", {"a": 1}, "raw_json.line_items", "expected an array, got object"),
    (
        "line_items",
        [{"description": "d", "quantity": 1, "unit_price": 1}] * 1001,
        "raw_json.line_items",
        "too many items (1001, max 1000)",
    ),
    ("line_items", [1], "raw_json.line_items[0]", "expected an object, got number: 1"),
    (
        "line_items",
        [{"quantity": 1, "unit_price": 1}],
        "raw_json.line_items[0].description",
        "missing",
    ),
    (
        "line_items",
        [{"description": 5, "quantity": 1, "unit_price": 1}],
        "raw_json.line_items[0].description",
        "expected a string, got number: 5",
    ),
    (
        "line_items",
        [{"description": "d", "unit_price": 1}],
        "raw_json.line_items[0].quantity",
        "missing",
    ),
    (
        "line_items",
        [{"description": "d", "quantity": 1, "unit_price": None}],
        "raw_json.line_items[0].unit_price",
        "missing (null)",
    ),
    (
        "line_items",
        [{"description": "d", "quantity": 1, "unit_price": 1}] * 3
        + [{"description": "d", "quantity": "two", "unit_price": 1}],
        "raw_json.line_items[3].quantity",
        "not a number: 'two'",
    ),
    (
        "line_items",
        [{"description": "d", "quantity": 1, "unit_price": 1}] * 2
        + [{"description": "d", "quantity": 1, "unit_price": float("nan")}],
        "raw_json.line_items[2].unit_price",
        "not finite: nan",
    ),
]


@pytest.mark.parametrize(
    ("key", "value", "path", "problem"),
    FIELD_REJECTIONS,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(FIELD_REJECTIONS)],
)
def test_field_rejection(key: str, value: Any, path: str, problem: str) -> None:
    email = email_with(**{key: value})
    result = rejected(email)
    assert result.reason.startswith(f"{path}: "), result.reason
    assert problem in result.reason, result.reason
    assert result.message_id == MESSAGE_ID
    assert len(result.reason) < 400
    # The same as text (NaN/Infinity literals where the value is a float).
    if not (isinstance(value, int) and abs(value) > 10**4000):
        again = rejected(json.dumps(email))
        assert again.reason == result.reason
        assert again.message_id == MESSAGE_ID
    # And through normalise_invoice directly.
    with pytest.raises(InvalidInvoice) as info:
        normalise_invoice(email["raw_json"])
    assert info.value.field == path
    assert str(info.value) == result.reason


def test_first_error_wins_in_field_order() -> None:
    result = rejected(email_with(currency="nope", total_amount="abc"))
    assert result.reason.startswith("raw_json.total_amount: ")


def test_long_values_are_truncated_in_reason() -> None:
    result = rejected(email_with(total_amount="9" * 10_000 + "x"))
    assert result.reason.startswith("raw_json.total_amount: not a number: '999")
    assert len(result.reason) < 120


# ---------------------------------------------------------------------------------------
# Rejections of the envelope and of raw_json as a whole
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_json", "problem"),
    [
        ("not json", "raw_json: not JSON: Expecting value"),
        ('{"invoice_id": ', "raw_json: not JSON: "),
        ("[1, 2]", "raw_json: JSON text does not hold an object (got array)"),
        ('"{}"', "raw_json: JSON text does not hold an object (got string)"),
        ("NaN", "raw_json: JSON text does not hold an object (got number)"),
        ("[" * 100_000, "raw_json: not JSON"),
        (5, "raw_json: expected an object or a JSON text holding one, got number: 5"),
        (None, "raw_json: expected an object or a JSON text holding one, got null"),
        ([RAW], "raw_json: expected an object or a JSON text holding one, got array"),
        (_MISSING, "raw_json: missing"),
    ],
)
def test_raw_json_rejection(raw_json: Any, problem: str) -> None:
    email = {**EMAIL, "raw_json": raw_json}
    if raw_json is _MISSING:
        del email["raw_json"]
    result = rejected(email)
    assert result.reason.startswith(problem), result.reason
    assert result.message_id == MESSAGE_ID


@pytest.mark.parametrize(
    ("message_id", "problem"),
    [
        (_MISSING, "message_id: missing"),
        (None, "message_id: missing (null)"),
        ("", "message_id: empty: ''"),
        ("  \t", "message_id: empty: '  \\t'"),
        (123, "message_id: expected a string, got number: 123"),
        (["<a@b>"], "message_id: expected a string, got array"),
        ("\udc80", "message_id: contains an unpaired surrogate"),
    ],
)
def test_message_id_rejection(message_id: Any, problem: str) -> None:
    email = dict(EMAIL)
    if message_id is _MISSING:
        del email["message_id"]
    else:
        email["message_id"] = message_id
    result = rejected(email)
    assert result.reason.startswith(problem), result.reason
    assert result.message_id is None


def test_message_id_is_checked_before_raw_json() -> None:
    result = rejected({"raw_json": "junk"})
    assert result.reason == "message_id: missing"
    assert result.message_id is None


@pytest.mark.parametrize(
    ("email", "problem"),
    [
        (b"\xff\xfe{}", "email: not UTF-8: invalid start byte at byte 0"),
        (b'{"message_id": "\xe9"}', "email: not UTF-8: "),
        (b"", "email: not valid JSON: Expecting value"),
        ("", "email: not valid JSON: Expecting value"),
        ("{", "email: not valid JSON: "),
        ('{"a": 1} trailing', "email: not valid JSON: Extra data"),
        ("[" * 100_000, "email: not valid JSON: "),
        ('{"message_id": "m", "raw_json": ' + "[" * 100_000 + "]" * 100_000 + "}", "email: "),
        ('{"message_id": "m", "x": ' + "1" * 5000 + "}", "email: not valid JSON: "),
        ("[]", "email: not a JSON object (got array)"),
        ("null", "email: not a JSON object (got null)"),
        ("123", "email: not a JSON object (got number)"),
        ('"{}"', "email: not a JSON object (got string)"),
        ("NaN", "email: not a JSON object (got number)"),
        (None, "email: expected bytes, text or a mapping, got NoneType"),
        (12, "email: expected bytes, text or a mapping, got int"),
        ([EMAIL], "email: expected bytes, text or a mapping, got list"),
    ],
)
def test_email_rejection(email: Any, problem: str) -> None:
    result = rejected(email)
    assert result.reason.startswith(problem), result.reason
    assert result.message_id is None


def test_nan_literal_in_amount_is_rejected_with_message_id() -> None:
    text = json.dumps(email_with(total_amount=float("nan")))
    assert "NaN" in text
    result = rejected(text)
    assert result.reason == "raw_json.total_amount: not finite: nan"
    assert result.message_id == MESSAGE_ID
    assert result.raw == text


def test_huge_integer_amount_is_rejected() -> None:
    result = rejected(email_with(total_amount=10**5000))
    assert result.reason.startswith("raw_json.total_amount: out of range")
    assert result.message_id == MESSAGE_ID


# ---------------------------------------------------------------------------------------
# Rejected.raw
# ---------------------------------------------------------------------------------------


def test_raw_is_the_original_text() -> None:
    text = json.dumps(email_with(currency="EURO"))
    assert rejected(text).raw == text
    assert rejected(text.encode()).raw == text


def test_raw_of_a_mapping_is_json() -> None:
    email = email_with(currency="EURO")
    assert json.loads(rejected(email).raw) == email


def test_raw_of_undecodable_bytes_keeps_the_bad_bytes_visible() -> None:
    result = rejected(b'{"a": "\xff"}')
    assert result.raw == '{"a": "\\xff"}'


def test_raw_of_unencodable_mappings_does_not_fail() -> None:
    loop: dict[str, Any] = {"message_id": "m"}
    loop["raw_json"] = loop
    result = rejected(loop)
    assert result.message_id == "m"
    assert result.reason.startswith("raw_json.invoice_id: missing")
    assert result.raw.startswith("{")
    huge = rejected({"message_id": "m", "raw_json": {"x": 10**5000}})
    assert "integer of" in huge.raw


@pytest.mark.parametrize(
    "email",
    [
        "x" * (RAW_LIMIT * 3),
        "é" * RAW_LIMIT,
        "😀" * RAW_LIMIT,
        b"\xff" * RAW_LIMIT,
        ("é" * (RAW_LIMIT // 2)).encode() + b"x",
        "\ud800" * 10,
        {"message_id": "m", "raw_json": {"vendor_name": "v" * RAW_LIMIT * 2}},
    ],
)
def test_raw_is_valid_utf8_and_at_most_64_kib(email: Any) -> None:
    raw = rejected(email).raw
    data = raw.encode("utf-8")  # no unpaired surrogate left
    assert 0 < len(data) <= RAW_LIMIT


# ---------------------------------------------------------------------------------------
# normalise_invoice and InvalidInvoice
# ---------------------------------------------------------------------------------------


def test_normalise_invoice_returns_plain_ordered_dict() -> None:
    out = normalise_invoice(copy.deepcopy(RAW))
    assert list(out) == KEYS
    assert out == {**RAW, "total_amount": 1500.0}
    assert normalise_invoice(json.dumps(RAW)) == out


def test_invalid_invoice_error() -> None:
    with pytest.raises(InvalidInvoice) as info:
        normalise_invoice({**RAW, "currency": "usd$"})
    error = info.value
    assert isinstance(error, ValueError)
    assert error.field == "raw_json.currency"
    assert error.problem == "not an ISO 4217 currency code: 'usd$'"
    assert str(error) == f"{error.field}: {error.problem}"
    copied = pickle.loads(pickle.dumps(error))
    assert (copied.field, copied.problem, str(copied)) == (error.field, error.problem, str(error))


# ---------------------------------------------------------------------------------------
# ISO 4217
# ---------------------------------------------------------------------------------------


def test_currency_list() -> None:
    assert 170 <= len(ISO_4217) <= 185
    assert all(re.fullmatch("[A-Z]{3}", code) for code in ISO_4217)
    current = "USD EUR GBP JPY CHF CNY INR BRL ZAR CAD AUD SEK NOK PLN MXN KRW XAU XAG XDR"
    current += " XOF XAF XPF XCD SLE VES VED ZWG XCG BOV CLF USN"
    for code in current.split(" "):
        assert code in ISO_4217, code
    historic_or_reserved = "XXX XTS DEM FRF ITL ESP HRK ZWL SLL VEF MRO STD BYR LTL EEK USS"
    for code in historic_or_reserved.split(" "):
        assert code not in ISO_4217, code


@pytest.mark.parametrize("code", sorted(ISO_4217))
def test_every_code_is_accepted_in_any_case(code: str) -> None:
    assert output(currency=f" {code.lower()} ")["currency"] == code


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

# Modest example counts keep the whole file at a few seconds; no example database, so a
# test run leaves no files behind.
FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)  # huge, still printable
    | st.floats()
    | st.text()
)
json_like = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
junk_values = json_like | st.sampled_from(
    ["2025-11-01", "1,500.00", "usd", "NaN", "1e400", "  ", "[]", "{}", "2025-11-01T09:30Z"]
)
junk_item = st.fixed_dictionaries(
    {},
    optional={"description": junk_values, "quantity": junk_values, "unit_price": junk_values},
)
junk_raw = st.fixed_dictionaries(
    {},
    optional={
        "invoice_id": junk_values,
        "vendor_name": junk_values,
        "invoice_date": junk_values,
        "total_amount": junk_values,
        "currency": junk_values,
        "line_items": junk_values | st.lists(junk_item | junk_values, max_size=4),
    },
)


def check_result(result: object) -> None:
    assert isinstance(result, Accepted | Rejected)
    if isinstance(result, Accepted):
        out = json.loads(result.payload, parse_constant=pytest.fail)
        assert list(out) == KEYS
        assert result.payload == reference_dumps(out)
    else:
        # a field path; a duplicate key may be any key of the e-mail, quoted when not a name
        assert re.match(r'(?:[A-Za-z_]\w*|\[".*?"\])(?:\.\w+|\[\d+\]|\[".*?"\])*: ',
                        result.reason), result.reason
        assert len(result.raw.encode("utf-8")) <= RAW_LIMIT
        result.reason.encode("utf-8")  # reasons are always valid text


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    check_result(unified_email_processor(data))


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    check_result(unified_email_processor(text))


@FAST
@given(json_like)
def test_arbitrary_values_as_email_never_raise(value: Any) -> None:
    check_result(unified_email_processor(value))
    try:
        text = json.dumps(value)
    except ValueError:  # integer too long to write
        return
    check_result(unified_email_processor(text))
    check_result(unified_email_processor(text.encode("utf-8", "surrogatepass")))


@FAST
@given(json_like | junk_raw)
def test_arbitrary_raw_json_never_raises(raw_json: Any) -> None:
    for email in (
        {"message_id": MESSAGE_ID, "raw_json": raw_json},
        {"message_id": MESSAGE_ID, "raw_json": json.dumps(raw_json, default=str)},
    ):
        result = unified_email_processor(email)
        check_result(result)
        assert result.message_id == MESSAGE_ID
        if isinstance(result, Rejected):
            assert result.reason.startswith("raw_json")


@FAST
@given(junk_raw)
def test_arbitrary_raw_json_fields_as_text_never_raise(raw_json: dict[str, Any]) -> None:
    try:
        text = json.dumps({"message_id": "m", "raw_json": raw_json})
    except ValueError:
        return
    result = unified_email_processor(text.encode())
    check_result(result)
    assert result.message_id == "m"


@FAST
@given(st.text(alphabet="0123456789-+WT:Z \u0660\u0661\uff12", min_size=8, max_size=12))
def test_accepted_dates_are_always_yyyy_mm_dd(text: str) -> None:
    try:
        out = normalise_invoice({**RAW, "invoice_date": text})
    except InvalidInvoice as exc:
        assert exc.field == "raw_json.invoice_date"
    else:
        assert re.fullmatch("[0-9]{4}-[0-9]{2}-[0-9]{2}", out["invoice_date"])
        assert text.strip().startswith(out["invoice_date"])


# Valid invoices ------------------------------------------------------------------------

spaces = st.sampled_from(["", " ", "  ", "\t", "\n "])


def padded(core: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(spaces, core, spaces).map("".join)


# The text-field rule: no C0/C1 control, DEL, bidi control or surrogate inside a text.
FORBIDDEN_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
allowed_text = st.text(
    st.characters(codec="utf-8").filter(lambda c: FORBIDDEN_CHAR.match(c) is None)
)


def clean_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(codec="utf-8").filter(lambda c: FORBIDDEN_CHAR.match(c) is None),
        min_size=1, max_size=max_size,
    ).filter(lambda s: s == s.strip() and s != "")


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@st.composite
def invoice_dates(draw: st.DrawFn) -> tuple[str, str]:
    """(as written, expected "YYYY-MM-DD")."""
    if draw(st.booleans()):
        day = draw(st.dates())
        return day.isoformat(), day.isoformat()
    moment = draw(st.datetimes(timezones=st.none() | st.just(UTC) | offsets))
    text = moment.isoformat(sep=draw(st.sampled_from(["T", " "])))
    if text.endswith("+00:00") and draw(st.booleans()):
        text = text[:-6] + "Z"
    return text, moment.date().isoformat()


amounts = (
    st.integers(min_value=-(10**15), max_value=10**15)
    | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
    | st.integers(min_value=-(10**12), max_value=10**12).map(str)
    | st.floats(min_value=-1e12, max_value=1e12).map(lambda x: f"{x:,.2f}")
    | st.floats(min_value=-1e12, max_value=1e12).map(lambda x: f"{x:.4f}")
)

valid_items = st.fixed_dictionaries(
    {"description": padded(allowed_text.filter(lambda s: len(s) <= 30)), "quantity": amounts,
     "unit_price": amounts},
    optional={"sku": st.text(max_size=5)},
)


currency_spellings = st.sampled_from(sorted(ISO_4217)).flatmap(
    lambda code: st.sampled_from([code, code.lower(), code.title()])
)


@st.composite
def valid_invoices(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "invoice_id": draw(padded(clean_text(256)) | st.integers(-(10**30), 10**30)),
        "vendor_name": draw(padded(clean_text(512))),
        "invoice_date": draw(invoice_dates())[0],
        "total_amount": draw(amounts),
        "currency": draw(padded(currency_spellings)),
    }
    choice = draw(st.integers(0, 2))
    if choice == 1:
        raw["line_items"] = None
    elif choice == 2:
        raw["line_items"] = draw(st.lists(valid_items, max_size=5))
    if draw(st.booleans()):
        raw["unexpected"] = draw(json_like)
    return raw


@FAST
@given(valid_invoices(), st.sampled_from(["mapping", "text", "bytes", "double"]))
def test_valid_invoices_are_accepted_and_idempotent(raw: dict[str, Any], form: str) -> None:
    email: Any = {"message_id": " m-1 ", "raw_json": raw}
    if form == "double":
        email["raw_json"] = json.dumps(raw, ensure_ascii=False)
    elif form in ("text", "bytes"):
        email = json.dumps(email, ensure_ascii=form == "bytes")
        if form == "bytes":
            email = email.encode()
    result = unified_email_processor(email)
    assert isinstance(result, Accepted), result
    assert result.message_id == "m-1"

    out = json.loads(result.payload, parse_constant=pytest.fail)
    assert list(out) == KEYS
    assert result.payload == reference_dumps(out)
    assert out["invoice_id"] == result.invoice_id
    expected_id = raw["invoice_id"]
    assert result.invoice_id == (
        str(expected_id) if isinstance(expected_id, int) else expected_id.strip()
    )
    assert out["vendor_name"] == raw["vendor_name"].strip()
    assert out["currency"] == raw["currency"].strip().upper()
    assert re.fullmatch("[0-9]{4}-[0-9]{2}-[0-9]{2}", out["invoice_date"])
    assert raw["invoice_date"].strip().startswith(out["invoice_date"])
    assert len(out["line_items"]) == len(raw.get("line_items") or [])
    for item in out["line_items"]:
        assert list(item) == ITEM_KEYS

    # Idempotent: the output fed back as raw_json gives the same bytes.
    again = unified_email_processor({"message_id": "m-1", "raw_json": out})
    assert isinstance(again, Accepted), again
    assert again.payload == result.payload
    again_text = unified_email_processor(
        {"message_id": "m-1", "raw_json": result.payload.decode()}
    )
    assert isinstance(again_text, Accepted)
    assert again_text.payload == result.payload


@FAST
@given(st.sampled_from(["invoice_id", "vendor_name", "currency", "description", "message_id"]),
       allowed_text, st.text(min_size=1), allowed_text)
def test_a_text_field_is_accepted_exactly_when_it_has_no_forbidden_character(
        field: str, head: str, middle: str, tail: str) -> None:
    value = f"x{head}{middle}{tail}x" if field != "currency" else middle
    raw = copy.deepcopy(RAW)
    email: dict[str, Any] = {"message_id": "m", "raw_json": raw}
    if field == "description":
        raw["line_items"][0]["description"] = value
    elif field == "message_id":
        email["message_id"] = value
    else:
        raw[field] = value
    result = unified_email_processor(email)
    found = FORBIDDEN_CHAR.search(value.strip())
    if found is not None:
        assert isinstance(result, Rejected)
        assert f"U+{ord(found.group()):04X}" in result.reason, result.reason
    elif field != "currency" and len(value.strip()) <= 256:
        assert isinstance(result, Accepted), result


@FAST
@given(invoice_dates())
def test_dates_keep_the_written_day(case: tuple[str, str]) -> None:
    written, expected = case
    assert normalise_invoice({**RAW, "invoice_date": written})["invoice_date"] == expected
