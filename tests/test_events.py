"""The Segment -> Amberflo mapping, rule by rule (sync.events)."""

from __future__ import annotations

import json
import math
import string
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.amberflo import encode_json
from sync.events import (
    IdentifyEvent,
    MeterEvent,
    Rejected,
    Skipped,
    is_enabled,
    map_message,
)
from sync.model import CustomerRecord

TS = "2021-04-26T14:01:46.909Z"
MS = 1619445706909


def msg(kind: str = "track", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind, "messageId": "m-1", "userId": "u-1", "timestamp": TS}
    if kind == "track":
        base["event"] = "ApiCalls"
    base.update(fields)
    return {key: value for key, value in base.items() if value is not ...}


def record(message: object) -> dict[str, Any]:
    mapped = map_message(message)
    assert isinstance(mapped, MeterEvent), mapped
    return mapped.as_record()


# (message, expected meter record) for every meter rule.
METER_CASES = [
    pytest.param(
        msg("page", name="Home", properties={"title": "Welcome | Initech"}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "page",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"name": "Home", "title": "Welcome _ Initech"},
        },
        id="page-name-and-properties",
    ),
    pytest.param(
        msg("screen", name="Home"),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "screen",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"name": "Home"},
        },
        id="screen-name-only",
    ),
    pytest.param(
        msg("page"),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "page",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
        },
        id="no-dimensions-key-when-empty",
    ),
    pytest.param(
        msg(properties={"value": 2.0, "region": "us-west-2"}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 2.0,
            "meterTimeInMillis": MS,
            "dimensions": {"region": "us-west-2"},
        },
        id="track-value-and-other-properties",
    ),
    pytest.param(
        msg(properties={"value": 3}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 3.0,
            "meterTimeInMillis": MS,
        },
        id="track-int-value-is-a-float",
    ),
    pytest.param(
        msg(properties={"value": None, "plan": "pro"}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"plan": "pro"},
        },
        id="track-null-value-means-one",
    ),
    pytest.param(
        msg(userId=None, anonymousId="anon-7"),
        {
            "uniqueId": "m-1",
            "customerId": "anon-7",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
        },
        id="anonymous-id-when-no-user-id",
    ),
    pytest.param(
        msg(userId="", anonymousId="anon-7"),
        {
            "uniqueId": "m-1",
            "customerId": "anon-7",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
        },
        id="empty-user-id-counts-as-missing",
    ),
    pytest.param(
        msg(userId=42),
        {
            "uniqueId": "m-1",
            "customerId": "42",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
        },
        id="numeric-user-id-is-stringified",
    ),
    pytest.param(
        msg(
            properties={
                "a": {"b": {"c": 1}, "d": True},
                "tags": ["x", "y", 3],
                "url": "https://segment.com/a?b=c#d",
                "empty": "",
                "missing": None,
                "émoji🙂": "ok",
            }
        ),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {
                "a.b.c": "1",
                "a.d": "true",
                "tags": "x,y,3",
                "url": "https:__segment.com_a?b=c_d",
                "_moji_": "ok",
            },
        },
        id="flatten-join-sanitise-and-drop-empty",
    ),
    pytest.param(
        msg(properties={"a/b": "first", "a|b": "second"}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"a_b": "first"},
        },
        id="keys-equal-after-sanitising-keep-the-first",
    ),
    pytest.param(
        msg(properties={"long": "x" * 250}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"long": "x" * 200},
        },
        id="values-cut-to-200",
    ),
    pytest.param(
        msg("page", name="Home", properties={"name": "Other", "path": "/home"}),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "page",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
            "dimensions": {"name": "Home", "path": "_home"},
        },
        id="page-name-wins-over-properties-name",
    ),
    pytest.param(
        msg(type="TRACK"),
        {
            "uniqueId": "m-1",
            "customerId": "u-1",
            "meterApiName": "ApiCalls",
            "meterValue": 1.0,
            "meterTimeInMillis": MS,
        },
        id="type-is-case-insensitive",
    ),
]


@pytest.mark.parametrize(("message", "expected"), METER_CASES)
def test_meter_mapping(message: dict[str, Any], expected: dict[str, Any]) -> None:
    """Page, screen and track map to the documented meter record, keys in wire order."""
    result = record(message)
    assert result == expected
    assert list(result) == list(expected)


