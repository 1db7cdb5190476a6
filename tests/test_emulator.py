"""The Amberflo emulator over real sockets: ingest, customers, auth, faults, control routes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.emulator._validate import HttpError, _validate_record_field_by_field, validate_record
from sync.emulator._wire import RequestParser, WireError
from sync.errors import ConfigError

KEY = {"x-api-key": "test-key"}
# The emulator speaks plain HTTP; handing httpx a ready TLS context spares it loading the CA
# bundle for every client, which costs about a tenth of a second on this project's machines.
UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def http(url: str, **options: Any) -> httpx.Client:
    """A keep-alive client for ``url``."""
    return httpx.Client(base_url=url, verify=UNUSED_TLS, timeout=5, **options)


def record(**changes: Any) -> dict[str, Any]:
    """A valid meter record, with ``changes`` applied (``None`` removes a field)."""
    base: dict[str, Any] = {
        "customerId": "user-1",
        "meterApiName": "page",
        "meterValue": 1.0,
        "meterTimeInMillis": 1619445706909,
        "uniqueId": "msg-1",
        "dimensions": {"path": "_home", "url": "https:__segment.com"},
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


@pytest.fixture
def api(emulator: EmulatorHandle) -> Iterator[httpx.Client]:
    """A keep-alive client for the emulator that sends an API key."""
    with http(emulator.url, headers=KEY) as client:
        yield client


def raw_exchange(url: str, payload: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- ingest --------------------------------------------------------------------------------


TWO = [record(), record(uniqueId="msg-2")]


@pytest.mark.parametrize(
    ("content", "headers", "stored"),
    [
        pytest.param(json.dumps(record()).encode(), {}, [record()], id="object"),
        pytest.param(json.dumps(TWO).encode(), {}, TWO, id="array"),
        pytest.param(
            "\n".join([json.dumps(TWO[0]), "", json.dumps(TWO[1]), ""]).encode(),
            {},
            TWO,
            id="ndjson",
        ),
        pytest.param(
            gzip.compress(json.dumps(TWO).encode()),
            {"content-encoding": "gzip"},
            TWO,
            id="gzip-array",
        ),
    ],
)
def test_ingest_accepts_every_body_shape(
    emulator: EmulatorHandle,
    api: httpx.Client,
    content: bytes,
    headers: dict[str, str],
    stored: list[dict[str, Any]],
) -> None:
    """An object, an array, NDJSON and a gzipped body are all ingested and stored."""
    response = api.post("/ingest", content=content, headers=headers)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    assert response.text == f"{len(stored)} records were ingested"
    assert emulator.ingested() == stored


def test_ingest_keeps_integers_past_64_bits_exact(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """A 20-digit integer in an ingest body is read as the integer it is (orjson would make it
    a float, and then not an integer at all)."""
    millis = 12345678901234567890
    record = (
        f'"customerId": "c", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": {millis}'
    )
    response = api.post("/ingest", content=f"[{{{record}}}]".encode())
    assert response.status_code == 200, response.text
    assert emulator.ingested()[0]["meterTimeInMillis"] == millis


def test_ingest_serves_both_paths_on_any_host(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """/ingest and /ingest/ both work, whatever the Host header says."""
    first = api.post("/ingest", json=record())
    second = api.post(
        "/ingest/", json=record(uniqueId="msg-2"), headers={"host": "ingest.amberflo.io"}
    )

    assert (first.status_code, second.status_code) == (200, 200)
    assert len(emulator.ingested()) == 2


def test_an_identical_record_is_stored_once_and_counted(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """Re-sending a record changes nothing but the duplicate count; N still counts it."""
    api.post("/ingest", json=record())
    response = api.post("/ingest", json=[record(), record(meterValue=1)])

    assert response.text == "2 records were ingested"
    assert emulator.ingested() == [record()]
    stats = emulator.stats()
    assert (stats["records_received"], stats["records_unique"]) == (3, 1)
    assert stats["records_duplicate"] == 2


def test_a_record_differing_in_one_dimension_is_not_a_duplicate(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """Dedup is on the whole record: another dimension value makes another record."""
    other = record(dimensions={"path": "_home", "url": "https:__google.com"})
    api.post("/ingest", json=[record(), other])

    assert emulator.ingested() == [record(), other]


def test_unknown_record_fields_are_dropped(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """Top-level keys outside Amberflo's schema are ignored, as Amberflo documents."""
    api.post("/ingest", json={**record(), "color": "red"})

    assert emulator.ingested() == [record()]


