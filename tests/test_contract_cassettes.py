"""Contract tests: the destination page's four examples, as recorded HTTP exchanges.

Each example of ``spec/000_7123ee1c1603645f.txt`` (page, screen, identify, track) is built as a
Segment message, mapped by the real :func:`sync.events.map_message` and sent by the real
:class:`sync.amberflo.AmberfloClient` over httpx's real transport, given explicitly: without
one the client writes to its sockets itself and never calls ``httpx.Client``, which is where
vcrpy hooks in. vcrpy records the exchange into ``cassettes/<example>.yaml``; by default the tests
replay them with ``record_mode="none"``, so the code must still produce exactly the recorded
requests (method, path and body). ``CASSETTE_RECORD=1`` re-records them against the bundled
emulator (see ``cassettes/README.md``).

The second test of each example reads the cassette file itself and checks the recorded request
against the page's curl example, apart from the deviations listed in ``cassettes/README.md``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import vcr
import yaml
from vcr.request import Request as VcrRequest

from sync.amberflo import AmberfloClient
from sync.deliver import CustomerWriter
from sync.emulator import EmulatorOptions, running_emulator
from sync.events import IdentifyEvent, MeterEvent, map_message

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"
RECORDING = os.environ.get("CASSETTE_RECORD") == "1"
# The emulator's default address (`amberflo-sync emulator`): recordings are rewritten to it, so
# a re-recording on another free port does not change every line of every cassette.
RECORDED_BASE_URL = "http://127.0.0.1:8484"
API_KEY = "cassette-test-key-not-a-secret"

# The page's examples put the message id and a fixed time in the body; these reproduce both.
MESSAGE_ID = "messageId"
TIMESTAMP = "2021-04-26T14:01:46.909Z"
MILLIS = 1619445706909

MESSAGES: dict[str, dict[str, Any]] = {
    "page": {
        "type": "page",
        "userId": "some_user_id",
        "name": "Home",
        "properties": {
            "title": "Welcome | Initech",
            "keywords": "paper,comedy",
            "search": "schrute farms",
            "referrer": "https://google.com",
            "path": "/home",
            "browser": "Chrome",
            "url": "https://segment.com",
        },
    },
    "screen": {
        "type": "screen",
        "userId": "some_user_id",
        "name": "Home",
        "properties": {"title": "Welcome | Initech"},
    },
    "identify": {
        "type": "identify",
        "userId": "some_user_id",
        "traits": {
            "name": "John Doe",
            "email": "john.doe@email.com",
            "plan": "premium",
            "logins": 5,
            "phone": "650-769-3240",
            "username": "marakasina",
            "website": "example.com",
            "avatar": "https://s3.amazonaws.com/uifaces/faces/twitter/scottkclark/128.jpg",
        },
    },
    "track": {
        "type": "track",
        "userId": "some_user_id",
        "event": "ApiCalls",
        "properties": {"value": 2.0, "region": "us-west-2"},
    },
}

# The bodies of the page's curl examples, transcribed. The page example's body is not valid
# JSON as printed (its "dimensions": { line is missing); it is given here with that line back.
SEED_BODIES: dict[str, dict[str, Any]] = {
    "page": {
        "uniqueId": "messageId",
        "customerId": "some_user_id",
        "meterApiName": "page",
        "meterValue": 1.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {
            "title": "Welcome _ Initech",
            "keywords": "paper,comedy",
            "search": "schrute farms",
            "referrer": "https:__google.com",
            "path": "_home",
            "browser": "Chrome",
            "url": "https:__segment.com",
        },
    },
    "screen": {
        "uniqueId": "messageId",
        "customerId": "some_user_id",
        "meterApiName": "screen",
        "meterValue": 1.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {"name": "Home", "title": "Welcome _ Initech"},
    },
    "identify": {
        "customerId": "some_user_id",
        "customerName": "John Doe",
        "customerEmail": "john.doe@email.com",
        "traits": {
            "plan": "premium",
            "logins": 5,
            "phone": "650-769-3240",
            "username": "marakasina",
            "website": "example.com",
            "avatar": "https:__s3.amazonaws.com_uifaces_faces_twitter_scottkclark_128.jpg",
        },
    },
    "track": {
        "uniqueId": "messageId",
        "customerId": "some_user_id",
        "meterApiName": "ApiCalls",
        "meterValue": 2.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {"region": "us-west-2"},
    },
}


def expected_body(example: str) -> dict[str, Any]:
    """The seed body with the documented deviations (cassettes/README.md) applied."""
    body = json.loads(json.dumps(SEED_BODIES[example]))
    if example == "page":
        # Page carries its name as a dimension, like screen does on the same page.
        body["dimensions"] = {"name": "Home", **body["dimensions"]}
    if example == "identify":
        # Amberflo documents traits as a string map.
        body["traits"] = {key: str(value) for key, value in body["traits"].items()}
    return body


def message(example: str) -> dict[str, Any]:
    return {**MESSAGES[example], "messageId": MESSAGE_ID, "timestamp": TIMESTAMP}


def _rewrite_host(request: VcrRequest) -> VcrRequest:
    parts = urlsplit(request.uri)
    request.uri = RECORDED_BASE_URL + parts.path + (f"?{parts.query}" if parts.query else "")
    if "host" in request.headers:
        request.headers["host"] = urlsplit(RECORDED_BASE_URL).netloc
    return request


def _drop_date(response: dict[str, Any]) -> dict[str, Any]:
    # The date changes on every recording and says nothing about the contract.
    response["headers"] = {k: v for k, v in response["headers"].items() if k.lower() != "date"}
    return response


RECORDER = vcr.VCR(
    cassette_library_dir=str(CASSETTES),
    record_mode="all" if RECORDING else "none",
    match_on=["method", "path", "body"],
    filter_headers=["x-api-key"],
    before_record_request=_rewrite_host,
    before_record_response=_drop_date,
)


@contextmanager
def base_url() -> Iterator[str]:
    """The emulator while recording; while replaying, an address vcrpy answers for."""
    if not RECORDING:
        yield RECORDED_BASE_URL
        return
    with running_emulator(EmulatorOptions(port=0)) as emulator:
        yield emulator.url


def send(example: str, url: str) -> None:
    """Map the example and send it the way `amberflo-sync events` does."""
    mapped = map_message(message(example))
    # vcrpy hooks into httpx.Client; a transport keeps the client on that path.
    transport = httpx.HTTPTransport()
    with AmberfloClient(api_key=API_KEY, base_url=url, timeout=5.0, transport=transport) as client:
        if isinstance(mapped, MeterEvent):
            assert client.ingest([mapped.as_record()]) == 1
        else:
            assert isinstance(mapped, IdentifyEvent)
            outcome = CustomerWriter(client, mode="merge").upsert(mapped.customer)
            assert outcome.ok, outcome


def interactions(example: str) -> list[dict[str, Any]]:
    text = (CASSETTES / f"{example}.yaml").read_text(encoding="utf-8")
    loaded: list[dict[str, Any]] = yaml.safe_load(text)["interactions"]
    return loaded


def body_json(request: dict[str, Any]) -> Any:
    body = request["body"]
    raw = body if isinstance(body, bytes) else body.encode()
    if lower_headers(request).get("content-encoding") == ["gzip"]:
        raw = gzip.decompress(raw)
    return json.loads(raw)


def lower_headers(request: dict[str, Any]) -> dict[str, list[str]]:
    return {name.lower(): values for name, values in request["headers"].items()}


@pytest.mark.parametrize("example", sorted(MESSAGES))
def test_the_code_sends_exactly_the_recorded_requests(example: str) -> None:
    """Replaying the cassette, the real mapping and client make every recorded request, and
    no other (method, path and body must match byte for byte)."""
    with RECORDER.use_cassette(f"{example}.yaml") as cassette, base_url() as url:
        send(example, url)
    if not RECORDING:
        assert cassette.all_played
        assert cassette.play_count == len(cassette.data)


@pytest.mark.parametrize("example", ["page", "screen", "track"])
def test_meter_cassette_matches_the_destination_page(example: str) -> None:
    """Page, screen and track are one POST /ingest with the seed's record, gzipped, in an
    array, headers as on the page and no API key on file."""
    [exchange] = interactions(example)
    request, response = exchange["request"], exchange["response"]
    headers = lower_headers(request)
    assert request["method"] == "POST"
    assert urlsplit(request["uri"]).path == "/ingest"
    assert headers["content-type"] == ["application/json"]
    assert headers["accept"] == ["application/json"]
    assert headers["content-encoding"] == ["gzip"]
    assert "x-api-key" not in headers
    assert body_json(request) == [expected_body(example)]
    assert response["status"]["code"] == 200
    assert response["body"]["string"] == "1 records were ingested"


def test_identify_cassette_matches_the_destination_page() -> None:
    """Identify reads the customer (merge mode), finds none, and creates it with the seed's
    body, trait values as strings; no API key on file."""
    lookup, create = interactions("identify")
    assert lookup["request"]["method"] == "GET"
    lookup_uri = urlsplit(lookup["request"]["uri"])
    assert lookup_uri.path == "/customers"
    assert parse_qs(lookup_uri.query) == {"customerId": ["some_user_id"]}
    assert lookup["response"]["body"]["string"] == "{}"

    request = create["request"]
    headers = lower_headers(request)
    assert request["method"] == "POST"
    assert urlsplit(request["uri"]).path == "/customers"
    assert headers["content-type"] == ["application/json"]
    assert headers["accept"] == ["application/json"]
    assert "x-api-key" not in headers
    assert body_json(request) == expected_body("identify")
    assert create["response"]["status"]["code"] == 200


@pytest.mark.parametrize("example", sorted(MESSAGES))
def test_no_cassette_holds_the_api_key(example: str) -> None:
    """The key header is filtered out when recording, so no cassette file contains it."""
    text = (CASSETTES / f"{example}.yaml").read_text(encoding="utf-8")
    assert "x-api-key" not in text.lower()
    assert API_KEY not in text