TIMESTAMP_CASES = [
    pytest.param({"timestamp": "2021-04-26T14:01:46.909Z"}, MS, id="z-suffix"),
    pytest.param({"timestamp": "2021-04-26T14:01:46.909+00:00"}, MS, id="plus-zero-offset"),
    pytest.param({"timestamp": "2021-04-26T16:01:46.909+02:00"}, MS, id="other-offset"),
    pytest.param({"timestamp": "2021-04-26T14:01:46.909876Z"}, MS, id="microseconds-floor"),
    pytest.param({"timestamp": "2021-04-26T14:01:46Z"}, MS - 909, id="whole-seconds"),
    pytest.param({"timestamp": "2021-04-26T14:01:46.909"}, MS, id="no-offset-is-utc"),
    pytest.param(
        {"timestamp": None, "originalTimestamp": "2021-04-26T14:01:46.909Z"},
        MS,
        id="falls-back-to-original-timestamp",
    ),
    pytest.param(
        {"timestamp": "yesterday", "receivedAt": "2021-04-26T14:01:46.909Z"},
        MS,
        id="unparseable-falls-back-to-received-at",
    ),
]


@pytest.mark.parametrize(("fields", "millis"), TIMESTAMP_CASES)
def test_timestamp_rules(fields: dict[str, Any], millis: int) -> None:
    """meterTimeInMillis is the first usable of timestamp, originalTimestamp, receivedAt."""
    assert record(msg(**fields))["meterTimeInMillis"] == millis


# (message, expected result) for every rule that skips or rejects.
OTHER_CASES = [
    pytest.param(["not", "an", "object"], Rejected("message is not a JSON object but an array")),
    pytest.param(None, Rejected("message is not a JSON object but null")),
    pytest.param(msg(type=...), Rejected("message has no type")),
    pytest.param(msg(type=7), Rejected("message type is not a string: 7")),
    pytest.param(msg(type="purchase"), Rejected("unknown message type: 'purchase'")),
    pytest.param(msg("group", groupId="g"), Skipped("group calls are not forwarded")),
    pytest.param(msg("alias", previousId="p"), Skipped("alias calls are not forwarded")),
    pytest.param(msg(integrations={"Amberflo": False}), Skipped("integrations disables Amberflo")),
    pytest.param(msg(integrations={"All": False}), Skipped("integrations disables Amberflo")),
    pytest.param(
        msg("identify", integrations={"All": False, "Amberflo": 0}),
        Skipped("integrations disables Amberflo"),
    ),
    pytest.param(
        msg(userId=None, anonymousId=None),
        Rejected("track has neither userId nor anonymousId"),
    ),
    pytest.param(msg("page", userId="  "), Rejected("page has neither userId nor anonymousId")),
    pytest.param(msg(event=...), Rejected("track without an event name")),
    pytest.param(msg(event=""), Rejected("track without an event name")),
    pytest.param(msg(properties={"value": "abc"}), Rejected("track value is not a number: 'abc'")),
    pytest.param(msg(properties={"value": "2.5"}), Rejected("track value is not a number: '2.5'")),
    pytest.param(msg(properties={"value": True}), Rejected("track value is not a number: True")),
    pytest.param(
        msg(properties={"value": {"n": 1}}), Rejected("track value is not a number: {'n': 1}")
    ),
    pytest.param(
        msg(properties={"value": float("nan")}), Rejected("track value is not finite: nan")
    ),
    pytest.param(
        msg(properties={"value": 10**400}),
        Rejected(f"track value is too large: {str(10**400)[:57]}..."),
    ),
    pytest.param(msg(properties=["a"]), Rejected("track properties is not an object but an array")),
    pytest.param(msg(timestamp=...), Rejected("message has no timestamp")),
    pytest.param(
        msg(timestamp="26/04/2021"),
        Rejected("timestamp is not an ISO 8601 time: '26/04/2021'"),
    ),
    pytest.param(
        msg(timestamp=1619445706909),
        Rejected("timestamp is not an ISO 8601 time: 1619445706909"),
    ),
    pytest.param(
        msg(timestamp="1969-07-20T20:17:40Z"),
        Rejected("timestamp is not after 1970: '1969-07-20T20:17:40Z'"),
    ),
    pytest.param(
        msg("identify", userId=None, anonymousId="anon-7", traits={"plan": "pro"}),
        Rejected("identify without userId"),
    ),
    pytest.param(
        msg("identify", traits="premium"),
        Rejected("identify traits is not an object but a string"),
    ),
]


