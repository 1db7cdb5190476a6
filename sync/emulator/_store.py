"""The emulator's in-memory data: customers, unique meter records, counters, request log.

One lock guards everything, because the server's event loop writes while test threads read
through :class:`~sync.emulator.EmulatorHandle`. Every method is short and never blocks inside
the lock, and every read returns a copy, so callers cannot change the store by accident.

Everything stored is JSON data, so copies are made by :func:`json_copy` rather than
``copy.deepcopy``, whose generality cost the emulator a third of its time per customer request.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

REQUEST_LOG_SIZE = 1000
J = TypeVar("J")


RecordKey = tuple[str, str, float, int, str | None, tuple[tuple[str, str], ...]]


def record_key(record: dict[str, Any]) -> RecordKey:
    """The dedup key: every field of the record, dimensions included, in a canonical form.

    Amberflo "discards duplicate meter events unless any attribute differs". ``meterValue`` is
    compared as a number (``1`` and ``1.0`` are one value, as they are to a JSON double), and
    dimensions as a set of pairs (their order in the JSON does not matter).
    """
    return (
        record["customerId"],
        record["meterApiName"],
        float(record["meterValue"]),
        record["meterTimeInMillis"],
        record.get("uniqueId"),
        tuple(sorted(record.get("dimensions", {}).items())),
    )


def json_copy(value: J) -> J:
    """A deep copy of JSON data (dicts, lists and immutable scalars)."""
    # Scalars, most of a customer, are taken as they are without a call each.
    if isinstance(value, dict):
        return cast(
            J,
            {
                key: json_copy(item) if isinstance(item, dict | list) else item
                for key, item in value.items()
            },
        )
    if isinstance(value, list):
        return cast(
            J, [json_copy(item) if isinstance(item, dict | list) else item for item in value]
        )
    return value


def now_ms() -> int:
    """Wall-clock epoch milliseconds, the unit of ``createTime`` and ``updateTime``."""
    return time.time_ns() // 1_000_000


class Store:
    """Customers by id, unique records in arrival order, and what happened to requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._customers: dict[str, dict[str, Any]] = {}
        # Customer ids in each listing order asked for, dropped whenever a customer changes, so
        # reading a large account page by page sorts it once, not once per page.
        self._orders: dict[tuple[str, bool], list[str]] = {}
        self._records: list[dict[str, Any]] = []
        self._keys: set[RecordKey] = set()
        self._received = 0
        self._duplicates = 0
        self._requests: dict[str, Counter[str]] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    # -- meter records -------------------------------------------------------------------

    def ingest(self, records: Iterable[dict[str, Any]]) -> None:
        """Store validated records, skipping (and counting) any already stored."""
        keyed = [(record_key(record), record) for record in records]
        with self._lock:
            for key, record in keyed:
                self._received += 1
                if key in self._keys:
                    self._duplicates += 1
                else:
                    self._keys.add(key)
                    self._records.append(record)

    def ingested(self) -> list[dict[str, Any]]:
        """Every unique record, in arrival order."""
        with self._lock:
            return json_copy(self._records)

    # -- customers -----------------------------------------------------------------------

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        """One customer, or ``None``."""
        with self._lock:
            found = self._customers.get(customer_id)
            return json_copy(found) if found is not None else None

    def customers(self) -> dict[str, dict[str, Any]]:
        """Every customer by id, in creation order."""
        with self._lock:
            return json_copy(self._customers)

    def customer_page(
        self,
        sort_key: Callable[[dict[str, Any]], Any],
        order: tuple[str, bool],
        start: int,
        limit: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """Customers ``start`` to ``start + limit`` in ``order`` (a sort field and whether it is
        ascending, naming the ordering that ``sort_key`` gives), and the number of customers."""
        ascending = order[1]
        with self._lock:
            ids = self._orders.get(order)
            if ids is None:
                ranked = sorted(self._customers.values(), key=sort_key, reverse=not ascending)
                ids = self._orders[order] = [customer["customerId"] for customer in ranked]
            page = [json_copy(self._customers[i]) for i in ids[start : start + limit]]
            return page, len(ids)

    def create_customer(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Store a new customer; ``None`` when the id is taken."""
        customer_id = body["customerId"]
        with self._lock:
            if customer_id in self._customers:
                return None
            stamp = now_ms()
            stored = _stored_customer(body, create_time=stamp, update_time=stamp)
            self._customers[customer_id] = stored
            self._orders.clear()
            return json_copy(stored)

    def replace_customer(
        self, body: dict[str, Any], *, create_missing: bool
    ) -> dict[str, Any] | None:
        """Replace a customer wholesale (PUT); ``None`` when missing and not ``create_missing``."""
        customer_id = body["customerId"]
        with self._lock:
            existing = self._customers.get(customer_id)
            if existing is None and not create_missing:
                return None
            stamp = now_ms()
            create_time = existing["createTime"] if existing is not None else stamp
            stored = _stored_customer(body, create_time=create_time, update_time=stamp)
            self._customers[customer_id] = stored
            self._orders.clear()
            return json_copy(stored)

    def delete_customer(self, customer_id: str) -> dict[str, Any] | None:
        """Remove a customer and return it; ``None`` when there is none."""
        with self._lock:
            self._orders.clear()
            return self._customers.pop(customer_id, None)

    # -- request accounting --------------------------------------------------------------

    def count_request(self, *, method: str, path: str, route: str, status: int | None) -> None:
        """Count one API request under its route and status, and add it to the log.

        ``status`` is ``None`` for a dropped connection; the stats count those as ``"drop"``.
        """
        with self._lock:
            counts = self._requests.get(route)
            if counts is None:
                counts = self._requests[route] = Counter()
            counts[str(status or "drop")] += 1
            self._log.append({"method": method, "path": path, "status": status})

    def requests(self) -> list[dict[str, Any]]:
        """The last :data:`REQUEST_LOG_SIZE` API requests, oldest first."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def stats(self) -> dict[str, Any]:
        """Requests by route and status; records received, unique and duplicated."""
        with self._lock:
            return {
                "requests": {route: dict(counts) for route, counts in self._requests.items()},
                "requests_total": sum(sum(c.values()) for c in self._requests.values()),
                "records_received": self._received,
                "records_unique": len(self._records),
                "records_duplicate": self._duplicates,
                "customers": len(self._customers),
            }

    def reset(self) -> None:
        """Forget everything."""
        with self._lock:
            self._customers.clear()
            self._orders.clear()
            self._records.clear()
            self._keys.clear()
            self._received = 0
            self._duplicates = 0
            self._requests.clear()
            self._log.clear()


def _stored_customer(body: dict[str, Any], *, create_time: int, update_time: int) -> dict[str, Any]:
    # ``body`` is the store's own: the validated, freshly parsed request body.
    stored: dict[str, Any] = {"enabled": True, **body}
    stored["id"] = body["customerId"]
    stored["createTime"] = create_time
    stored["updateTime"] = update_time
    return stored