INVALID_RECORDS = [
    pytest.param({"customerId": None}, "customerId", id="customerId-missing"),
    pytest.param({"customerId": "  "}, "customerId", id="customerId-blank"),
    pytest.param({"customerId": 7}, "customerId", id="customerId-number"),
    pytest.param({"meterApiName": ""}, "meterApiName", id="meterApiName-empty"),
    pytest.param({"meterValue": "1"}, "meterValue", id="meterValue-string"),
    pytest.param({"meterValue": True}, "meterValue", id="meterValue-bool"),
    pytest.param({"meterValue": None}, "meterValue", id="meterValue-missing"),
    pytest.param({"meterTimeInMillis": 1.5e12}, "meterTimeInMillis", id="time-float"),
    pytest.param({"meterTimeInMillis": 0}, "meterTimeInMillis", id="time-zero"),
    pytest.param({"meterTimeInMillis": "1619445706909"}, "meterTimeInMillis", id="time-string"),
    pytest.param({"uniqueId": 5}, "uniqueId", id="uniqueId-number"),
    pytest.param({"dimensions": ["a"]}, "dimensions", id="dimensions-list"),
    pytest.param({"dimensions": {"n": 5}}, "dimensions['n']", id="dimension-number"),
    pytest.param({"dimensions": {"url": "https://x"}}, "dimensions['url']", id="slash"),
    pytest.param({"dimensions": {"t": "a|b"}}, "dimensions['t']", id="pipe"),
    pytest.param({"dimensions": {"t": ""}}, "dimensions['t']", id="empty-value"),
    pytest.param({"dimensions": {"t": "x" * 201}}, "dimensions['t']", id="201-chars"),
    pytest.param({"dimensions": {"a/b": "x"}}, "dimensions key", id="key-slash"),
]


@pytest.mark.parametrize(("changes", "field"), INVALID_RECORDS)
def test_an_invalid_record_rejects_the_whole_request(
    emulator: EmulatorHandle, api: httpx.Client, changes: dict[str, Any], field: str
) -> None:
    """One invalid record gives a 400 naming its index and field, and nothing is stored."""
    response = api.post("/ingest", json=[record(), record(**{"uniqueId": "msg-2", **changes})])

    assert response.status_code == 400
    message = response.json()["errorMessage"]
    assert message.startswith(f"record 1: {field}")
    assert emulator.ingested() == []


