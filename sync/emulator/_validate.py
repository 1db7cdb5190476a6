"""Request bodies and the API's validation rules: pure functions, no I/O, no state.

The rules follow ``spec/amberflo-api.md``. Where Amberflo's behaviour is not documented the
choice made here is marked *inference*; every error body is synthetic (the real texts are
unknown), only the status codes and the ``errorMessage``/``message`` keys are modelled.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

from sync.orjson_safe import NOT_READ, loads_exactly

MAX_BODY_BYTES = 10 * 1024 * 1024
"""API Gateway's payload ceiling, applied to the body on the wire and after gunzip."""

DIMENSION_PATTERN = re.compile(r"[-_ !.*'()&$@=;:+,?0-9A-Za-z]{1,200}")
"""The spec's reconstruction of Amberflo's dimension regex, for keys and values alike."""


# The same keys and values come in record after record: each is matched once. A plain dict
# (emptied when full) is read several times faster than an lru_cache wrapper is called.
_TEXT_OK: dict[str, bool] = {}
_TEXT_OK_SIZE = 65536


def _dimension_text_ok(text: str) -> bool:
    known = _TEXT_OK.get(text)
    if known is None:
        if len(_TEXT_OK) >= _TEXT_OK_SIZE:
            _TEXT_OK.clear()
        known = _TEXT_OK[text] = DIMENSION_PATTERN.fullmatch(text) is not None
    return known


SERVER_OWNED_CUSTOMER_FIELDS = frozenset({"id", "createTime", "updateTime"})


class HttpError(Exception):
    """A request the emulator refuses, with the status and JSON body to answer.

    It never leaves the emulator (the router turns it into a response), so it is not part of
    the package's ``SyncError`` tree.
    """

    def __init__(self, status: int, body: Mapping[str, str]) -> None:
        super().__init__(next(iter(body.values()), ""))
        self.status = status
        self.body = dict(body)


def ingest_error(message: str) -> HttpError:
    """A 400 in the ingest shape, ``{"errorMessage": ...}`` (AWS Lambda's; inference)."""
    return HttpError(400, {"errorMessage": message})


