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

Direct connections go through :class:`_Http11Transport`, keep-alive HTTP/1.1 on the standard
library's ``http.client``: an initial sync sends one request per user, and httpx's default
transport (httpcore and h11) spends about 0.6 ms of CPU per request where ``http.client`` needs
about a quarter of that (``bench/initial_sync.py``). httpx still builds and reads every request
and applies the environment's proxy settings (``HTTPS_PROXY``, ``NO_PROXY``), whose routes take
precedence over the direct one.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import math
import re
import select
import socket
import ssl
import threading
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


# One encoder for every call: json.dumps builds a new one whenever its options differ from the
# defaults, which doubled the cost of serializing a meter record.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_json(value: object) -> bytes:
    """Serialize ``value`` the one way this project sends JSON: compact, keys as given, UTF-8.

    ``allow_nan=False`` because Amberflo's parser rejects ``NaN``; failing here names the cause.
    """
    return _ENCODER.encode(value).encode()


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
        # "all://" is the least specific route, so proxies from the environment still win.
        mounts = (
            None
            if transport is not None
            else {"all://": _Http11Transport(max_idle=max_connections)}
        )
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
            mounts=mounts,
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
        """Every customer, one page of ``page_size`` at a time (``GET /customers/paging``)."""
        page = 1
        while True:
            items, last = self.customers_page(page, page_size)
            yield from items
            if last:
                return
            page += 1

    def customers_page(self, page: int, page_size: int) -> tuple[list[dict[str, Any]], bool]:
        """One page of customers (numbered from 1) and whether it is the last one.

        A page is the last when it is empty or when ``metadata.totalFilteredPages`` says so.
        """
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
        metadata = body.get("metadata")
        total_pages = metadata.get("totalFilteredPages") if isinstance(metadata, dict) else None
        last = not items or (isinstance(total_pages, int) and page >= total_pages)
        return [item for item in items if isinstance(item, dict)], last

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
        return self.ingest_encoded([encode_json(record) for record in records])

    def ingest_encoded(self, records: Sequence[bytes]) -> int:
        """:meth:`ingest` for records already serialized by :func:`encode_json`.

        Delivery serializes each record once to size its batches; joining those bytes gives
        exactly the array :meth:`ingest` would send, without encoding every record twice.
        """
        if not records:
            return 0
        # mtime=0 keeps the gzip header free of a timestamp, so a retry is byte-identical.
        # Level 1: a sixth of level 9's CPU for a body a quarter larger (18 KB of records
        # become 1.4 KB instead of 1.1 KB): compressing was a seventh of an ingest request.
        content = gzip.compress(b"[" + b",".join(records) + b"]", compresslevel=1, mtime=0)
        response = self._send(
            "POST",
            f"{self._ingest_url}/ingest",
            "POST /ingest",
            content=content,
            headers={"Content-Encoding": "gzip"},
        )
        # The answer is ASCII text: decoding it directly skips httpx's charset detection, which
        # cost a twentieth of the client's CPU per ingest request.
        match = _INGESTED.match(response.content.decode("utf-8", "replace"))
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


# -- the transport ----------------------------------------------------------------------------

_Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Http11Transport(httpx.BaseTransport):
    """HTTP/1.1 over ``http.client`` with a pool of keep-alive connections per origin.

    Thread-safe: a connection serves one request at a time, taken from the idle pool (or newly
    opened) and put back once its answer is read whole. At most ``max_idle`` connections per
    origin stay open between requests. Failures surface as httpx's own exceptions, so
    :meth:`AmberfloClient._send` maps them like those of any other transport.
    """

    def __init__(self, *, max_idle: int) -> None:
        self._max_idle = max_idle
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read its whole answer."""
        url = request.url
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        timeouts = request.extensions.get("timeout", {})
        connection = self._connection(origin, timeouts.get("connect"), request)
        connection.timeout = timeouts.get("read")
        if connection.sock is not None:
            connection.sock.settimeout(connection.timeout)
        try:
            connection.putrequest(
                request.method,
                url.raw_path.decode("ascii"),
                skip_host=True,  # httpx sets Host (and every other header) itself
                skip_accept_encoding=True,
            )
            for name, value in request.headers.raw:
                connection.putheader(name.decode("latin-1"), value.decode("latin-1"))
            connection.endheaders(request.read())
            answer = connection.getresponse()
            content = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _transport_error(exc, request) from exc
        # http.client lets go of the socket itself when the answer ends the connection.
        if connection.sock is not None:
            self._release(origin, connection)
        return httpx.Response(
            answer.status,
            headers=answer.getheaders(),
            content=content,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason.encode()},
        )

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle = [c for connections in self._idle.values() for c in connections]
            self._idle.clear()
        for connection in idle:
            connection.close()

    def _connection(
        self, origin: _Origin, timeout: float | None, request: httpx.Request
    ) -> http.client.HTTPConnection:
        while (connection := self._take_idle(origin)) is not None:
            # A readable idle socket means the server closed it (or broke the protocol). Checked
            # outside the lock: a system call there would make every other thread queue on it.
            if connection.sock is not None and not _readable(connection.sock):
                return connection
            connection.close()
        scheme, host, port = origin
        connection = (
            http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
            if scheme == "https"
            else http.client.HTTPConnection(host, port, timeout=timeout)
        )
        try:
            connection.connect()
        except TimeoutError as exc:
            connection.close()
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port}: {exc}", request=request
            ) from exc
        except OSError as exc:
            connection.close()
            raise httpx.ConnectError(
                f"connecting to {host}:{port}: {exc}", request=request
            ) from exc
        if connection.sock is not None:
            # Requests are small and each waits for its answer: never hold a segment back.
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _take_idle(self, origin: _Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _release(self, origin: _Origin, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(connection)
                return
        connection.close()

    def _tls_context(self) -> ssl.SSLContext:
        # Built on first use: the certificate bundle takes a while to load.
        with self._lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _transport_error(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for a failure while a request was sent or its answer read."""
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(f"no answer in time: {exc}", request=request)
    if isinstance(exc, http.client.RemoteDisconnected):
        return httpx.RemoteProtocolError(
            "the server closed the connection without an answer", request=request
        )
    if isinstance(exc, http.client.HTTPException):
        return httpx.RemoteProtocolError(f"malformed answer: {exc!r}", request=request)
    return httpx.ReadError(f"connection failed: {exc}", request=request)
