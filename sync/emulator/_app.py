"""The emulated API: a routing table and one small handler per route, free of any transport.

``App.decide`` draws a request's fault before anything else happens; ``App.respond`` then
answers it (or returns ``None``: drop the connection). The server in ``_http.py`` only moves
bytes and sleeps for injected latency. Paths match with or without a trailing slash, on any
host. Routes under ``/_emulator/`` read and control the emulator: they need no API key, are
never faulted, and are not counted in the stats or the request log.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
import structlog

from sync.emulator._faults import NO_FAULT, Decision, Fault, FaultState
from sync.emulator._options import EmulatorOptions
from sync.emulator._store import Store
from sync.emulator._validate import (
    HttpError,
    api_error,
    decode_body,
    parse_json,
    parse_records,
    validate_customer,
    validate_record,
)
from sync.errors import ConfigError

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "/_emulator"
PAGING_SORT_FIELDS = ("id", "customerName", "customerEmail", "createTime", "updateTime")
FAULT_BODIES = {
    429: "Too Many Requests",
    500: "Internal server error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    """One HTTP request as read off the wire.

    ``path`` is the raw (still percent-encoded) path without the query or a trailing slash;
    ``query`` keeps the last value of a repeated name; header names are lower case.
    """

    method: str
    target: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    def from_wire(
        cls, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Request:
        """Build a request from the request line, the header fields and the body."""
        path, _, query = target.partition("?")
        return cls(
            method=method,
            target=target,
            path=path.rstrip("/") or "/",
            query=dict(parse_qsl(query, keep_blank_values=True)) if query else {},
            headers=headers,
            body=body,
        )

    def decoded_body(self) -> bytes:
        """The body with any ``Content-Encoding`` undone."""
        return decode_body(self.body, self.headers.get("content-encoding"))


@dataclass(frozen=True)
class Response:
    """One HTTP response, body already encoded."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        """A JSON response."""
        return cls(status, _json_bytes(payload), "application/json", headers)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        """A plain-text response."""
        return cls(status, text.encode(), "text/plain")


Handler = Callable[[Request, dict[str, str]], Response]


@dataclass(frozen=True)
class Route:
    """``method`` and a path regex (named groups become handler parameters)."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str


UNMATCHED = "unmatched"


