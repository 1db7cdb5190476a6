"""Segment messages -> Amberflo meter records and customer upserts (pure: no I/O).

:func:`map_message` turns one decoded Segment message into exactly one of:

- :class:`MeterEvent`: page, screen and track, as one ``POST /ingest`` record;
- :class:`IdentifyEvent`: identify, as a :class:`~sync.model.CustomerRecord` to upsert;
- :class:`Skipped`: a message this destination is not meant to receive (group, alias, or
  ``integrations`` turning Amberflo off): counted by reason, not an error;
- :class:`Rejected`: a message that cannot be mapped without guessing: dead-lettered with the
  reason.

The mapping follows the destination page (``spec/000_7123ee1c1603645f.txt``) and DESIGN.md "The
events path". Records are deterministic: the same message always gives the same record, keys in
the same order (``uniqueId, customerId, meterApiName, meterValue, meterTimeInMillis,
dimensions``), because Amberflo deduplicates on the whole record and a re-sent file must dedup
rather than bill twice. That is also why no rule ever looks at the clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeAlias

import orjson

from sync.keys import dimension_safe, format_value, wire_value
from sync.model import CustomerRecord

__all__ = [
    "DESTINATION",
    "IdentifyEvent",
    "Mapped",
    "MeterEvent",
    "Rejected",
    "Skipped",
    "is_enabled",
    "map_message",
]

DESTINATION: Final = "Amberflo"
"""The destination's name in a message's ``integrations`` object (Segment's catalog name)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_TIMESTAMP_FIELDS: Final = ("timestamp", "originalTimestamp", "receivedAt")
_SKIPPED_TYPES: Final = frozenset({"group", "alias"})
_MAPPED_TYPES: Final = frozenset({"page", "screen", "track", "identify"})
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_MAX_SHOWN_VALUE: Final = 60
# Python writes a float in this range (and zero) without an exponent, as orjson does; outside
# it the two differ ("1e-05" against "1e-5").
_PLAIN_FLOATS_FROM: Final = 1e-4
_PLAIN_FLOATS_TO: Final = 1e16


class MeterEvent(NamedTuple):
    """One meter record for ``POST /ingest``; :meth:`as_record` gives it in wire key order.

    Immutable like the other results, but a named tuple: one is built per event, four times
    faster than a frozen dataclass.
    """

    unique_id: str
    customer_id: str
    meter_api_name: str
    meter_value: float
    meter_time_ms: int
    dimensions: tuple[tuple[str, str], ...] = ()

    def as_record(self) -> dict[str, Any]:
        """The record as Amberflo takes it; no ``dimensions`` key when there are none."""
        record: dict[str, Any] = {
            "uniqueId": self.unique_id,
            "customerId": self.customer_id,
            "meterApiName": self.meter_api_name,
            "meterValue": self.meter_value,
            "meterTimeInMillis": self.meter_time_ms,
        }
        if self.dimensions:
            record["dimensions"] = dict(self.dimensions)
        return record

    def as_json(self) -> bytes:
        """:meth:`as_record` as compact JSON in UTF-8: the bytes ``sync.amberflo.encode_json``
        makes of it, built directly because a run serializes one record per event.

        Raises ``ValueError`` where ``encode_json`` would: a value that is not finite, or text
        that cannot be UTF-8 (a lone surrogate).
        """
        value = self.meter_value
        if (
            type(value) is float
            and (_PLAIN_FLOATS_FROM <= abs(value) < _PLAIN_FLOATS_TO or value == 0.0)
            and type(self.meter_time_ms) is int
        ):
            # orjson writes such a record in about half the time, with the very bytes of the
            # standard encoder: the same escapes, and the same digits for a float written
            # without an exponent (tests/test_events.py compares them).
            try:
                return orjson.dumps(self.as_record())
            except orjson.JSONEncodeError:
                pass
        # Other numbers (an exponent, an int value, NaN), text orjson refuses (a lone
        # surrogate) and 64-bit overflows take the standard encoder, with its output and errors.
        return _ENCODER.encode(self.as_record()).encode()


@dataclass(frozen=True, slots=True)
class IdentifyEvent:
    """An identify call, as the customer record to upsert in the configured write mode."""

    customer: CustomerRecord


@dataclass(frozen=True, slots=True)
class Skipped:
    """Not for this destination; ``reason`` is a short stable string used as a count key."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Cannot be mapped without guessing; ``reason`` says what is wrong and goes to dead letters."""

    reason: str


Mapped: TypeAlias = MeterEvent | IdentifyEvent | Skipped | Rejected


def is_enabled(integrations: object) -> bool:
    """Segment's rule: ``integrations["Amberflo"]`` if present, else ``integrations["All"]``,
    else enabled. A truthy non-bool (an options object, as analytics.js allows) enables."""
    if not isinstance(integrations, Mapping):
        return True
    if DESTINATION in integrations:
        return bool(integrations[DESTINATION])
    return bool(integrations.get("All", True))


def map_message(message: object) -> Mapped:
    """Map one decoded Segment message; never raises on bad input, it returns :class:`Rejected`."""
    # Decoded JSON is made of plain dicts: checking for one first spares the slower
    # isinstance(..., Mapping) on every event and every nested object.
    if type(message) is not dict and not isinstance(message, Mapping):
        return Rejected(f"message is not a JSON object but {json_type(message)}")
    kind = message.get("type")
    if type(kind) is not str or kind not in _MAPPED_TYPES:  # the usual lower-case type: done
        if kind is None or kind == "":
            return Rejected("message has no type")
        if not isinstance(kind, str):
            return Rejected(f"message type is not a string: {_show(kind)}")
        kind = kind.lower()
        if kind in _SKIPPED_TYPES:
            return Skipped(f"{kind} calls are not forwarded")
        if kind not in _MAPPED_TYPES:
            return Rejected(f"unknown message type: {_show(message.get('type'))}")
    integrations = message.get("integrations")
    if integrations is not None and not is_enabled(integrations):
        return Skipped("integrations disables Amberflo")
    if kind == "identify":
        return _identify(message)
    return _meter(kind, message)


def _identify(message: Mapping[str, Any]) -> Mapped:
    # The destination page discards identify without a userId: an anonymous id is not a
    # customer anyone bills.
    user_id = _id(message.get("userId"))
    if user_id is None:
        return Rejected("identify without userId")
    traits = message.get("traits")
    if traits is not None and not _is_mapping(traits):
        return Rejected(f"identify traits is not an object but {json_type(traits)}")
    traits = traits or {}
    name = _text(traits.get("name"))
    email = _text(traits.get("email"))
    wire: dict[str, str] = {}
    _add_wire_pairs(wire, traits, "", skip=_IDENTITY_TRAITS)
    return IdentifyEvent(CustomerRecord(customer_id=user_id, name=name, email=email, traits=wire))


def _meter(kind: str, message: Mapping[str, Any]) -> Mapped:
    customer_id = _id(message.get("userId")) or _id(message.get("anonymousId"))
    if customer_id is None:
        return Rejected(f"{kind} has neither userId nor anonymousId")
    millis = _millis(message)
    if isinstance(millis, Rejected):
        return millis
    properties = message.get("properties")
    if properties is not None and not _is_mapping(properties):
        return Rejected(f"{kind} properties is not an object but {json_type(properties)}")
    properties = properties or {}

    value = 1.0
    dimensions: dict[str, str] = {}
    if kind == "track":
        meter = message.get("event")
        if not isinstance(meter, str) or not meter.strip():
            return Rejected("track without an event name")
        raw_value = properties.get("value")
        if raw_value is not None:
            # A bool is an int in Python and a string may look numeric, but billing on a guess
            # is worse than a dead letter the user can fix and replay.
            kind_of_value = type(raw_value)
            if (
                kind_of_value is not int
                and kind_of_value is not float
                and (isinstance(raw_value, bool) or not isinstance(raw_value, int | float))
            ):
                return Rejected(f"track value is not a number: {_show(raw_value)}")
            try:
                value = float(raw_value)
            except OverflowError:  # an integer beyond a double's range
                return Rejected(f"track value is too large: {_show(raw_value)}")
            if not math.isfinite(value):
                return Rejected(f"track value is not finite: {raw_value!r}")
        _add_wire_pairs(dimensions, properties, "", skip=_TRACK_VALUE)
    else:
        meter = kind
        # Page and screen carry their name as dimension ``name``; the call's own name wins
        # over a ``properties.name`` (they normally agree).
        name = message.get("name")
        if name is not None and name != "":
            _add_wire_pairs(dimensions, {"name": name}, "")
            _add_wire_pairs(dimensions, properties, "", skip=_PAGE_NAME)
        else:
            _add_wire_pairs(dimensions, properties, "")

    # Positional: a third cheaper than keywords, and the order is MeterEvent's own.
    return MeterEvent(
        _unique_id(message), customer_id, meter, value, millis, tuple(dimensions.items())
    )


_NO_KEYS: Final[frozenset[str]] = frozenset()
_TRACK_VALUE: Final = frozenset({"value"})
_PAGE_NAME: Final = frozenset({"name"})
_IDENTITY_TRAITS: Final = frozenset({"name", "email"})


def _add_wire_pairs(
    out: dict[str, str], values: Mapping[str, Any], prefix: str, skip: frozenset[str] = _NO_KEYS
) -> None:
    """Add ``values`` to ``out``, flattened to dotted keys, as wire-safe strings.

    Keys and values left empty by the dimension rule are dropped, and of two keys that become
    equal the first is kept. ``skip`` names top-level keys that are not dimensions.
    """
    for key, value in values.items():
        if key in skip:
            continue
        dotted = key if not prefix and type(key) is str else f"{prefix}{key}"
        if type(value) is str:  # most values: only the dimension rule applies
            safe_value = _safe_text(value)
        elif type(value) is dict or isinstance(value, Mapping):
            _add_wire_pairs(out, value, f"{dotted}.")
            continue
        else:
            # Lists are joined with "," by keys.format_value; other scalars are rendered.
            safe_value = wire_value(value)
        safe_key = _safe_text(dotted)
        if safe_key is not None and safe_value is not None and safe_key not in out:
            out[safe_key] = safe_value


# Property names, and many values (a region, a plan, a page), repeat from one event to the
# next: their wire form is computed once each. Bounded, so unique values cannot grow it.
_safe_text = functools.lru_cache(maxsize=8192)(dimension_safe)


def _is_mapping(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def _id(value: object) -> str | None:
    """An id as a string; ``None`` for null, empty or blank. Numbers are stringified, as
    Segment's own libraries do."""
    if type(value) is str:  # the common case; isspace() is True exactly when strip() is empty
        return value if value and not value.isspace() else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        text = str(value)
        return text if text.strip() else None
    return None


def _text(value: object) -> str | None:
    """A name or email as it goes (no dimension rule); blank means absent, as Amberflo
    refuses a blank customerName."""
    text = format_value(value)
    return text if text is not None and text.strip() else None


def _unique_id(message: Mapping[str, Any]) -> str:
    message_id = _id(message.get("messageId"))
    if message_id is not None:
        return message_id
    # Segment always sets messageId; a hand-made file may not. A digest of the message keeps
    # the record deterministic, so a re-sent file still dedups instead of billing twice.
    canonical = json.dumps(message, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _millis(message: Mapping[str, Any]) -> int | Rejected:
    """Epoch milliseconds of the first usable of timestamp, originalTimestamp, receivedAt."""
    raw = message.get("timestamp")
    if type(raw) is str:  # the usual case, a well-formed timestamp; anything else is below
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            millis = _epoch_millis(parsed)
            if millis > 0:
                return millis
    problems: list[str] = []
    for field in _TIMESTAMP_FIELDS:
        raw = message.get(field)
        if raw is None or raw == "":
            continue
        parsed_or_none = _parse_iso(raw)
        if parsed_or_none is None:
            problems.append(f"{field} is not an ISO 8601 time: {_show(raw)}")
            continue
        millis = _epoch_millis(parsed_or_none)
        if millis <= 0:
            problems.append(f"{field} is not after 1970: {_show(raw)}")
            continue
        return millis
    if problems:
        return Rejected(problems[0])
    return Rejected("message has no timestamp")


def _epoch_millis(moment: datetime) -> int:
    """Whole milliseconds since 1970 (floored, as ``// timedelta(milliseconds=1)`` would be):
    from the difference's fields, a third of the cost of dividing one timedelta by another."""
    since = moment - _EPOCH
    return since.days * 86_400_000 + since.seconds * 1000 + since.microseconds // 1000


def _parse_iso(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        # Python 3.11 reads "Z", "+00:00" and any number of fractional digits.
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    # Segment's timestamps are UTC; one without an offset is read as UTC, never local time.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def json_type(value: object) -> str:
    """How a JSON value's type reads in an error message: \"a number\", \"an array\", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object" if isinstance(value, Mapping) else type(value).__name__


def _show(value: object) -> str:
    """A short repr for a reason string (reasons are counted, so they must stay short)."""
    shown = repr(value)
    if len(shown) > _MAX_SHOWN_VALUE:
        return shown[: _MAX_SHOWN_VALUE - 3] + "..."
    return shown
