"""The Amberflo HTTP client: the only module in the project that speaks HTTP (and imports httpx).

One :class:`AmberfloClient` owns one pooled, thread-safe ``httpx.Client``. Every request has an
explicit timeout, and every failure is mapped to the error tree of :mod:`sync.errors` in one
place (:meth:`AmberfloClient._send`), in the spirit of httpx's own ``map_httpcore_exceptions``:

=====================================  ==========================================================
what happened                          raised
=====================================  ==========================================================
401, 403                               :class:`~sync.errors.AuthError` (fatal: the key is wrong)
429                                    :class:`~sync.errors.RetriableError` with ``retry_after``
5xx                                    :class:`~sync.errors.RetriableError`
timeout, refused or dropped connection :class:`~sync.errors.RetriableError` (``status=None``)
any other status, or a success body    :class:`~sync.errors.PermanentError` whose message is
that does not say what it should       Amberflo's own (``errorMessage``, ``message`` or the text)
=====================================  ==========================================================

The client does not retry: the retry policy belongs to :mod:`sync.deliver`. Request bodies are
serialized deterministically (compact separators, keys in the order given, gzip without a
timestamp) so a re-sent batch is byte-identical and Amberflo's whole-record dedup applies.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx

from sync import __version__
from sync.errors import AuthError, PermanentError, RetriableError

__all__ = ["AmberfloClient", "encode_json", "parse_retry_after"]

DEFAULT_BASE_URL = "https://app.amberflo.io"
USER_AGENT = f"amberflo-sync/{__version__}"

# Amberflo's messages can be long HTML pages from a proxy; a failure file needs the gist only.
_MAX_MESSAGE_CHARS = 500
_INGESTED = re.compile(r"^\s*(\d+)\s+records?\s+were\s+ingested\b", re.IGNORECASE)
_REDACTED = "[redacted]"


def encode_json(value: object) -> bytes:
    """Serialize ``value`` the one way this project sends JSON: compact, keys as given, UTF-8.

    ``allow_nan=False`` because Amberflo's parser rejects ``NaN``; failing here names the cause.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date), else None.

    A date in the past means "now" (0.0); a value that is neither form is ignored (None), so a
    malformed header falls back to the ordinary backoff instead of failing the request.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate gives naive for "-0000"
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