def test_a_meter_value_beyond_a_double_is_refused(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """1e999 is valid JSON but no finite number: the record is refused."""
    body = json.dumps(record(meterValue=0)).replace('"meterValue": 0', '"meterValue": 1e999')

    response = api.post("/ingest", content=body.encode())

    assert response.status_code == 400
    assert response.json()["errorMessage"].startswith("record 0: meterValue")
    assert emulator.ingested() == []


def test_dimension_values_within_the_rule_are_accepted(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """Underscored URLs, every allowed punctuation mark and 200 characters pass the regex."""
    dimensions = {"url": "https:__x", "all": "-_ !.*'()&$@=;:+,?09azAZ", "long": "x" * 200}
    response = api.post("/ingest", json=record(dimensions=dimensions))

    assert response.status_code == 200
    assert emulator.ingested()[0]["dimensions"] == dimensions


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"meterValue": NaN}', b"42", b'{"a": 1}\n{oops', b"\xff\xfe"],
    ids=["empty", "broken", "nan", "scalar", "bad-ndjson-line", "not-utf8"],
)
def test_a_body_that_is_not_records_is_a_400(api: httpx.Client, content: bytes) -> None:
    """Bodies that are not a JSON object, array or NDJSON are refused with errorMessage."""
    response = api.post("/ingest", content=content)

    assert response.status_code == 400
    assert response.json()["errorMessage"]


def test_a_broken_gzip_body_is_a_400(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """A body announced as gzip that is not gzip is refused."""
    response = api.post("/ingest", content=b"plain", headers={"content-encoding": "gzip"})

    assert response.status_code == 400
    assert emulator.ingested() == []


@pytest.mark.parametrize(
    ("content", "encoding", "status"),
    [
        (gzip.compress(b" " * (10 * 1024 * 1024 + 1)), "gzip", 413),
        (b"[]", "br", 415),
    ],
    ids=["gzip-bomb", "brotli"],
)
def test_bodies_the_emulator_will_not_unpack_are_refused(
    api: httpx.Client, content: bytes, encoding: str, status: int
) -> None:
    """A gzip body over 10 MiB once inflated is a 413; an unknown Content-Encoding a 415."""
    response = api.post("/ingest", content=content, headers={"content-encoding": encoding})

    assert response.status_code == status
    assert response.json()["message"]


def test_a_chunked_body_is_read(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """A body sent with Transfer-Encoding: chunked (a generator in httpx) is ingested."""
    payload = json.dumps([record(), record(uniqueId="msg-2")]).encode()

    def pieces() -> Iterator[bytes]:
        yield payload[:10]
        yield payload[10:]

    response = api.post("/ingest", content=pieces())

    assert response.text == "2 records were ingested"
    assert len(emulator.ingested()) == 2


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-api-key": ""}], ids=["missing", "empty"])
def test_a_request_without_a_key_is_forbidden(
    emulator: EmulatorHandle, headers: dict[str, str]
) -> None:
    """No (or an empty) x-api-key gives 403 {"message": "Forbidden"} and stores nothing."""
    with http(emulator.url) as client:
        response = client.post("/ingest", json=record(), headers=headers)

    assert response.status_code == 403
    assert response.json() == {"message": "Forbidden"}
    assert emulator.ingested() == []


def test_a_restricted_emulator_accepts_only_its_keys() -> None:
    """With api_keys set, another key is refused and a listed one (any header case) accepted."""
    options = EmulatorOptions(port=0, api_keys=frozenset({"good"}))
    with running_emulator(options) as emulator, http(emulator.url) as client:
        wrong = client.get("/customers", headers={"x-api-key": "bad"})
        right = client.get("/customers", headers={"X-API-KEY": "good"})

    assert (wrong.status_code, right.status_code) == (403, 200)


# -- customers -----------------------------------------------------------------------------


def customer(**changes: Any) -> dict[str, Any]:
    """A valid customer body with ``changes`` applied."""
    return {"customerId": "c1", "customerName": "One", **changes}


def test_an_unknown_customer_reads_as_an_empty_object(api: httpx.Client) -> None:
    """GET /customers?customerId= answers 200 {} for a customer that does not exist."""
    response = api.get("/customers", params={"customerId": "nobody"})

    assert (response.status_code, response.json()) == (200, {})


def test_post_creates_a_customer_with_server_fields(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """POST stores the body plus id, createTime, updateTime and enabled, and returns it."""
    created = api.post("/customers/", json=customer(customerEmail="a@b.c")).json()

    assert created["id"] == created["customerId"] == "c1"
    assert created["enabled"] is True
    assert created["createTime"] == created["updateTime"] > 0
    assert api.get("/customers/", params={"customerId": "c1"}).json() == created
    assert api.get("/customers").json() == [created]
    assert emulator.customers() == {"c1": created}


def test_post_of_an_existing_customer_is_a_400(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """A second POST for the same id is refused and leaves the first one as it was."""
    first = api.post("/customers", json=customer()).json()
    second = api.post("/customers", json=customer(customerName="Other"))

    assert second.status_code == 400
    assert "already exists" in second.json()["message"]
    assert emulator.customers() == {"c1": first}


def test_put_replaces_the_whole_customer(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """A PUT without traits removes them; createTime stays, updateTime moves on."""
    created = api.post("/customers", json=customer(traits={"plan": "gold"})).json()
    replaced = api.put("/customers", json=customer(customerName="Renamed")).json()

    assert "traits" not in replaced
    assert replaced["customerName"] == "Renamed"
    assert replaced["createTime"] == created["createTime"]
    assert replaced["updateTime"] >= created["updateTime"]
    assert emulator.customers()["c1"] == replaced


def test_put_of_a_missing_customer_creates_it_by_default(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """With put_missing="create" (the default), PUT acts as an upsert."""
    response = api.put("/customers", json=customer())

    assert response.status_code == 200
    assert set(emulator.customers()) == {"c1"}


def test_put_of_a_missing_customer_can_be_an_error() -> None:
    """With put_missing="error", PUT of an unknown id is a 404 with a JSON message."""
    with running_emulator(EmulatorOptions(port=0, put_missing="error")) as emulator:
        with http(emulator.url, headers=KEY) as client:
            response = client.put("/customers", json=customer())
        assert emulator.customers() == {}

    assert response.status_code == 404
    assert "does not exist" in response.json()["message"]


def test_delete_removes_a_customer(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """DELETE /customers/{id} returns the customer and forgets it; a second DELETE is a 404."""
    api.post("/customers", json=customer(customerId="a/b"))

    deleted = api.delete("/customers/a%2Fb")
    again = api.delete("/customers/a%2Fb")

    assert deleted.json()["customerId"] == "a/b"
    assert again.status_code == 404
    assert emulator.customers() == {}


def test_paging_counts_pages_from_one(api: httpx.Client) -> None:
    """/customers/paging pages from 1 and reports totals for the search it was given."""
    for n in range(7):
        api.post("/customers", json=customer(customerId=f"c{n}", customerName=f"Inc {n}"))
    api.post("/customers", json=customer(customerId="x", customerName="Other"))

    first = api.get("/customers/paging", params={"limit": 3, "search": "inc"}).json()
    last = api.get(
        "/customers/paging",
        params={"limit": 3, "page": 3, "search": "INC", "sort": "customerName"},
    ).json()
    descending = api.get("/customers/paging", params={"isAscending": "false"}).json()

    assert [c["id"] for c in first["items"]] == ["c0", "c1", "c2"]
    assert first["metadata"] == {
        "totalRowCount": 8,
        "filteredRowCount": 7,
        "limit": 3,
        "page": 1,
        "totalFilteredPages": 3,
        "isAscending": True,
        "sort": "id",
        "search": "inc",
    }
    assert [c["id"] for c in last["items"]] == ["c6"]
    assert [c["id"] for c in descending["items"]][:2] == ["x", "c6"]


def test_paging_refuses_a_page_below_one(api: httpx.Client) -> None:
    """page=0 is not a page: 400."""
    assert api.get("/customers/paging", params={"page": 0}).status_code == 400


def test_the_stripe_flag_adds_a_stripe_id(api: httpx.Client) -> None:
    """autoCreateCustomerInStripe=true sets traits.stripeId, keeping the other traits."""
    plain = api.post("/customers", json=customer(customerId="p", traits={"a": "1"})).json()
    stripe = api.post(
        "/customers",
        params={"autoCreateCustomerInStripe": "true"},
        json=customer(customerId="s", traits={"a": "1"}),
    ).json()

    assert plain["traits"] == {"a": "1"}
    assert stripe["traits"]["a"] == "1"
    assert stripe["traits"]["stripeId"].startswith("cus_")


def test_trait_numbers_and_booleans_become_strings(api: httpx.Client) -> None:
    """Scalars in traits are coerced to strings, as Jackson would."""
    traits = {"logins": 5, "ratio": 0.5, "vip": True, "plan": "gold"}
    created = api.post("/customers", json=customer(traits=traits)).json()

    assert created["traits"] == {"logins": "5", "ratio": "0.5", "vip": "true", "plan": "gold"}


@pytest.mark.parametrize(
    "body",
    [
        customer(traits={"nested": {"a": "b"}}),
        customer(traits={"list": ["a"]}),
        customer(traits={"none": None}),
        customer(traits="plan=gold"),
        customer(customerName=" "),
        {"customerId": "c1"},
        customer(customerEmail=5),
        customer(enabled="yes"),
        ["not", "an", "object"],
    ],
    ids=[
        "nested",
        "list",
        "null",
        "not-a-map",
        "blank-name",
        "no-name",
        "email-number",
        "enabled-string",
        "array",
    ],
)
def test_an_invalid_customer_is_a_400(
    emulator: EmulatorHandle, api: httpx.Client, body: Any
) -> None:
    """Invalid customer bodies are refused with a message, for POST and PUT alike."""
    created = api.post("/customers", json=body)
    replaced = api.put("/customers", json=body)

    assert (created.status_code, replaced.status_code) == (400, 400)
    assert created.json()["message"]
    assert emulator.customers() == {}


def test_unknown_routes_and_methods_are_refused(api: httpx.Client) -> None:
    """An unknown path is a 404 and a known path with another method a 405."""
    assert api.get("/meters").status_code == 404
    assert api.patch("/customers").status_code == 405


# -- faults --------------------------------------------------------------------------------


def test_a_429_carries_retry_after_and_changes_nothing(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """rate_429=1 throttles every request with the configured Retry-After; nothing is stored."""
    emulator.set_faults(rate_429=1, retry_after=2)

    response = api.post("/ingest", json=record())

    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert emulator.ingested() == []
    assert emulator.stats()["requests"]["POST /ingest"] == {"429": 1}


def test_server_errors_are_500_502_or_503(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """rate_5xx=1 fails every request with one of 500, 502, 503 and stores nothing."""
    emulator.set_faults(rate_5xx=1)

    statuses = {api.post("/customers", json=customer()).status_code for _ in range(30)}

    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1
    assert emulator.customers() == {}


def test_a_drop_closes_the_connection_without_a_response(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """rate_drop=1 closes the socket: the client sees a transport error, nothing is stored."""
    emulator.set_faults(rate_drop=1)

    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/ingest", json=record())

    assert emulator.ingested() == []
    assert emulator.requests() == [{"method": "POST", "path": "/ingest", "status": None}]
    assert emulator.stats()["requests"]["POST /ingest"] == {"drop": 1}


def test_latency_holds_the_answer_back(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """With latency far above the client's timeout, the client times out."""
    emulator.set_faults(latency_ms=10_000)

    with pytest.raises(httpx.ReadTimeout):
        api.get("/customers", timeout=0.2)


def test_fail_all_fails_api_routes_but_not_control_routes(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """fail_all answers 500 to the API while /_emulator/ still works, unfaulted."""
    emulator.set_faults(fail_all=True, rate_drop=1)

    with http(emulator.url, headers=KEY) as fresh:  # a drop would also close a reused one
        api_response = fresh.get("/customers")
    emulator.set_faults(rate_drop=0)
    control = [
        api.get("/_emulator/stats"),
        api.get("/_emulator/ingested"),
        api.put("/_emulator/faults", json={"fail_all": False}),
    ]

    assert api_response.status_code == 500
    assert [r.status_code for r in control] == [200, 200, 200]
    assert api.get("/customers").status_code == 200


def test_faults_can_be_set_at_start_up() -> None:
    """Fault options given to running_emulator apply from the first request."""
    options = EmulatorOptions(port=0, rate_429=1.0, retry_after=0.5)
    with running_emulator(options) as emulator, http(emulator.url, headers=KEY) as client:
        response = client.get("/customers")

    assert (response.status_code, response.headers["retry-after"]) == (429, "0.5")


def test_a_seed_replays_the_same_faults() -> None:
    """Two emulators with the same seed and settings fault the same requests."""
    runs = []
    for _ in range(2):
        options = EmulatorOptions(port=0, seed=42, rate_5xx=0.5, rate_429=0.3)
        with running_emulator(options) as emulator, http(emulator.url, headers=KEY) as client:
            runs.append([client.get("/customers").status_code for _ in range(40)])

    assert runs[0] == runs[1]
    assert {200, 429} <= set(runs[0])


def test_fault_settings_change_over_http(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """PUT /_emulator/faults changes the settings that GET /_emulator/faults reports."""
    changed = api.put("/_emulator/faults", json={"rate_429": 0.25, "latency_ms": 5}).json()

    assert api.get("/_emulator/faults").json() == changed
    assert (changed["rate_429"], changed["latency_ms"]) == (0.25, 5)
    assert emulator.faults() == changed


@pytest.mark.parametrize(
    "changes", [{"rate_429": 1.5}, {"rate_drop": -0.1}, {"latency": 5}, {"fail_all": "yes"}]
)
def test_bad_fault_settings_are_refused(
    emulator: EmulatorHandle, api: httpx.Client, changes: dict[str, Any]
) -> None:
    """Out-of-range rates and unknown names raise ConfigError, or 400 over HTTP."""
    with pytest.raises(ConfigError):
        emulator.set_faults(**changes)
    assert api.put("/_emulator/faults", json=changes).status_code == 400
    assert emulator.faults()["rate_429"] == 0


@pytest.mark.parametrize(
    "changes",
    [{"rate_5xx": 2}, {"port": -1}, {"put_missing": "upsert"}, {"api_keys": frozenset({""})}],
)
def test_bad_options_are_refused(changes: dict[str, Any]) -> None:
    """EmulatorOptions checks its fields on construction and names the one that is wrong."""
    with pytest.raises(ConfigError, match=next(iter(changes))):
        EmulatorOptions(**changes)


def test_a_port_in_use_is_a_config_error(emulator: EmulatorHandle) -> None:
    """Starting on a port that is taken raises ConfigError naming the address."""
    port = int(emulator.url.rsplit(":", 1)[-1])

    with (
        pytest.raises(ConfigError, match=f"127.0.0.1:{port}"),
        running_emulator(EmulatorOptions(port=port)),
    ):
        pass


# -- control routes ------------------------------------------------------------------------


def test_control_routes_report_what_the_api_received(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """/_emulator/ reads customers, records, stats and the request log, without counting
    itself and without an API key."""
    api.post("/customers", json=customer())
    api.post("/ingest", json=record())
    api.get("/customers", params={"customerId": "c1"})
    with http(f"{emulator.url}/_emulator") as control:
        customers = control.get("/customers").json()
        ingested = control.get("/ingested").json()
        requests = control.get("/requests").json()
        stats = control.get("/stats").json()

    assert customers == emulator.customers()
    assert ingested == [record()]
    assert requests == [
        {"method": "POST", "path": "/customers", "status": 200},
        {"method": "POST", "path": "/ingest", "status": 200},
        {"method": "GET", "path": "/customers?customerId=c1", "status": 200},
    ]
    assert stats["requests"] == {
        "POST /customers": {"200": 1},
        "POST /ingest": {"200": 1},
        "GET /customers": {"200": 1},
    }
    assert stats == emulator.stats()


def test_reset_forgets_everything(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """POST /_emulator/reset clears data and counters and restores the start-up faults."""
    api.post("/customers", json=customer())
    api.post("/ingest", json=record())
    emulator.set_faults(rate_429=0.5)

    assert api.post("/_emulator/reset").status_code == 200

    assert (emulator.customers(), emulator.ingested(), emulator.requests()) == ({}, [], [])
    assert emulator.stats()["records_received"] == 0
    assert emulator.faults()["rate_429"] == 0
    emulator.set_faults(rate_drop=1)
    emulator.reset()
    assert api.get("/customers").status_code == 200


def test_handle_reads_are_copies(emulator: EmulatorHandle, api: httpx.Client) -> None:
    """Changing what the handle returned does not change the emulator's data."""
    api.post("/customers", json=customer(traits={"a": "1"}))
    api.post("/ingest", json=record())

    emulator.customers()["c1"]["traits"]["a"] = "changed"
    emulator.ingested()[0]["dimensions"]["path"] = "changed"

    assert emulator.customers()["c1"]["traits"] == {"a": "1"}
    assert emulator.ingested() == [record()]


# -- HTTP/1.1 framing ----------------------------------------------------------------------


def test_one_connection_serves_pipelined_requests_in_order(emulator: EmulatorHandle) -> None:
    """Requests sent back to back on one connection get their answers in order."""
    body = json.dumps(record()).encode()
    ingest = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    lookup = b"GET /customers?customerId=c1 HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
    closing = lookup + b"Connection: close\r\n\r\n"

    reply = raw_exchange(emulator.url, ingest + lookup + b"\r\n" + closing)

    assert reply.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert reply.index(b"1 records were ingested") < reply.index(b"\r\n\r\n{}")
    assert reply.endswith(b"{}")
    assert b"Connection: close" in reply


def test_expect_100_continue_is_answered(emulator: EmulatorHandle) -> None:
    """A client that waits for 100 Continue gets it before sending its body."""
    body = json.dumps(record()).encode()
    head = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    host, port = emulator.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        interim = sock.recv(100)
        sock.sendall(body)
        final = sock.recv(1000)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"POST /ingest HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"POST /ingest HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST /ingest HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
    ],
    ids=["request-line", "version", "folding", "too-large", "coding", "two-lengths"],
)
def test_malformed_http_is_answered_and_closed(
    emulator: EmulatorHandle, payload: bytes, status: int
) -> None:
    """Bytes that are not acceptable HTTP/1.1 get an error status and a closed connection."""
    reply = raw_exchange(emulator.url, payload)

    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close" in reply


def test_the_parser_handles_input_split_anywhere() -> None:
    """Fed one byte at a time, the parser still yields the same requests."""
    wire = (
        b"\r\nPOST /ingest HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
        b"GET / HTTP/1.0\r\nA: 1\r\nA: 2\r\n\r\n"
    )
    parser = RequestParser(max_body=100)
    requests = []
    for byte in wire:
        parser.feed(bytes([byte]))
        while (request := parser.next_request()) is not None:
            requests.append(request)

    assert [(r.method, r.target, r.body, r.keep_alive) for r in requests] == [
        ("POST", "/ingest", b"hello", True),
        ("PUT", "/c", b"abcde", True),
        ("GET", "/", b"", False),
    ]
    assert requests[2].headers == {"a": "1, 2"}


def test_the_parser_caps_chunked_bodies() -> None:
    """A chunked body over the limit is refused with 413 before it is read."""
    parser = RequestParser(max_body=4)
    parser.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n")

    with pytest.raises(WireError) as caught:
        parser.next_request()
    assert caught.value.status == 413


# -- serve() -------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    """serve() announces its URL on stdout, answers requests and exits 0 on SIGTERM."""
    code = "from sync.emulator import EmulatorOptions, serve; serve(EmulatorOptions(port=0))"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        url = line.rsplit(" ", 1)[-1].strip()
        with http(url) as idle:  # a keep-alive connection still open at shutdown
            response = idle.post("/customers", json=customer(), headers=KEY)
            child.send_signal(signal.SIGTERM)
            stdout, stderr = child.communicate(timeout=10)
    finally:
        child.kill()
        child.wait()

    assert line.startswith("Amberflo emulator listening on http://127.0.0.1:")
    assert response.status_code == 200
    assert child.returncode == 0, stderr
    assert "emulator_stopped" in stdout + stderr


def test_rejected_customers_are_refused_with_400_and_others_go_through(
    emulator: EmulatorHandle, api: httpx.Client
) -> None:
    """reject_customers answers 400 with a message to POST and PUT of those ids only."""
    emulator.set_faults(reject_customers=["bad-1"])

    post = api.post("/customers", json=customer(customerId="bad-1"))
    put = api.put("/customers", json=customer(customerId="bad-1"))
    fine = api.post("/customers", json=customer(customerId="good-1"))
    over_http = api.put("/_emulator/faults", json={"reject_customers": []}).json()
    after = api.post("/customers", json=customer(customerId="bad-1"))

    assert (post.status_code, put.status_code) == (400, 400)
    assert "bad-1" in post.json()["message"]
    assert fine.status_code == 200
    assert over_http["reject_customers"] == []
    assert after.status_code == 200
    assert sorted(emulator.customers()) == ["bad-1", "good-1"]


@pytest.mark.parametrize("value", ["bad-1", [""], [3], None])
def test_reject_customers_must_be_a_list_of_ids(emulator: EmulatorHandle, value: Any) -> None:
    """A lone string, a blank id or a non-string id is refused rather than misread."""
    with pytest.raises(ConfigError, match="reject_customers"):
        emulator.set_faults(reject_customers=value)
    assert emulator.faults()["reject_customers"] == []


@pytest.mark.parametrize(
    "record",
    [
        {"customerId": "c", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 5},
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": 2.5,
            "meterTimeInMillis": 5,
            "uniqueId": "u",
            "dimensions": {"region": "us-east-1"},
            "extra": 1,
        },
        {"customerId": " ", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 5},
        {"customerId": "c", "meterApiName": "m", "meterValue": True, "meterTimeInMillis": 5},
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": float("nan"),
            "meterTimeInMillis": 5,
        },
        {"customerId": "c", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 0},
        {"customerId": "c", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 5.0},
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": 1,
            "meterTimeInMillis": 5,
            "uniqueId": 7,
        },
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": 1,
            "meterTimeInMillis": 5,
            "dimensions": {"a/b": "x"},
        },
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": 1,
            "meterTimeInMillis": 5,
            "dimensions": {"a": 1},
        },
        {
            "customerId": "c",
            "meterApiName": "m",
            "meterValue": 1,
            "meterTimeInMillis": 5,
            "dimensions": None,
            "uniqueId": None,
        },
        ["not", "an", "object"],
    ],
)
def test_the_quick_record_check_agrees_with_the_field_by_field_one(record: object) -> None:
    """The usual-record fast path stores what the full check stores and refuses nothing the
    full check accepts (and the reverse): the same record, or the same error."""

    def outcome(check: Any) -> Any:
        try:
            return check(3, record)
        except HttpError as exc:
            return exc.status, exc.body

    assert outcome(validate_record) == outcome(_validate_record_field_by_field)