def api_error(status: int, message: str) -> HttpError:
    """An error in the API Gateway shape, ``{"message": ...}``, used by every other route."""
    return HttpError(status, {"message": message})


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """The body with its ``Content-Encoding`` (``gzip`` or none) undone, size-capped."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding != "gzip":
        raise api_error(415, f"Content-Encoding {encoding!r} is not supported; use gzip")
    # A streaming inflate with max_length stops a small gzip bomb from filling memory.
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        plain = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise api_error(400, f"body is not valid gzip: {exc}") from exc
    if len(plain) > MAX_BODY_BYTES:
        raise api_error(413, f"body is larger than {MAX_BODY_BYTES} bytes once decompressed")
    if not inflater.eof:
        raise api_error(400, "gzip body is truncated")
    return plain


def parse_json(body: bytes) -> Any:
    """One JSON document, as Jackson would read it (no NaN or Infinity).

    orjson reads a customer about four times faster. A document it refuses is read again by
    ``json``, so what is accepted, and the error message of what is not, stay ``json``'s; so
    is one with a run of 19 or more digits, because orjson turns integers beyond 64 bits into
    floats.
    """
    document = loads_exactly(body)
    if document is not NOT_READ:
        return document
    try:
        # UnicodeDecodeError is a ValueError too: not UTF-8 is reported as invalid JSON.
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError as exc:
        raise api_error(400, f"invalid JSON: {exc}") from exc


def parse_records(body: bytes) -> list[Any]:
    """The raw records of an ingest body: a JSON object, a JSON array, or NDJSON."""
    # orjson reads what Jackson reads (no NaN, UTF-8 checked) several times faster than the
    # standard library; whatever it refuses (NDJSON, bad input) is read again below, which
    # says what is wrong, and so is a body with 19 digits in a row (see parse_json).
    document = loads_exactly(body)
    if type(document) is list:
        return document
    if type(document) is dict:
        return [document]
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ingest_error(f"body is not UTF-8: {exc}") from exc
    if not text:
        raise ingest_error("empty body; send a JSON object, a JSON array or NDJSON")
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        # "Extra data" after a complete first value is what several NDJSON lines look like.
        if exc.msg != "Extra data":
            raise ingest_error(f"invalid JSON: {exc}") from exc
        return _parse_ndjson(text)
    except ValueError as exc:
        raise ingest_error(f"invalid JSON: {exc}") from exc
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        return [document]
    raise ingest_error("body must be a JSON object, a JSON array of objects or NDJSON")


def _parse_ndjson(text: str) -> list[Any]:
    records: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line, parse_constant=_reject_constant))
        except ValueError as exc:
            raise ingest_error(f"invalid JSON on NDJSON line {number}: {exc}") from exc
    return records


def validate_record(index: int, raw: object) -> dict[str, Any]:
    """One meter record as stored: the known fields only, or a 400 naming index and field.

    Unknown top-level keys are dropped, as Amberflo documents. A ``null`` optional field
    (``uniqueId``, ``dimensions``) counts as absent, as Jackson reads it (inference).
    """
    if type(raw) is dict:
        # The usual record, valid and of the usual types, checked in one go; anything else
        # takes the field-by-field path below, which says what is wrong.
        customer, meter = raw.get("customerId"), raw.get("meterApiName")
        value, millis = raw.get("meterValue"), raw.get("meterTimeInMillis")
        unique, dimensions = raw.get("uniqueId"), raw.get("dimensions")
        if (
            type(customer) is str
            and type(meter) is str
            and customer
            and meter
            and not customer.isspace()
            and not meter.isspace()
            and ((type(value) is float and math.isfinite(value)) or type(value) is int)
            and type(millis) is int
            and millis > 0
            and (unique is None or type(unique) is str)
            and (dimensions is None or _usual_dimensions(dimensions))
        ):
            if len(raw) == 4 + (unique is not None) + (dimensions is not None):
                # Only known keys, none null: the record is stored as parsed (the body's
                # parser made it, nobody else holds it), without a copy.
                return raw
            record: dict[str, Any] = {
                "customerId": customer,
                "meterApiName": meter,
                "meterValue": value,
                "meterTimeInMillis": millis,
            }
            if unique is not None:
                record["uniqueId"] = unique
            if dimensions is not None:
                record["dimensions"] = dict(dimensions)
            return record
    return _validate_record_field_by_field(index, raw)


def _usual_dimensions(dimensions: object) -> bool:
    if type(dimensions) is not dict:
        return False
    known = _TEXT_OK
    for key, text in dimensions.items():
        if type(text) is not str:
            return False
        # The cache read inline: two calls fewer per dimension of every record.
        key_ok, text_ok = known.get(key), known.get(text)
        if key_ok is None:
            key_ok = _dimension_text_ok(key)
        if text_ok is None:
            text_ok = _dimension_text_ok(text)
        if not (key_ok and text_ok):
            return False
    return True


def _validate_record_field_by_field(index: int, raw: object) -> dict[str, Any]:
    where = f"record {index}"
    if not isinstance(raw, dict):
        raise ingest_error(f"{where}: must be a JSON object, got {_describe(raw)}")
    record: dict[str, Any] = {}
    for name in ("customerId", "meterApiName"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ingest_error(
                f"{where}: {name} must be a non-blank string, got {_describe(value)}"
            )
        record[name] = value
    value = raw.get("meterValue")
    # bool is an int in Python but not a number in JSON; 1e999 parses as inf, not a double.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ingest_error(f"{where}: meterValue must be a number, got {_describe(value)}")
    record["meterValue"] = value
    value = raw.get("meterTimeInMillis")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ingest_error(
            f"{where}: meterTimeInMillis must be a positive integer (epoch milliseconds), "
            f"got {_describe(value)}"
        )
    record["meterTimeInMillis"] = value
    value = raw.get("uniqueId")
    if value is not None:
        if not isinstance(value, str):
            raise ingest_error(f"{where}: uniqueId must be a string, got {_describe(value)}")
        record["uniqueId"] = value
    dimensions = raw.get("dimensions")
    if dimensions is not None:
        record["dimensions"] = _validate_dimensions(where, dimensions)
    return record


def _validate_dimensions(where: str, dimensions: object) -> dict[str, str]:
    if not isinstance(dimensions, dict):
        raise ingest_error(
            f"{where}: dimensions must be an object of strings, got {_describe(dimensions)}"
        )
    for key, value in dimensions.items():
        if not _dimension_text_ok(key):
            raise ingest_error(
                f"{where}: dimensions key {_describe(key)} must match ^{DIMENSION_PATTERN.pattern}$"
            )
        if not isinstance(value, str):
            raise ingest_error(
                f"{where}: dimensions[{key!r}] must be a string, got {_describe(value)}"
            )
        if not _dimension_text_ok(value):
            raise ingest_error(
                f"{where}: dimensions[{key!r}] value {_describe(value)} must match "
                f"^{DIMENSION_PATTERN.pattern}$"
            )
    return dict(dimensions)


def validate_customer(raw: object) -> dict[str, Any]:
    """The body of a customer POST or PUT as stored, or a 400 naming the field.

    ``customerId`` and ``customerName`` are required non-blank strings, ``customerEmail`` an
    optional string, ``enabled`` an optional boolean and ``traits`` an optional string map.
    Trait numbers and booleans become strings (``5`` -> ``"5"``, ``true`` -> ``"true"``), as
    Jackson coerces scalars into a ``Map<String,String>`` (inference: the backend is Java);
    nested objects, arrays and nulls are refused. ``null`` optional fields count as absent.
    ``id``, ``createTime`` and ``updateTime`` belong to the server and are ignored, so a client
    may send back a customer it has read. Other fields are kept as sent.
    """
    if not isinstance(raw, dict):
        raise api_error(400, f"customer body must be a JSON object, got {_describe(raw)}")
    customer = {
        key: value
        for key, value in raw.items()
        if key not in SERVER_OWNED_CUSTOMER_FIELDS and value is not None
    }
    for name in ("customerId", "customerName"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise api_error(400, f"{name} must be a non-blank string, got {_describe(value)}")
    email = customer.get("customerEmail")
    if email is not None and not isinstance(email, str):
        raise api_error(400, f"customerEmail must be a string, got {_describe(email)}")
    enabled = customer.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise api_error(400, f"enabled must be true or false, got {_describe(enabled)}")
    if "traits" in customer:
        customer["traits"] = _coerce_traits(customer["traits"])
    return customer


def _coerce_traits(traits: object) -> dict[str, str]:
    if not isinstance(traits, dict):
        raise api_error(400, f"traits must be an object of strings, got {_describe(traits)}")
    coerced: dict[str, str] = {}
    for key, value in traits.items():
        if isinstance(value, str):
            coerced[key] = value
        elif isinstance(value, bool):
            coerced[key] = "true" if value else "false"
        elif isinstance(value, int | float) and math.isfinite(value):
            coerced[key] = str(value)
        else:
            raise api_error(
                400, f"traits[{key!r}] must be a string, number or boolean, got {_describe(value)}"
            )
    return coerced


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _describe(value: object) -> str:
    if value is None:
        return "null or nothing"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