@pytest.mark.parametrize(("message", "expected"), OTHER_CASES)
def test_skip_and_reject_rules(message: object, expected: Skipped | Rejected) -> None:
    """Messages that are not for Amberflo are skipped; ones that cannot be mapped are rejected."""
    assert map_message(message) == expected


INTEGRATIONS_CASES = [
    (None, True),
    ({}, True),
    ({"Amberflo": False}, False),
    ({"All": False}, False),
    ({"All": False, "Amberflo": True}, True),
    ({"All": True, "Amberflo": False}, False),
    ({"All": False, "Amberflo": {"region": "eu"}}, True),
    ({"Mixpanel": False}, True),
    ("not an object", True),
]


@pytest.mark.parametrize(("integrations", "enabled"), INTEGRATIONS_CASES)
def test_integrations_rule(integrations: object, enabled: bool) -> None:
    """Amberflo's own flag wins, else All, else enabled; a truthy options object enables."""
    assert is_enabled(integrations) is enabled


def test_identify_maps_to_a_customer_record() -> None:
    """Identify becomes a customer: name and email apart, other traits flattened and wire-safe."""
    message = msg(
        "identify",
        traits={
            "name": "John Doe",
            "email": "john.doe@email.com",
            "logins": 5,
            "vip": True,
            "address": {"city": "San Francisco", "zip": "94107"},
            "avatar": "https://s3.amazonaws.com/x.jpg",
            "nickname": None,
        },
    )
    assert map_message(message) == IdentifyEvent(
        CustomerRecord(
            customer_id="u-1",
            name="John Doe",
            email="john.doe@email.com",
            traits={
                "logins": "5",
                "vip": "true",
                "address.city": "San Francisco",
                "address.zip": "94107",
                "avatar": "https:__s3.amazonaws.com_x.jpg",
            },
        )
    )


def test_identify_without_traits_keeps_name_unset() -> None:
    """An identify with no traits still upserts the customer, leaving the name to delivery."""
    assert map_message(msg("identify")) == IdentifyEvent(CustomerRecord(customer_id="u-1"))


def test_identify_name_and_email_go_as_they_are() -> None:
    """customerName and customerEmail are not passed through the dimension rule."""
    mapped = map_message(msg("identify", traits={"name": "Zoë / Ops", "email": "z+1@x.io"}))
    assert isinstance(mapped, IdentifyEvent)
    assert (mapped.customer.name, mapped.customer.email) == ("Zoë / Ops", "z+1@x.io")


def test_identify_blank_name_and_email_count_as_absent() -> None:
    """A blank traits.name or traits.email is left unset rather than sent blank."""
    mapped = map_message(msg("identify", traits={"name": "  ", "email": ""}))
    assert mapped == IdentifyEvent(CustomerRecord(customer_id="u-1"))


def test_missing_message_id_gets_a_stable_derived_unique_id() -> None:
    """Without messageId the uniqueId is a digest of the message: stable, and distinct per
    message, so a re-sent file still deduplicates."""
    first = record(msg(messageId=...))
    again = record(msg(messageId=...))
    other = record(msg(messageId=..., properties={"region": "eu"}))
    assert first["uniqueId"] == again["uniqueId"]
    assert first["uniqueId"].startswith("sha256-")
    assert other["uniqueId"] != first["uniqueId"]


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


property_names = st.text(max_size=12).filter(lambda name: name != "value")


@given(properties=st.dictionaries(property_names, json_values, max_size=6))
def test_records_are_deterministic_and_wire_safe(properties: dict[str, Any]) -> None:
    """Any properties give the same bytes twice, and every dimension passes Amberflo's rule."""
    message = msg(properties=properties)
    first = json.dumps(record(message), separators=(",", ":"))
    second = json.dumps(record(json.loads(json.dumps(message))), separators=(",", ":"))
    assert first == second
    decoded = json.loads(first)
    assert decoded.get("dimensions", None) != {}  # an empty object is never emitted
    dimensions = decoded.get("dimensions", {})
    allowed = set("-_ !.*'()&$@=;:+,?" + string.digits + string.ascii_letters)
    for key, value in dimensions.items():
        assert 1 <= len(key) <= 200
        assert 1 <= len(value) <= 200
        assert set(key) <= allowed
        assert set(value) <= allowed