class AmberfloClient:
    """A thread-safe client for Amberflo's customers and ingest endpoints.

    ``base_url`` serves customers (and ingest, unless ``ingest_url`` names another host such as
    Amberflo's failover ``https://ingest.amberflo.io``). ``transport`` is the test seam: pass an
    ``httpx.MockTransport`` to answer requests in-process.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        ingest_url: str | None = None,
        timeout: float = 30.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._ingest_url = (ingest_url or base_url).rstrip("/")
        self._timeout = httpx.Timeout(timeout)
        self._http = httpx.Client(
            headers={
                "x-api-key": api_key,
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            # Amberflo never redirects its API; following one could send the key elsewhere.
            follow_redirects=False,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- customers -------------------------------------------------------------------------

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer with this id, or None when Amberflo answers ``{}`` (no such customer)."""
        response = self._send(
            "GET",
            f"{self._base_url}/customers",
            "GET /customers",
            params={"customerId": customer_id},
        )
        body = _json_object(response, "GET /customers")
        return body or None

    def list_customers(self, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every customer, one page of ``page_size`` at a time (``GET /customers/paging``).

        Pages are numbered from 1; iteration ends at an empty page or at the last page the
        ``metadata.totalFilteredPages`` announces.
        """
        page = 1
        while True:
            response = self._send(
                "GET",
                f"{self._base_url}/customers/paging",
                "GET /customers/paging",
                params={"limit": page_size, "page": page},
            )
            body = _json_object(response, "GET /customers/paging")
            items = body.get("items")
            if not isinstance(items, list):
                raise _unexpected(response, "GET /customers/paging", "no 'items' list in the page")
            yield from (item for item in items if isinstance(item, dict))
            metadata = body.get("metadata")
            total_pages = metadata.get("totalFilteredPages") if isinstance(metadata, dict) else None
            if not items or (isinstance(total_pages, int) and page >= total_pages):
                return
            page += 1

    def create_customer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a customer (``POST /customers``); Amberflo answers 400 when it already exists."""
        response = self._send(
            "POST", f"{self._base_url}/customers", "POST /customers", content=encode_json(body)
        )
        return _json_object(response, "POST /customers")

    def replace_customer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a customer as a whole (``PUT /customers``): fields left out are removed."""
        response = self._send(
            "PUT", f"{self._base_url}/customers", "PUT /customers", content=encode_json(body)
        )
        return _json_object(response, "PUT /customers")

    # -- meter records ---------------------------------------------------------------------

    def ingest(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Send meter records as one gzipped JSON array; returns the count Amberflo acknowledged.

        Amberflo answers ``"<N> records were ingested"``; any other answer, or an N that is not
        the number sent, raises :class:`~sync.errors.PermanentError` rather than passing silently.
        """
        if not records:
            return 0
        # mtime=0 keeps the gzip header free of a timestamp, so a retry is byte-identical.
        content = gzip.compress(encode_json(list(records)), mtime=0)
        response = self._send(
            "POST",
            f"{self._ingest_url}/ingest",
            "POST /ingest",
            content=content,
            headers={"Content-Encoding": "gzip"},
        )
        match = _INGESTED.match(response.text)
        if match is None:
            raise _unexpected(response, "POST /ingest", "no 'N records were ingested' answer")
        count = int(match.group(1))
        if count != len(records):
            raise _unexpected(
                response, "POST /ingest", f"{len(records)} records sent, {count} acknowledged"
            )
        return count

    # -- the one place where failures are mapped -------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        endpoint: str,
        *,
        params: Mapping[str, str | int] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request and return a 2xx response; raise the mapped error otherwise."""
        try:
            response = self._http.request(
                method,
                url,
                params=params,
                content=content,
                headers=headers,
                timeout=self._timeout,
            )
        except httpx.TransportError as exc:
            # httpx puts the URL, never headers, in its messages; redact anyway as a backstop.
            detail = self._redact(str(exc)) or type(exc).__name__
            raise RetriableError(
                f"{endpoint}: {type(exc).__name__}: {detail}", status=None, endpoint=endpoint
            ) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self._status_error(response, endpoint) from exc
        return response

    def _status_error(
        self, response: httpx.Response, endpoint: str
    ) -> AuthError | RetriableError | PermanentError:
        status = response.status_code
        message = self._redact(_amberflo_message(response))
        if status in (401, 403):
            return AuthError(
                f"Amberflo rejected the API key ({status} on {endpoint}); check AMBERFLO_API_KEY",
                status=status,
                endpoint=endpoint,
            )
        if status == 429:
            return RetriableError(
                f"Amberflo is throttling requests (429): {message}",
                status=status,
                endpoint=endpoint,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            return RetriableError(
                f"Amberflo server error ({status}): {message}", status=status, endpoint=endpoint
            )
        # Amberflo's own words are the reason a user reads in the failure file.
        return PermanentError(message, status=status, endpoint=endpoint)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, _REDACTED)


def _amberflo_message(response: httpx.Response) -> str:
    """Amberflo's error text: ``errorMessage``, ``message``, or the body, cut to a sane length."""
    text = response.text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("errorMessage", "message", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                text = value.strip()
                break
    if not text:
        text = response.reason_phrase or f"HTTP {response.status_code}"
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[:_MAX_MESSAGE_CHARS] + "..."
    return text


def _json_object(response: httpx.Response, endpoint: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise _unexpected(response, endpoint, "the answer is not JSON") from exc
    if not isinstance(body, dict):
        raise _unexpected(response, endpoint, "the answer is not a JSON object")
    return body


def _unexpected(response: httpx.Response, endpoint: str, what: str) -> PermanentError:
    snippet = response.text.strip()[:200]
    return PermanentError(
        f"unexpected answer from Amberflo on {endpoint}: {what} (body: {snippet!r})",
        status=response.status_code,
        endpoint=endpoint,
    )
