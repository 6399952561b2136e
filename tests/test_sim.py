"""Tests for ms1.sim (ms4-sim): a contract-faithful MS4 on loopback."""

from __future__ import annotations

import email.utils
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ms1_tools.sim import REJECT_EVERY_REASON, Ms4Sim, SimConfig, main, validate_metadata

KEY = "sim-key"
HEADERS = {"X-API-Key": KEY}
ROOT = Path(__file__).resolve().parents[1]


def obj(invoice_id: str = "INV-1", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "invoice_id": invoice_id,
        "vendor_name": "ACME GmbH",
        "invoice_date": "2024-02-29",
        "total_amount": 119.0,
        "currency": "EUR",
        "line_items": [{"description": "Widget", "quantity": 2, "unit_price": 59.5}],
    }
    data.update(overrides)
    return data


def api_client(sim: Ms4Sim, **kwargs: Any) -> httpx.Client:
    # verify=False: plain-HTTP loopback only, and it skips ~80 ms of CA loading per client
    return httpx.Client(base_url=sim.url, headers=HEADERS, timeout=5, verify=False, **kwargs)


@pytest.fixture(scope="session")
def raw() -> Iterator[httpx.Client]:
    """Bare client (no base_url, no API key) for tests that use absolute URLs."""
    with httpx.Client(timeout=5, verify=False) as c:
        yield c


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Ms4Sim]]:
    sims: list[Ms4Sim] = []

    def factory(**kwargs: Any) -> Ms4Sim:
        sim = Ms4Sim(SimConfig(**kwargs)).start()
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., Ms4Sim]) -> Ms4Sim:
    return make_sim()


@pytest.fixture
def client(sim: Ms4Sim) -> Iterator[httpx.Client]:
    with api_client(sim) as c:
        yield c


# ----------------------------------------------------------------------------- happy


def test_valid_batch_accepted(sim: Ms4Sim, client: httpx.Client) -> None:
    r = client.post("/batch-metadata", json=[obj("A"), obj("B", total_amount=3)])
    assert r.status_code == 202
    assert r.content == b""
    assert r.headers["content-length"] == "0"
    assert sim.accepted_ids() == {"A", "B"}
    st = sim.stats()
    assert st["invoices_accepted"] == 2
    assert st["requests_by_status"] == {"202": 1}


def test_valid_single_metadata_accepted(sim: Ms4Sim, client: httpx.Client) -> None:
    r = client.post("/metadata", json=obj("S1", line_items=[]))
    assert r.status_code == 202
    assert r.content == b""
    assert sim.accepted_ids() == {"S1"}


def test_keep_alive_connection_reused(sim: Ms4Sim, client: httpx.Client) -> None:
    for i in range(5):
        assert client.post("/metadata", json=obj(f"K{i}")).status_code == 202
    assert client.post("/metadata", content=b"nope").status_code == 400
    assert sim.stats()["connections_opened"] == 1


def test_chunked_body_accepted(sim: Ms4Sim, client: httpx.Client) -> None:
    raw = json.dumps([obj("C1"), obj("C2")]).encode()
    r = client.post("/batch-metadata", content=iter([raw[:10], raw[10:]]))
    assert r.status_code == 202
    assert sim.accepted_ids() == {"C1", "C2"}


# ------------------------------------------------------------------------------ auth


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}])
def test_wrong_or_missing_key_401(sim: Ms4Sim, raw: httpx.Client, headers: dict[str, str]) -> None:
    r = raw.post(f"{sim.url}/batch-metadata", json=[obj()], headers=headers)
    assert r.status_code == 401
    assert "invalid API key" in r.text
    assert sim.accepted_ids() == set()
    assert sim.stats()["requests_by_status"] == {"401": 1}


# -------------------------------------------------------------------------- validation


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda o: o.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o.__setitem__(key, value)


def _item(key: str, value: Any = None, delete: bool = False) -> Callable[[dict[str, Any]], None]:
    def mutate(o: dict[str, Any]) -> None:
        if delete:
            o["line_items"][0].pop(key)
        else:
            o["line_items"][0][key] = value

    return mutate