ids = st.text(max_size=10) | st.sampled_from(['a"b\\c', "zoë\n", "\u2028", "x" * 50])


@given(
    unique_id=ids,
    customer_id=ids,
    meter=ids,
    properties=st.dictionaries(property_names, json_values, max_size=6),
    value=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**20), 10**20),
)
def test_record_bytes_are_exactly_what_the_client_encodes(
    unique_id: str, customer_id: str, meter: str, properties: dict[str, Any], value: float
) -> None:
    """The record's JSON bytes equal encode_json of its record, escapes and numbers included,
    so batches built from either are byte-identical on the wire."""
    message = msg(messageId=unique_id, userId=customer_id, event=meter)
    message["properties"] = {**properties, "value": value}
    mapped = map_message(message)
    if isinstance(mapped, MeterEvent):
        assert mapped.as_json() == encode_json(mapped.as_record())


@pytest.mark.parametrize(
    "meter",
    [
        MeterEvent("m", "u", "api", 3, MS),  # type: ignore[arg-type]
        MeterEvent("m", "u", "api", 1.0, True, (("a", "b"),)),  # type: ignore[arg-type]
        MeterEvent("m", "u", "api", math.nan, MS),
        MeterEvent("m\ud800", "u", "api", 1.0, MS),
    ],
    ids=["int-value", "bool-time", "nan", "lone-surrogate"],
)
def test_odd_records_encode_or_fail_as_the_client_would(meter: MeterEvent) -> None:
    """Shapes the mapping never makes still give encode_json's bytes, or its error."""
    try:
        expected: bytes | str = encode_json(meter.as_record())
    except ValueError as exc:
        expected = repr(exc)
    try:
        got: bytes | str = meter.as_json()
    except ValueError as exc:
        got = repr(exc)
    assert got == expected


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1e-4, 9.9999e-5, 1e-5, 0.1, 2.5, -3.75, 1e15, 9999999999999998.0, 1e16, 1e300],
)
def test_values_on_either_side_of_the_exponent_boundary_encode_as_the_client_would(
    value: float,
) -> None:
    """Where Python starts writing floats with an exponent (below 1e-4, from 1e16), the
    record's bytes still equal encode_json's."""
    meter = MeterEvent("m", "u", "api", value, MS, (("zoë", "a\u2028b"),))
    assert meter.as_json() == encode_json(meter.as_record())


@given(st.datetimes(timezones=st.just(UTC)))
def test_a_timestamp_becomes_its_floored_milliseconds_since_1970(moment: datetime) -> None:
    """Any time of any year, before 1970 too, maps to floor((t - 1970) / 1 ms), the exact
    integer arithmetic of timedeltas."""
    expected = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    stamp = moment.isoformat()
    mapped = map_message(msg(timestamp=stamp))
    if expected > 0:
        assert isinstance(mapped, MeterEvent)
        assert mapped.meter_time_ms == expected
    else:
        assert isinstance(mapped, Rejected)
        assert "after 1970" in mapped.reason


def test_mapping_events_loads_neither_pandas_nor_numpy() -> None:
    """Reading and mapping events, numbers and lists included, never imports pandas, numpy
    or pyarrow: the events command would pay for their import on every run."""
    script = (
        "import sys\n"
        "from sync.events import map_message\n"
        "from sync.event_input import read_stream\n"
        "import io\n"
        'line = b\'{"type":"track","event":"e","userId":1,"timestamp":"2024-01-01T00:00:00Z",'
        '"properties":{"n":5,"f":2.5,"l":[1,"a"],"b":true,"x":null}}\'\n'
        "[event] = read_stream(io.BytesIO(line), 's')\n"
        "print(dict(map_message(event.message).dimensions))\n"
        "print(sorted({'pandas', 'numpy', 'pyarrow'} & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == ["{'n': '5', 'f': '2.5', 'l': '1,a', 'b': 'true'}", "[]"]
