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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

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
_ONE_MS: Final = timedelta(milliseconds=1)
_TIMESTAMP_FIELDS: Final = ("timestamp", "originalTimestamp", "receivedAt")
_SKIPPED_TYPES: Final = frozenset({"group", "alias"})
_MAX_SHOWN_VALUE: Final = 60


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """One meter record for ``POST /ingest``; :meth:`as_record` gives it in wire key order."""

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
    if not isinstance(message, Mapping):
        return Rejected(f"message is not a JSON object but {_json_type(message)}")
    kind = message.get("type")
    if kind is None or kind == "":
        return Rejected("message has no type")
    if not isinstance(kind, str):
        return Rejected(f"message type is not a string: {_show(kind)}")
    kind = kind.lower()
    if kind in _SKIPPED_TYPES:
        return Skipped(f"{kind} calls are not forwarded")
    if kind not in {"page", "screen", "track", "identify"}:
        return Rejected(f"unknown message type: {_show(message.get('type'))}")
    if not is_enabled(message.get("integrations")):
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
    if traits is not None and not isinstance(traits, Mapping):
        return Rejected(f"identify traits is not an object but {_json_type(traits)}")
    traits = traits or {}
    name = _text(traits.get("name"))
    email = _text(traits.get("email"))
    rest = {key: value for key, value in traits.items() if key not in {"name", "email"}}
    customer = CustomerRecord(
        customer_id=user_id, name=name, email=email, traits=dict(_wire_pairs(rest))
    )
    return IdentifyEvent(customer)


def _meter(kind: str, message: Mapping[str, Any]) -> Mapped:
    customer_id = _id(message.get("userId")) or _id(message.get("anonymousId"))
    if customer_id is None:
        return Rejected(f"{kind} has neither userId nor anonymousId")
    millis = _millis(message)
    if isinstance(millis, Rejected):
        return millis
    properties = message.get("properties")
    if properties is not None and not isinstance(properties, Mapping):
        return Rejected(f"{kind} properties is not an object but {_json_type(properties)}")
    properties = properties or {}

    value = 1.0
    if kind == "track":
        meter = message.get("event")
        if not isinstance(meter, str) or not meter.strip():
            return Rejected("track without an event name")
        raw_value = properties.get("value")
        if raw_value is not None:
            # A bool is an int in Python and a string may look numeric, but billing on a guess
            # is worse than a dead letter the user can fix and replay.
            if isinstance(raw_value, bool) or not isinstance(raw_value, int | float):
                return Rejected(f"track value is not a number: {_show(raw_value)}")
            try:
                value = float(raw_value)
            except OverflowError:  # an integer beyond a double's range
                return Rejected(f"track value is too large: {_show(raw_value)}")
            if not math.isfinite(value):
                return Rejected(f"track value is not finite: {raw_value!r}")
        dimension_source = {k: v for k, v in properties.items() if k != "value"}
    else:
        meter = kind
        # Page and screen carry their name as dimension ``name``; the call's own name wins
        # over a ``properties.name`` (they normally agree).
        name = message.get("name")
        dimension_source = dict(properties)
        if name is not None and name != "":
            dimension_source.pop("name", None)
            dimension_source = {"name": name, **dimension_source}

    return MeterEvent(
        unique_id=_unique_id(message),
        customer_id=customer_id,
        meter_api_name=meter,
        meter_value=value,
        meter_time_ms=millis,
        dimensions=tuple(_wire_pairs(dimension_source)),
    )


def _wire_pairs(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Flatten ``values`` to dotted keys and wire-safe strings; keys and values left empty by
    the dimension rule are dropped, and of two keys that become equal the first is kept."""
    seen: set[str] = set()
    for key, value in _flatten(values, ""):
        safe_key = _safe_key(key)
        # Most values are strings already: the dimension rule is all they need.
        safe_value = dimension_safe(value) if type(value) is str else wire_value(value)
        if safe_key is None or safe_value is None or safe_key in seen:
            continue
        seen.add(safe_key)
        yield safe_key, safe_value


# Property names repeat from one event to the next; their wire form is computed once each.
_safe_key = functools.lru_cache(maxsize=4096)(dimension_safe)


def _flatten(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{dotted}.")
        else:
            # Lists are joined with "," by keys.format_value; scalars go as they are.
            yield dotted, value


def _id(value: object) -> str | None:
    """An id as a string; ``None`` for null, empty or blank. Numbers are stringified, as
    Segment's own libraries do."""
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
    problems: list[str] = []
    for field in _TIMESTAMP_FIELDS:
        raw = message.get(field)
        if raw is None or raw == "":
            continue
        parsed = _parse_iso(raw)
        if parsed is None:
            problems.append(f"{field} is not an ISO 8601 time: {_show(raw)}")
            continue
        millis = (parsed - _EPOCH) // _ONE_MS
        if millis <= 0:
            problems.append(f"{field} is not after 1970: {_show(raw)}")
            continue
        return millis
    if problems:
        return Rejected(problems[0])
    return Rejected("message has no timestamp")


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


def _json_type(value: object) -> str:
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