class App:
    """The emulated Amberflo API plus the ``/_emulator/`` control routes, over one store."""

    def __init__(self, options: EmulatorOptions) -> None:
        self.store = Store()
        self.faults = FaultState(options.faults(), options.seed)
        self._api_keys = options.api_keys
        self._create_missing = options.put_missing == "create"
        self._api_routes = _table(
            ("POST", "/ingest", self._ingest),
            ("GET", "/customers", self._get_customers),
            ("POST", "/customers", self._create_customer),
            ("PUT", "/customers", self._replace_customer),
            ("GET", "/customers/paging", self._page_customers),
            ("DELETE", "/customers/{customer_id}", self._delete_customer),
        )
        self._control_routes = _table(
            ("GET", "/_emulator/customers", lambda _r, _p: Response.json(self.store.customers())),
            ("GET", "/_emulator/ingested", lambda _r, _p: Response.json(self.store.ingested())),
            ("GET", "/_emulator/stats", lambda _r, _p: Response.json(self.store.stats())),
            ("GET", "/_emulator/requests", lambda _r, _p: Response.json(self.store.requests())),
            ("GET", "/_emulator/faults", self._get_faults),
            ("PUT", "/_emulator/faults", self._put_faults),
            ("POST", "/_emulator/reset", self._reset),
        )

    # -- entry points --------------------------------------------------------------------

    def decide(self, request: Request) -> Decision:
        """Draw the request's fault and delay before it is processed (none for control)."""
        return NO_FAULT if _is_control(request.path) else self.faults.decide()

    def respond(self, request: Request, decision: Decision) -> Response | None:
        """Answer ``request``, or ``None`` when the decision is to drop the connection."""
        if _is_control(request.path):
            return self._call(_match(self._control_routes, request), request)
        found = _match(self._api_routes, request)
        response: Response | None
        if decision.fault is Fault.DROP:
            response = None
        elif decision.fault is not None:
            response = _fault_response(decision)
        elif not self._authorised(request):
            # API Gateway's answer to a missing or unknown key (inference; 401 is possible).
            response = Response.json({"message": "Forbidden"}, 403)
        else:
            response = self._call(found, request)
        self.store.count_request(
            method=request.method,
            path=request.target,
            route=UNMATCHED if isinstance(found, Response) else found[0].name,
            status=None if response is None else response.status,
        )
        return response

    def reset(self) -> None:
        """Forget all data and counters; faults go back to their start-up settings."""
        self.store.reset()
        self.faults.reset()

    # -- plumbing ------------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        key = request.headers.get("x-api-key", "")
        return bool(key) and (self._api_keys is None or key in self._api_keys)

    @staticmethod
    def _call(found: tuple[Route, dict[str, str]] | Response, request: Request) -> Response:
        """Run the matched route's handler (or return the 404/405 of an unmatched request)."""
        if isinstance(found, Response):
            return found
        route, params = found
        try:
            return route.handler(request, params)
        except HttpError as exc:
            return Response.json(exc.body, exc.status)
        except Exception:  # a bug in one handler must answer 500, not kill the server
            log.exception("emulator_handler_failed", method=request.method, path=request.path)
            return Response.json({"message": "Internal server error"}, 500)

    # -- ingest --------------------------------------------------------------------------

    def _ingest(self, request: Request, _params: dict[str, str]) -> Response:
        """Validate every record first: a request is stored whole or not at all (inference:
        Amberflo documents no partial acceptance, and a 400 tells the client nothing went in)."""
        raw = parse_records(request.decoded_body())
        records = [validate_record(index, item) for index, item in enumerate(raw)]
        self.store.ingest(records)
        # Stored records live until a reset: moved out of the collector's sight, they are not
        # traversed again by every collection (a quarter of the time of a long ingest run).
        gc.freeze()
        return Response.text(f"{len(records)} records were ingested")

    # -- customers -----------------------------------------------------------------------

    def _get_customers(self, request: Request, _params: dict[str, str]) -> Response:
        query = request.query
        if "customerId" not in query:
            return Response.json(list(self.store.customers().values()))
        # Amberflo answers 200 {} for an unknown id (confirmed), not 404.
        return Response.json(self.store.customer(query["customerId"]) or {})

    def _create_customer(self, request: Request, _params: dict[str, str]) -> Response:
        body = self._acceptable_customer(request)
        if request.query.get("autoCreateCustomerInStripe", "").lower() == "true":
            body["traits"] = {**body.get("traits", {}), "stripeId": _stripe_id(body["customerId"])}
        created = self.store.create_customer(body)
        if created is None:
            raise api_error(400, f"customer {body['customerId']!r} already exists; use PUT")
        return Response.json(created)

    def _replace_customer(self, request: Request, _params: dict[str, str]) -> Response:
        body = self._acceptable_customer(request)
        stored = self.store.replace_customer(body, create_missing=self._create_missing)
        if stored is None:
            raise api_error(404, f"customer {body['customerId']!r} does not exist; use POST")
        return Response.json(stored)

    def _acceptable_customer(self, request: Request) -> dict[str, Any]:
        """The validated customer body of a POST or PUT; 400 for an id set to be rejected."""
        body = validate_customer(parse_json(request.decoded_body()))
        if body["customerId"] in self.faults.settings().reject_customers:
            raise api_error(400, f"customer {body['customerId']!r} was rejected (emulated)")
        return body

    def _delete_customer(self, _request: Request, params: dict[str, str]) -> Response:
        deleted = self.store.delete_customer(params["customer_id"])
        if deleted is None:
            raise api_error(404, f"customer {params['customer_id']!r} does not exist")
        return Response.json(deleted)

    def _page_customers(self, request: Request, _params: dict[str, str]) -> Response:
        """Amberflo's paging: ``page`` counts from 1 (its documented default and first page),
        ``limit`` defaults to 10, ``sort`` to ``id``, ``isAscending`` to true; ``search`` is a
        case-insensitive substring of customerId, customerName or customerEmail."""
        query = request.query
        limit = _positive_int(query, "limit", 10)
        page = _positive_int(query, "page", 1)
        sort = query.get("sort") or "id"
        if sort not in PAGING_SORT_FIELDS:
            raise api_error(400, f"sort must be one of {', '.join(PAGING_SORT_FIELDS)}")
        ascending = query.get("isAscending", "true").lower() != "false"
        search = query.get("search") or None
        start = (page - 1) * limit
        if search is None:
            items, total = self.store.customer_page(
                _sort_key(sort), (sort, ascending), start, limit
            )
            filtered = total
        else:
            everyone = list(self.store.customers().values())
            found = [c for c in everyone if _matches(c, search)]
            found.sort(key=_sort_key(sort), reverse=not ascending)
            items, total, filtered = found[start : start + limit], len(everyone), len(found)
        metadata = {
            "totalRowCount": total,
            "filteredRowCount": filtered,
            "limit": limit,
            "page": page,
            "totalFilteredPages": math.ceil(filtered / limit),
            "isAscending": ascending,
            "sort": sort,
            "search": search,
        }
        return Response.json({"items": items, "metadata": metadata})

    # -- control -------------------------------------------------------------------------

    def _get_faults(self, _request: Request, _params: dict[str, str]) -> Response:
        return Response.json(self.faults.settings().as_dict())

    def _put_faults(self, request: Request, _params: dict[str, str]) -> Response:
        changes = parse_json(request.decoded_body())
        if not isinstance(changes, dict):
            raise api_error(400, "send a JSON object of fault settings to change")
        try:
            settings = self.faults.update(**changes)
        except ConfigError as exc:
            raise api_error(400, str(exc)) from exc
        return Response.json(settings.as_dict())

    def _reset(self, _request: Request, _params: dict[str, str]) -> Response:
        self.reset()
        return Response.json({"message": "reset"})