INVALID_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing vendor_name", _del("vendor_name"), "vendor_name"),
    ("missing line_items", _del("line_items"), "line_items"),
    ("vendor_name wrong type", _set("vendor_name", 42), "vendor_name"),
    ("empty vendor_name", _set("vendor_name", ""), "vendor_name"),
    ("date not real", _set("invoice_date", "2023-02-29"), "invoice_date"),
    ("date wrong format", _set("invoice_date", "2024/01/01"), "invoice_date"),
    ("date compact", _set("invoice_date", "20240101"), "invoice_date"),
    ("date with time", _set("invoice_date", "2024-01-01T00:00:00"), "invoice_date"),
    ("date not string", _set("invoice_date", 20240101), "invoice_date"),
    ("lower-case currency", _set("currency", "eur"), "currency"),
    ("4-letter currency", _set("currency", "EURO"), "currency"),
    ("bool amount", _set("total_amount", True), "total_amount"),
    ("string amount", _set("total_amount", "119.00"), "total_amount"),
    ("null amount", _set("total_amount", None), "total_amount"),
    ("extra key", _set("notes", "hi"), "notes"),
    ("line_items not array", _set("line_items", {"a": 1}), "line_items"),
    ("line item not object", _set("line_items", ["x"]), "line_items[0]"),
    ("line item missing quantity", _item("quantity", delete=True), "line_items[0].quantity"),
    ("line item bad unit_price", _item("unit_price", "1.5"), "line_items[0].unit_price"),
    ("line item bool quantity", _item("quantity", False), "line_items[0].quantity"),
    ("line item bad description", _item("description", None), "line_items[0].description"),
    ("line item extra key", _item("sku", "X1"), "line_items[0].sku"),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [(m, f) for _, m, f in INVALID_CASES], ids=[c[0] for c in INVALID_CASES]
)
def test_invalid_object_400_names_index_and_field(
    sim: Ms4Sim, client: httpx.Client, mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    bad = obj("BAD-2")
    mutate(bad)
    batch = [obj("OK-0"), obj("OK-1"), bad, obj("OK-3")]
    r = client.post("/batch-metadata", json=batch)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "invalid object(s)"
    assert len(body["details"]) == 1
    detail = body["details"][0]
    assert detail["index"] == 2
    assert detail["field"] == field
    assert detail["invoice_id"] == "BAD-2"
    assert detail["message"]
    assert sim.accepted_ids() == set()  # whole request rejected


@pytest.mark.parametrize(("invoice_id", "reported"), [(7, None), ("", ""), (None, None)])
def test_invalid_invoice_id(client: httpx.Client, invoice_id: Any, reported: Any) -> None:
    r = client.post("/batch-metadata", json=[obj(invoice_id)])
    assert r.status_code == 400
    (detail,) = r.json()["details"]
    assert (detail["index"], detail["field"], detail["invoice_id"]) == (0, "invoice_id", reported)


def test_non_object_element(client: httpx.Client) -> None:
    r = client.post("/batch-metadata", json=[obj("A"), "string"])
    assert r.status_code == 400
    (detail,) = r.json()["details"]
    assert detail["index"] == 1
    assert detail["field"] is None
    assert detail["invoice_id"] is None


def test_non_finite_amount_rejected(client: httpx.Client) -> None:
    raw = json.dumps([obj("A")]).replace("119.0", "1e400").encode()  # parses as inf
    r = client.post("/batch-metadata", content=raw)
    assert r.status_code == 400
    assert r.json()["details"][0]["field"] == "total_amount"


def test_all_invalid_objects_listed(sim: Ms4Sim, client: httpx.Client) -> None:
    batch = [obj("A"), obj("B", currency="usd"), obj("C"), obj("D", extra=1)]
    r = client.post("/batch-metadata", json=batch)
    assert r.status_code == 400
    details = r.json()["details"]
    assert [(d["index"], d["invoice_id"], d["field"]) for d in details] == [
        (1, "B", "currency"),
        (3, "D", "extra"),
    ]
    assert sim.stats()["invoices_accepted"] == 0


def test_single_metadata_invalid_index_0(client: httpx.Client) -> None:
    r = client.post("/metadata", json=obj("S", invoice_date="2024-13-01"))
    assert r.status_code == 400
    (detail,) = r.json()["details"]
    assert (detail["index"], detail["field"], detail["invoice_id"]) == (0, "invoice_date", "S")


@pytest.mark.parametrize(
    ("path", "content", "needle"),
    [
        ("/batch-metadata", b"{not json", "not valid JSON"),
        ("/batch-metadata", b"", "not valid JSON"),
        ("/batch-metadata", b"[NaN]", "not valid JSON"),
        ("/batch-metadata", b"\xff\xfe[]", "not valid JSON"),
        ("/batch-metadata", json.dumps(obj()).encode(), "array"),
        ("/batch-metadata", b"[]", "non-empty"),
        ("/metadata", json.dumps([obj()]).encode(), "object"),
        ("/metadata", b"{", "not valid JSON"),
    ],
)
def test_bad_body_400(
    sim: Ms4Sim, client: httpx.Client, path: str, content: bytes, needle: str
) -> None:
    r = client.post(path, content=content)
    assert r.status_code == 400
    assert needle in r.json()["error"]
    assert sim.stats()["invoices_accepted"] == 0


def test_validate_metadata_function() -> None:
    assert validate_metadata(obj()) is None
    assert validate_metadata(obj(total_amount=1)) is None
    assert validate_metadata(obj(total_amount=float("nan"))) == (
        "total_amount",
        "must be a finite number",
    )
    assert validate_metadata([]) is not None


# ----------------------------------------------------------------------- size / routes


def test_413_body_too_large(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(max_body_bytes=200)
    with api_client(sim) as c:
        r = c.post("/batch-metadata", json=[obj(f"I{i}") for i in range(10)])
        assert r.status_code == 413
        # the connection (body drained) is still usable
        assert c.post("/metadata", json=obj("small")).status_code == 202
    assert sim.stats()["requests_by_status"] == {"202": 1, "413": 1}


def test_unknown_path_and_method(client: httpx.Client) -> None:
    assert client.post("/nope", json=[obj()]).status_code == 404
    r = client.get("/batch-metadata")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"


# ------------------------------------------------------------------------ rate limit


def test_rate_limit_429_retry_after_and_recovery(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=3, window=1.0)
    with api_client(sim) as c:
        t0 = time.monotonic()
        for i in range(3):
            assert c.post("/metadata", json=obj(f"R{i}")).status_code == 202
        r = c.post("/metadata", json=obj("R3"))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert c.post("/metadata", json=obj("R3")).status_code == 429  # no slot consumed
        time.sleep(max(0.0, t0 + 1.05 - time.monotonic()))
        assert c.post("/metadata", json=obj("R3")).status_code == 202
    st = sim.stats()
    assert st["requests_by_status"] == {"202": 4, "429": 2}
    assert sim.max_in_window() == 3
    assert st["max_in_window"] == 3
    assert sim.max_in_window(10.0) == 4


def test_retry_after_counts_down_to_free_slot(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=1, window=5.0)
    with api_client(sim) as c:
        assert c.post("/metadata", json=obj()).status_code == 202
        r = c.post("/metadata", json=obj())
        assert r.status_code == 429
        assert r.headers["retry-after"] == "5"


def test_rate_limit_holds_under_concurrency(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=5, window=0.3)
    deadline = time.monotonic() + 0.5

    def worker(n: int) -> list[int]:
        codes: list[int] = []
        with api_client(sim) as c:
            while time.monotonic() < deadline:
                codes.append(c.post("/metadata", json=obj(f"T{n}")).status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        codes = [code for result in pool.map(worker, range(4)) for code in result]
    assert set(codes) == {202, 429}
    assert sim.max_in_window() == 5
    assert sim.stats()["requests_by_status"]["202"] == codes.count(202)


def test_rate_limit_zero_is_unlimited(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=0)
    with api_client(sim) as c:
        for i in range(20):
            assert c.post("/metadata", json=obj(f"U{i}")).status_code == 202
    assert sim.max_in_window() == 20


# --------------------------------------------------------------------- fault injection


def test_injected_faults(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(fail_500=1.0)
    with api_client(sim) as c:
        assert c.post("/metadata", json=obj()).status_code == 500
        sim.config.fail_500 = 0.0
        sim.config.fail_429 = 1.0
        r = c.post("/metadata", json=obj())
        assert (r.status_code, r.headers["retry-after"]) == (429, "1")
        sim.config.fail_429 = 0.0
        sim.config.fail_401 = 1.0
        assert c.post("/metadata", json=obj()).status_code == 401
    assert sim.accepted_ids() == set()
    assert sim.stats()["requests_by_status"] == {"401": 1, "429": 1, "500": 1}


def test_retry_after_of_injected_429_as_seconds_or_http_date(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(fail_429=1.0, retry_after=2.5)
    with api_client(sim) as c:
        assert c.post("/metadata", json=obj()).headers["retry-after"] == "3"  # rounded up
        sim.control(retry_after=30, retry_after_form="http-date")
        before = time.time()
        value = c.post("/metadata", json=obj()).headers["retry-after"]
    assert value.endswith(" GMT") and "," in value  # IMF-fixdate
    when = email.utils.parsedate_to_datetime(value).timestamp()
    assert before + 28 <= when <= time.time() + 31


def test_reset_mid_answer_counts_accepted_and_the_client_sees_an_error(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(reset=1.0)
    with api_client(sim) as c:
        with pytest.raises(httpx.TransportError):
            c.post("/batch-metadata", json=[obj("R1")], headers={"Idempotency-Key": "r"})
        sim.control(reset=0.0)
        assert c.post("/batch-metadata", json=[obj("R1")],
                      headers={"Idempotency-Key": "r"}).status_code == 202
    # at the socket: part of a status line, then a reset (not an orderly close)
    sim.control(reset=1.0)
    body = json.dumps([obj("R2")]).encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(b"POST /batch-metadata HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
    assert received.startswith(b"HTTP/1.1 202") and b"\r\n\r\n" not in received
    st = sim.stats()
    assert st["requests_by_status"] == {"202": 1, "reset": 2}
    assert st["duplicate_batches"] == 1 and st["unique_invoices_accepted"] == 2
    assert [(r.dropped, r.reset, r.answer) for r in sim.accepted_requests()] == \
        [(True, True, "reset"), (False, False, "202"), (True, True, "reset")]


def test_control_endpoint_changes_settings_at_runtime(
        make_sim: Callable[..., Ms4Sim], raw: httpx.Client) -> None:
    sim = make_sim()
    url = f"{sim.url}/_control"
    shown = raw.get(url).json()
    assert shown["fail_500"] == 0.0 and "api_key" not in shown
    r = raw.post(url, json={"api_key": "rotated", "latency": 0.01, "fail_500": 0})
    assert r.status_code == 200 and r.json()["latency"] == 0.01
    assert "rotated" not in r.text
    assert raw.post(f"{sim.url}/metadata", json=obj(), headers=HEADERS).status_code == 401
    assert raw.post(f"{sim.url}/metadata", json=obj(),
                    headers={"X-API-Key": "rotated"}).status_code == 202
    # a bad change is refused as a whole, naming what is wrong
    for bad, word in (({"drop": 2}, "drop"), ({"latency": "slow"}, "latency"),
                      ({"nonsense": 1}, "nonsense"), ({"retry_after_form": "x"}, "form"),
                      ({"api_key": ""}, "api_key"), ({"drop": 0.5, "fail_429": True}, "fail_429"),
                      ([1], "object")):
        r = raw.post(url, json=bad)
        assert r.status_code == 400 and word in r.json()["error"], (bad, r.text)
    assert sim.config.drop == 0.0 and sim.config.api_key == "rotated"
    assert raw.post(url, content=b"{not json").status_code == 400
    # control requests are not API requests
    assert sim.stats()["requests_by_status"] == {"202": 1, "401": 1}


def test_accepted_endpoint_lists_requests_with_keys_and_answers(
        make_sim: Callable[..., Ms4Sim], raw: httpx.Client) -> None:
    sim = make_sim()
    with api_client(sim) as c:
        c.post("/batch-metadata", json=[obj("A1"), obj("A2")], headers={"Idempotency-Key": "k"})
        sim.control(drop=1.0)
        with pytest.raises(httpx.TransportError):
            c.post("/metadata", json=obj("A3"))
    listed = raw.get(f"{sim.url}/accepted").json()
    assert listed == sim.accepted_list() == [
        {"path": "/batch-metadata", "idempotency_key": "k", "invoice_ids": ["A1", "A2"],
         "answer": "202", "traceparent": None},
        {"path": "/metadata", "idempotency_key": None, "invoice_ids": ["A3"],
         "answer": "dropped", "traceparent": None}]


def test_seeded_faults_are_reproducible(make_sim: Callable[..., Ms4Sim]) -> None:
    def run() -> list[int]:
        sim = make_sim(fail_500=0.3, fail_429=0.3, seed=1234, rate_limit=0)
        with api_client(sim) as c:
            return [c.post("/metadata", json=obj(f"X{i}")).status_code for i in range(30)]

    first = run()
    assert first == run()
    assert {202, 429, 500} <= set(first)


def test_reject_every_is_deterministic(sim: Ms4Sim, client: httpx.Client) -> None:
    sim.config.reject_every = 3
    ids = [f"INV-{i:04d}" for i in range(30)]
    expected = {i for i in ids if zlib.crc32(i.encode()) % 3 == 0}
    assert expected and len(expected) < len(ids)

    r = client.post("/batch-metadata", json=[obj(i) for i in ids])
    assert r.status_code == 400
    details = r.json()["details"]
    assert {d["invoice_id"] for d in details} == expected
    assert all(d["message"] == REJECT_EVERY_REASON for d in details)
    assert all(ids[d["index"]] == d["invoice_id"] for d in details)

    # split the batch: every half gets the same verdict per invoice_id
    for half in (ids[:15], ids[15:]):
        r = client.post("/batch-metadata", json=[obj(i) for i in half])
        assert {d["invoice_id"] for d in r.json()["details"]} == expected & set(half)

    good = [i for i in ids if i not in expected]
    assert client.post("/batch-metadata", json=[obj(i) for i in good]).status_code == 202
    assert sim.accepted_ids() == set(good)


# ------------------------------------------------------------------ drop / duplicates


def test_drop_gives_transport_error_but_counts_accepted(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(drop=1.0)
    with api_client(sim) as c:
        with pytest.raises(httpx.TransportError):
            c.post(
                "/batch-metadata", json=[obj("D1"), obj("D2")], headers={"Idempotency-Key": "k1"}
            )
        # client retries the same batch after the sim recovered -> duplicates
        sim.config.drop = 0.0
        r = c.post(
            "/batch-metadata", json=[obj("D1"), obj("D2")], headers={"Idempotency-Key": "k1"}
        )
        assert r.status_code == 202
    st = sim.stats()
    assert st["requests_by_status"] == {"202": 1, "dropped": 1}
    assert st["invoices_accepted"] == 4
    assert st["unique_invoices_accepted"] == 2
    assert st["duplicate_invoices"] == 2
    assert st["duplicate_batches"] == 1
    assert sim.accepted_ids() == {"D1", "D2"}
    assert sim.accepted_idempotency_keys() == ["k1", "k1"]
    assert [req.dropped for req in sim.accepted_requests()] == [True, False]


def test_duplicates_by_invoice_id_and_idempotency_key(sim: Ms4Sim, client: httpx.Client) -> None:
    assert (
        client.post(
            "/batch-metadata", json=[obj("A"), obj("B")], headers={"Idempotency-Key": "b1"}
        ).status_code
        == 202
    )
    # same ids again, different key: duplicate invoices, not a duplicate batch
    assert (
        client.post(
            "/batch-metadata", json=[obj("B"), obj("C")], headers={"Idempotency-Key": "b2"}
        ).status_code
        == 202
    )
    # a rejected request with a known key does not count
    assert (
        client.post(
            "/batch-metadata", json=[obj("Z", currency="x")], headers={"Idempotency-Key": "b1"}
        ).status_code
        == 400
    )
    # accepted request re-using key b1
    assert (
        client.post("/metadata", json=obj("D"), headers={"Idempotency-Key": "b1"}).status_code
        == 202
    )
    # no key at all
    assert client.post("/metadata", json=obj("D")).status_code == 202
    st = sim.stats()
    assert st["invoices_accepted"] == 6
    assert st["unique_invoices_accepted"] == 4
    assert st["duplicate_invoices"] == 2  # B, D
    assert st["duplicate_batches"] == 1
    assert sim.accepted_idempotency_keys() == ["b1", "b2", "b1", None]


# ------------------------------------------------------------------ stats / reset / misc


def test_stats_and_reset_endpoints(sim: Ms4Sim, client: httpx.Client, raw: httpx.Client) -> None:
    client.post("/batch-metadata", json=[obj("A"), obj("A")])
    client.post("/batch-metadata", content=b"[]")
    raw.post(f"{sim.url}/metadata", json=obj())  # no key
    st = raw.get(f"{sim.url}/stats").json()
    assert st["requests_total"] == 3
    assert st["requests_by_status"] == {"202": 1, "400": 1, "401": 1}
    assert st["invoices_accepted"] == 2
    assert st["unique_invoices_accepted"] == 1
    assert st["duplicate_invoices"] == 1
    assert st["max_in_window"] == 2  # the 401 never reached the rate limiter
    assert "timestamps" not in json.dumps(st)
    assert st == sim.stats()

    r = raw.post(f"{sim.url}/reset")
    assert r.status_code == 204
    st = raw.get(f"{sim.url}/stats").json()
    assert st["requests_total"] == 0
    assert st["requests_by_status"] == {}
    assert st["invoices_accepted"] == 0
    assert st["max_in_window"] == 0
    assert sim.accepted_ids() == set()

    sim.reset()
    assert sim.stats()["requests_total"] == 0


def test_latency_added(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(latency=0.2)
    with api_client(sim) as c:
        t0 = time.monotonic()
        assert c.post("/metadata", json=obj()).status_code == 202
        assert time.monotonic() - t0 >= 0.2
        t0 = time.monotonic()
        assert c.post("/metadata", content=b"x").status_code == 400
        assert time.monotonic() - t0 >= 0.2


def test_client_disconnect_mid_body_is_quiet(
    sim: Ms4Sim, client: httpx.Client, capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.create_connection(("127.0.0.1", sim.port)) as s:
        s.sendall(
            b"POST /batch-metadata HTTP/1.1\r\nHost: x\r\nX-API-Key: sim-key\r\n"
            b'Content-Length: 1000\r\n\r\n[{"invoice_id"'
        )
    with socket.create_connection(("127.0.0.1", sim.port)) as s:
        s.sendall(b"POST /batch-met")  # mid request line
    time.sleep(0.2)
    assert client.post("/metadata", json=obj("after")).status_code == 202
    assert sim.accepted_ids() == {"after"}
    _out, err = capfd.readouterr()
    assert err == ""


def test_context_manager_and_config_validation(raw: httpx.Client) -> None:
    with Ms4Sim(SimConfig()) as sim:
        assert sim.url.startswith("http://127.0.0.1:")
        r = raw.post(f"{sim.url}/metadata", json=obj(), headers=HEADERS)
        assert r.status_code == 202
    with pytest.raises(ValueError):
        SimConfig(drop=1.5)
    with pytest.raises(SystemExit):
        main(["--fail-500", "2"])


# ------------------------------------------------------------------------------- CLI


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError("ms4-sim did not print its listening line in time")
    finally:
        sel.close()
    return proc.stdout.readline()


@pytest.mark.slow
def test_main_subprocess_smoke(raw: httpx.Client) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MS4_SIM_API_KEY": "s3cret-env-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ms1_tools.sim", "--port", "0", "--rate-limit", "50",
         "--reset", "0", "--retry-after", "2", "--retry-after-form", "http-date"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _readline(proc, 10)
        assert line.startswith("ms4-sim listening on http://127.0.0.1:")
        url = line.split()[-1]
        hdr = {"X-API-Key": "s3cret-env-key"}
        assert raw.post(f"{url}/batch-metadata", json=[obj()], headers=hdr).status_code == 202
        assert raw.post(f"{url}/batch-metadata", json=[obj()], headers=HEADERS).status_code == 401
        settings = raw.get(f"{url}/_control").json()
        assert (settings["retry_after"], settings["retry_after_form"]) == (2.0, "http-date")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("ms4-sim stats: ")
    final = json.loads(last.removeprefix("ms4-sim stats: "))
    assert final["requests_by_status"] == {"202": 1, "401": 1}
    assert final["invoices_accepted"] == 1
    assert "s3cret-env-key" not in out + err + line
    assert err == ""


def test_main_runs_a_command_against_the_sim_and_returns_its_status() -> None:
    code = ("import os, httpx, sys; r = httpx.post(os.environ['MS4_SIM_URL'] + '/metadata', "
            "headers={'X-API-Key': os.environ['MS1_MS4_API_KEY']}, json={'invoice_id': 'A', "
            "'vendor_name': 'V', 'invoice_date': '2025-11-01', 'total_amount': 1, "
            "'currency': 'USD', 'line_items': []}); sys.exit(r.status_code - 200)")
    env = {k: v for k, v in os.environ.items() if k != "MS1_MS4_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "ms1_tools.sim", "--port", "0", "--",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2  # 202 - 200: the command's own status comes back
    stats = json.loads(proc.stdout.split("ms4-sim stats: ", 1)[1])
    assert stats["unique_invoices_accepted"] == 1


@pytest.mark.parametrize(("status", "header"), [
    (403, None), (404, None), (409, None), (422, None), (408, None), (503, "retry-after"),
    (302, "location"), (301, "location"), (307, "location"), (308, "location"),
    (405, "allow"), (200, None), (201, None), (204, None)])
def test_answer_status_answers_every_request_so_until_turned_off(
        make_sim: Callable[..., Ms4Sim], status: int, header: str | None) -> None:
    sim = make_sim(answer_status=status)
    with api_client(sim) as client:
        r = client.post("/batch-metadata", json=[obj()])
        assert r.status_code == status
        if header is not None:
            assert header in r.headers
        if status == 204:
            assert r.content == b""
        elif status >= 300:
            assert str(status) in r.json()["error"]
        if header == "location":
            assert r.headers["location"].endswith("/v2/batch-metadata")
        assert sim.accepted_ids() == set()
        assert sim.control(answer_status=0)["answer_status"] == 0
        assert client.post("/batch-metadata", json=[obj()]).status_code == 202
    assert sim.stats()["requests_by_status"] == {str(status): 1, "202": 1}


def test_answer_status_and_refuse_status_are_validated(
        make_sim: Callable[..., Ms4Sim], raw: httpx.Client) -> None:
    sim = make_sim()
    for bad in ({"answer_status": 202}, {"answer_status": 99}, {"answer_status": 600},
                {"answer_status": "403"}, {"refuse_status": 409}):
        r = raw.post(f"{sim.url}/_control", json=bad)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["error"], (bad, r.text)
    with pytest.raises(ValueError, match="answer_status"):
        SimConfig(answer_status=202)
    assert raw.post(f"{sim.url}/_control", json={"answer_status": 403}).json()[
        "answer_status"] == 403


def test_refuse_status_422_answers_refused_objects_with_422(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(refuse_status=422)
    with api_client(sim) as client:
        r = client.post("/batch-metadata", json=[obj(), obj("INV-2", currency="eur")])
        assert r.status_code == 422
        assert r.json()["details"][0]["field"] == "currency"


# --- where the rate limit counts a request (issue 13) ------------------------------------

def test_count_at_arrival_answers_429_at_once_and_counts_before_the_work(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=1, window=60, latency=0.5)
    with api_client(sim) as c:
        started = time.monotonic()
        assert c.post("/batch-metadata", json=[obj("A")]).status_code == 202
        assert time.monotonic() - started >= 0.5  # the work
        started = time.monotonic()
        refused = c.post("/batch-metadata", json=[obj("B")])
        assert refused.status_code == 429
        assert time.monotonic() - started < 0.3  # a limiter in front: no work done
    passed = sim._state.passed
    assert len(passed) == 1 and passed[0] < started - 0.4  # counted as it arrived


def test_count_at_answer_counts_after_the_work(make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=1, window=60, latency=0.5, count_at="answer")
    with api_client(sim) as c:
        started = time.monotonic()
        assert c.post("/batch-metadata", json=[obj("A")]).status_code == 202
        refused_at = time.monotonic()
        assert c.post("/batch-metadata", json=[obj("B")]).status_code == 429
        assert time.monotonic() - refused_at >= 0.5  # refused only after the work
    assert sim._state.passed[0] >= started + 0.5
    with pytest.raises(ValueError, match="count_at"):
        SimConfig(count_at="sometimes")


def test_count_late_counts_arrivals_late_in_every_other_spell(
        make_sim: Callable[..., Ms4Sim]) -> None:
    sim = make_sim(rate_limit=100, window=60, count_late=0.3, count_late_spell=1.0)
    sim._state.started = time.monotonic()  # the first spell (a late one) starts now
    with api_client(sim) as c:
        sent = time.monotonic()
        assert c.post("/batch-metadata", json=[obj("A")]).status_code == 202
        assert sim._state.passed[0] >= sent + 0.3  # counted 0.3 s after it arrived
        sim._state.started -= 1.0  # now in the second spell: on time
        sent = time.monotonic()
        assert c.post("/batch-metadata", json=[obj("B")]).status_code == 202
        assert sim._state.passed[1] < sent + 0.2
    with pytest.raises(ValueError, match="count_late_spell"):
        SimConfig(count_late_spell=0)
    with pytest.raises(ValueError, match="count_late"):
        SimConfig(count_late=-1)