def _json_bytes(payload: Any) -> bytes:
    """``payload`` as compact UTF-8 JSON. orjson writes a customer several times faster than
    ``json``; what it cannot write (an integer beyond 64 bits, a lone surrogate that a client
    stored) ``json`` does, as it did before."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload).encode()


def _table(*entries: tuple[str, str, Handler]) -> list[Route]:
    routes = []
    for method, template, handler in entries:
        # "{name}" is one path segment; the path is matched raw, so %2F stays inside it.
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        routes.append(Route(method, re.compile(regex), handler, f"{method} {template}"))
    return routes


def _match(routes: list[Route], request: Request) -> tuple[Route, dict[str, str]] | Response:
    """The route for ``request`` and its decoded path parameters, or a 404/405 response."""
    allowed = []
    for route in routes:
        match = route.pattern.fullmatch(request.path)
        if match is None:
            continue
        if route.method == request.method:
            return route, {name: unquote(value) for name, value in match.groupdict().items()}
        allowed.append(route.method)
    if allowed:
        message = {"message": f"Method {request.method} not allowed on {request.path}"}
        return Response.json(message, 405, headers=(("Allow", ", ".join(allowed)),))
    return Response.json({"message": f"Not Found: {request.path}"}, 404)


def _is_control(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


def _fault_response(decision: Decision) -> Response:
    status = decision.status or 500
    message = FAULT_BODIES.get(status, "Internal server error")
    if decision.fault is Fault.THROTTLE:
        return Response.json(
            {"message": message}, status, headers=(("Retry-After", _seconds(decision.retry_after)),)
        )
    return Response.json({"message": message}, status)


def _seconds(value: float) -> str:
    # Whole seconds as HTTP wants them; a fraction is kept so tests can wait for less.
    return str(int(value)) if value == int(value) else str(value)


def _stripe_id(customer_id: str) -> str:
    return "cus_" + hashlib.sha256(customer_id.encode()).hexdigest()[:14]


def _positive_int(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise api_error(400, f"{name} must be an integer of 1 or more, got {text!r}")
    return value


def _sort_key(field: str) -> Callable[[Mapping[str, Any]], tuple[bool, Any]]:
    # Customers without the field sort after the others (before, descending); the flag comes
    # first so a missing value is never compared with a present one.
    def key(customer: Mapping[str, Any]) -> tuple[bool, Any]:
        value = customer.get(field)
        return (value is None, "" if value is None else value)

    return key


def _matches(customer: Mapping[str, Any], search: str) -> bool:
    needle = search.lower()
    return any(
        needle in str(customer.get(name) or "").lower()
        for name in ("customerId", "customerName", "customerEmail")
    )
