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

Two paths, one behaviour. Given a ``transport`` (the test seam: ``httpx.MockTransport``, or
``httpx.HTTPTransport()`` for vcrpy cassettes, which hook into ``httpx.Client``), or when the
environment names a proxy, requests go through ``httpx.Client``, which applies the proxy
settings (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``). Otherwise they go straight to Amberflo
through :class:`_DirectPool`, keep-alive HTTP/1.1 on sockets: an initial sync sends one request
per user, and ``httpx.Client`` costs the client about seven times the CPU per request, whatever
transport is under it (``bench/RESULTS-delivery.md``). Both paths send the same requests, and
their failures are mapped in the same place.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import math
import re
import select
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, NoReturn, Self

import httpx

from sync import __version__
from sync.errors import AuthError, PermanentError, RetriableError
from sync.orjson_safe import NOT_READ, loads_exactly

__all__ = ["AmberfloClient", "PendingIngest", "encode_json", "parse_retry_after"]

DEFAULT_BASE_URL = "https://app.amberflo.io"
USER_AGENT = f"amberflo-sync/{__version__}"

# Amberflo's messages can be long HTML pages from a proxy; a failure file needs the gist only.
_MAX_MESSAGE_CHARS = 500
_INGESTED = re.compile(r"^\s*(\d+)\s+records?\s+were\s+ingested\b", re.IGNORECASE)
_REDACTED = "[redacted]"
_INGEST = "POST /ingest"
_GZIPPED = {"Content-Encoding": "gzip"}
_GZIPPED_FIELD = b"Content-Encoding: gzip\r\n"


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
        headers = {
            "x-api-key": api_key,
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._direct: _DirectPool | None = None
        self._http: httpx.Client | None = None
        if transport is None and not _proxied([self._base_url, self._ingest_url]):
            self._direct = _DirectPool(headers=headers, timeout=timeout, max_idle=max_connections)
            return
        self._http = httpx.Client(
            headers=headers,
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
        """Close the connection pool; a request after this raises ``RuntimeError``."""
        if self._direct is not None:
            self._direct.close()
        if self._http is not None:
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
        return self.start_ingest(records).result()

    @property
    def pipelines_ingest(self) -> bool:
        """Whether :meth:`start_ingest` puts a request on the wire at once (the direct path).

        Through httpx it cannot: the request would be made only when its result is asked for.
        """
        return self._direct is not None

    def start_ingest(self, records: Sequence[bytes]) -> PendingIngest:
        """Send what :meth:`ingest_encoded` sends, now, and read the answer later.

        One thread can so keep several ingest requests on the wire, each on its own
        connection, with no thread per request: the events path's workers map the next batch
        while Amberflo reads the last. :meth:`PendingIngest.result` returns the count Amberflo
        acknowledged or raises the mapped error, as :meth:`ingest` describes. Without
        :attr:`pipelines_ingest` the whole request is made by ``result()``.
        """
        if not records:
            return PendingIngest(lambda: 0)
        url, content = f"{self._ingest_url}/ingest", _ingest_body(records)
        direct = self._direct
        if direct is None:
            return PendingIngest(
                lambda: _ingested(
                    self._send("POST", url, _INGEST, content=content, headers=_GZIPPED),
                    len(records),
                )
            )
        try:
            sent = direct.send("POST", url, query="", content=content, headers=_GZIPPED_FIELD)
        except httpx.TransportError as exc:
            failure = self._transport_error(exc, _INGEST)
            return PendingIngest(lambda: _raise(failure))

        def answer() -> int:
            try:
                response = direct.answer(sent)
            except httpx.TransportError as exc:
                raise self._transport_error(exc, _INGEST) from exc
            return _ingested(self._checked(response, _INGEST), len(records))

        return PendingIngest(answer)

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
    ) -> _Answer:
        """Send one request and return a 2xx answer; raise the mapped error otherwise."""
        try:
            if self._direct is None:
                return self._send_httpx(
                    method, url, endpoint, params=params, content=content, headers=headers
                )
            sent = self._direct.send(
                method,
                url,
                # Encoded as httpx encodes ``params`` (a space as "+"), so both paths send the
                # same request line.
                query=urllib.parse.urlencode(params) if params else "",
                content=content,
                headers=b"".join(
                    f"{name}: {value}\r\n".encode("latin-1")
                    for name, value in (headers or {}).items()
                ),
            )
            answer = self._direct.answer(sent)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, endpoint) from exc
        return self._checked(answer, endpoint)

    def _transport_error(self, exc: httpx.TransportError, endpoint: str) -> RetriableError:
        # httpx puts the URL, never headers, in its messages; redact anyway as a backstop.
        detail = self._redact(str(exc)) or type(exc).__name__
        return RetriableError(
            f"{endpoint}: {type(exc).__name__}: {detail}", status=None, endpoint=endpoint
        )

    def _checked(self, answer: _Answer, endpoint: str) -> _Answer:
        if not 200 <= answer.status_code < 300:
            raise self._status_error(answer, endpoint)
        return answer

    def _send_httpx(
        self,
        method: str,
        url: str,
        endpoint: str,
        *,
        params: Mapping[str, str | int] | None,
        content: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> _Answer:
        assert self._http is not None  # the client has one of its two paths
        response = self._http.request(
            method, url, params=params, content=content, headers=headers, timeout=self._timeout
        )
        answer = _Answer.of(response)
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self._status_error(answer, endpoint) from exc
        return answer

    def _status_error(
        self, response: _Answer, endpoint: str
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
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500:
            return RetriableError(
                f"Amberflo server error ({status}): {message}", status=status, endpoint=endpoint
            )
        # Amberflo's own words are the reason a user reads in the failure file.
        return PermanentError(message, status=status, endpoint=endpoint)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, _REDACTED)


class PendingIngest:
    """An ingest request sent by :meth:`AmberfloClient.start_ingest`; its answer is read once,
    by :meth:`result`."""

    __slots__ = ("_answer",)

    def __init__(self, answer: Callable[[], int]) -> None:
        self._answer = answer

    def result(self) -> int:
        """Read the answer: the records acknowledged, or the mapped error."""
        return self._answer()


def _ingest_body(records: Sequence[bytes]) -> bytes:
    # mtime=0 keeps the gzip header free of a timestamp, so a retry is byte-identical.
    # Level 1: a sixth of level 9's CPU for a body a quarter larger (18 KB of records
    # become 1.4 KB instead of 1.1 KB): compressing was a seventh of an ingest request.
    return gzip.compress(b"[" + b",".join(records) + b"]", compresslevel=1, mtime=0)


def _ingested(response: _Answer, sent: int) -> int:
    """The count in Amberflo's ``N records were ingested``, which must be ``sent``."""
    # The answer is ASCII text: decoding it directly skips httpx's charset detection, which
    # cost a twentieth of the client's CPU per ingest request.
    match = _INGESTED.match(response.content.decode("utf-8", "replace"))
    if match is None:
        raise _unexpected(response, _INGEST, "no 'N records were ingested' answer")
    count = int(match.group(1))
    if count != sent:
        raise _unexpected(response, _INGEST, f"{sent} records sent, {count} acknowledged")
    return count


def _raise(error: Exception) -> NoReturn:
    raise error


def _amberflo_message(response: _Answer) -> str:
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


def _json_object(response: _Answer, endpoint: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise _unexpected(response, endpoint, "the answer is not JSON") from exc
    if not isinstance(body, dict):
        raise _unexpected(response, endpoint, "the answer is not a JSON object")
    return body


def _unexpected(response: _Answer, endpoint: str, what: str) -> PermanentError:
    snippet = response.text.strip()[:200]
    return PermanentError(
        f"unexpected answer from Amberflo on {endpoint}: {what} (body: {snippet!r})",
        status=response.status_code,
        endpoint=endpoint,
    )


# -- answers ----------------------------------------------------------------------------------


class _Answer:
    """One HTTP answer, read whole: what the mapping and the methods above need of it.

    Both paths produce it: :class:`_DirectPool` directly, and httpx's through :meth:`of`.
    ``headers`` has lower-case names, repeated ones joined with ``", "`` as httpx joins them.
    """

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status_code: int, reason_phrase: str, headers: dict[str, str], content: bytes
    ) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.headers = headers
        self.content = content

    @classmethod
    def of(cls, response: httpx.Response) -> _Answer:
        """The answer of an httpx response (already read whole by ``httpx.Client.request``)."""
        headers = {name.lower(): value for name, value in response.headers.items()}
        return cls(response.status_code, response.reason_phrase, headers, response.content)

    @property
    def text(self) -> str:
        """The body as text (Amberflo answers UTF-8; a stray byte becomes U+FFFD)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not JSON.

        orjson reads a customer about four times faster than ``json``. What it refuses
        (``NaN``, lone surrogates) is read by ``json`` instead, and so is a body with a run of
        19 or more digits, because orjson turns integers beyond 64 bits into floats: the
        result is always the standard library's.
        """
        document = loads_exactly(self.content)
        return json.loads(self.content) if document is NOT_READ else document


# -- the direct path --------------------------------------------------------------------------

_Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Answers are small: a larger buffer only costs an allocation per read.
_READ_SIZE = 16384
# An answer's head larger than this is not an Amberflo answer; refusing it bounds memory.
_MAX_HEAD_BYTES = 64 * 1024


def _proxied(urls: Sequence[str]) -> bool:
    """Whether the environment names a proxy for the scheme of any of ``urls``.

    ``urllib.request.getproxies`` is the function httpx's own ``trust_env`` reads, so the
    direct path is taken exactly when httpx would not route through a proxy by scheme; any
    proxy setting at all sends requests through httpx, which also applies ``NO_PROXY``.
    """
    proxies = urllib.request.getproxies()
    if proxies.get("all"):
        return True
    return any(proxies.get(urllib.parse.urlsplit(url).scheme) for url in urls)


class _Target:
    """Where one URL's requests go: the origin, and the head bytes before the header fields."""

    __slots__ = ("origin", "path", "start")

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            # What httpx raises for such a URL, so both paths fail alike.
            raise httpx.UnsupportedProtocol(f"not an http:// or https:// URL with a host: {url!r}")
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.origin: _Origin = (parts.scheme, parts.hostname, port)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port is not None and parts.port != _DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{parts.port}"
        self.path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        self.start = f"Host: {host}\r\n".encode("ascii")


class _Sent(NamedTuple):
    """A request on the wire: its connection, whose answer is still to be read."""

    origin: _Origin
    sock: socket.socket
    method: str


class _DirectPool:
    """HTTP/1.1 on plain (or TLS) sockets, with keep-alive connections per origin.

    An initial sync sends one small request per user and waits for each answer on one of a
    few threads, so the client's CPU per request is the run's speed limit. This path writes
    each request with one ``sendall`` of bytes built from a cached prefix, and reads the answer
    with as few ``recv`` calls as it takes: about 0.1 ms of CPU per request where
    ``httpx.Client`` needs 0.7 to 0.85 ms (``bench/RESULTS-delivery.md``). It speaks only what
    Amberflo's answers need: ``Content-Length``, chunked or read-to-close bodies,
    ``Connection: close`` and ``1xx`` interim answers. Failures surface as httpx's exceptions,
    so :meth:`AmberfloClient._send` maps them like those of the httpx path.

    Thread-safe: a connection serves one request at a time, taken from the idle pool (or newly
    opened) and put back once its answer is read whole; at most ``max_idle`` stay open per
    origin.
    """

    def __init__(self, *, headers: Mapping[str, str], timeout: float, max_idle: int) -> None:
        self._fields = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        self._timeout = timeout
        self._max_idle = max_idle
        self._targets: dict[str, _Target] = {}
        self._idle: dict[_Origin, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def send(
        self,
        method: str,
        url: str,
        *,
        query: str,
        content: bytes | None,
        headers: bytes,
    ) -> _Sent:
        """Write one request (``headers``: extra header fields, each ending in CRLF) on a
        connection of its own; :meth:`answer` reads its answer."""
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target(url)
        line = f"{method} {target.path}{'?' + query if query else ''} HTTP/1.1\r\n"
        head = [line.encode("ascii"), target.start, self._fields, headers]
        if content is not None:
            head.append(b"Content-Length: %d\r\n" % len(content))
        head.append(b"\r\n")
        if content:
            head.append(content)
        sock = self._connection(target.origin)
        try:
            sock.sendall(b"".join(head))
        except TimeoutError as exc:
            sock.close()
            raise httpx.WriteTimeout(f"the request could not be sent in time: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise httpx.WriteError(f"sending the request failed: {exc}") from exc
        return _Sent(target.origin, sock, method)

    def answer(self, sent: _Sent) -> _Answer:
        """Read the whole answer to a request :meth:`send` wrote; free its connection."""
        origin, sock, method = sent
        try:
            answer, keep = _read_answer(sock, method)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ReadTimeout(f"no answer in time: {exc}") from exc
        except httpx.TransportError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise httpx.ReadError(f"connection failed: {exc}") from exc
        if keep:
            self._release(origin, sock)
        else:
            sock.close()
        return answer

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle = [sock for socks in self._idle.values() for sock in socks]
            self._idle.clear()
        for sock in idle:
            sock.close()

    def _connection(self, origin: _Origin) -> socket.socket:
        while (sock := self._take_idle(origin)) is not None:
            # A readable idle socket means the server closed it (or broke the protocol). Checked
            # outside the lock: a system call there would make every other thread queue on it.
            if not _readable(sock):
                return sock
            sock.close()
        scheme, host, port = origin
        try:
            sock = socket.create_connection((host, port), timeout=self._timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port}: {exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connecting to {host}:{port}: {exc}") from exc
        # Requests are small and each waits for its answer: never hold a segment back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            try:
                sock = self._tls_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc}") from exc
        return sock

    def _take_idle(self, origin: _Origin) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _release(self, origin: _Origin, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(sock)
                return
        sock.close()

    def _tls_context(self) -> ssl.SSLContext:
        # Built on first use: the certificate bundle takes a while to load.
        with self._lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _read_answer(sock: socket.socket, method: str) -> tuple[_Answer, bool]:
    """Read one whole answer from ``sock``; also whether the connection may be reused."""
    version, status, reason, headers, buffer = _read_head(sock)
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    if method == "HEAD" or status in (204, 304):
        content = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        content, buffer = _read_chunked(sock, buffer)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            length = -1
        if length < 0:
            raise httpx.RemoteProtocolError("malformed answer: bad Content-Length")
        content, buffer = _read_exactly(sock, buffer, length)
    else:
        content, buffer, keep = _read_to_close(sock, buffer), b"", False
    if buffer:
        keep = False  # bytes after the answer: the server does not speak as expected
    return _Answer(status, reason, headers, content), keep


def _read_head(sock: socket.socket) -> tuple[str, int, str, dict[str, str], bytes]:
    """The final (not ``1xx``) answer's version, status, reason and header fields, and the
    bytes read past its head."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > _MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("malformed answer: head too large")
            data = sock.recv(_READ_SIZE)
            if not data:
                raise httpx.RemoteProtocolError(
                    "the server closed the connection without an answer"
                    if not buffer
                    else "malformed answer: the connection closed inside the head"
                )
            buffer += data
            end = buffer.find(b"\r\n\r\n")
        lines = buffer[:end].decode("latin-1").split("\r\n")
        buffer = buffer[end + 4 :]
        version, status, reason = _status_line(lines[0])
        if not 100 <= status < 200 or status == 101:
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed answer: header line {line!r}")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return version, status, reason, headers, buffer


def _status_line(line: str) -> tuple[str, int, str]:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError(f"malformed answer: status line {line!r}")
    return version, int(code), reason.strip()


def _read_exactly(sock: socket.socket, buffer: bytes, length: int) -> tuple[bytes, bytes]:
    """``length`` bytes: what ``buffer`` holds first, then from ``sock``; and what is left."""
    if len(buffer) >= length:
        return buffer[:length], buffer[length:]
    parts = [buffer]
    missing = length - len(buffer)
    while missing > 0:
        data = sock.recv(max(missing, _READ_SIZE))
        if not data:
            raise httpx.RemoteProtocolError("malformed answer: the body ended early")
        parts.append(data)
        missing -= len(data)
    whole = b"".join(parts)
    return whole[:length], whole[length:]


def _read_line(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    while (end := buffer.find(b"\r\n")) < 0:
        if len(buffer) > _MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("malformed answer: chunk line too long")
        data = sock.recv(_READ_SIZE)
        if not data:
            raise httpx.RemoteProtocolError("malformed answer: the body ended early")
        buffer += data
    return buffer[:end], buffer[end + 2 :]


def _read_chunked(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    parts: list[bytes] = []
    while True:
        line, buffer = _read_line(sock, buffer)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise httpx.RemoteProtocolError(f"malformed answer: chunk size {line!r}") from exc
        if size < 0:
            raise httpx.RemoteProtocolError(f"malformed answer: chunk size {line!r}")
        if size == 0:
            break
        chunk, buffer = _read_exactly(sock, buffer, size + 2)
        parts.append(chunk[:-2])
    while True:  # trailer fields, up to the empty line
        line, buffer = _read_line(sock, buffer)
        if not line:
            return b"".join(parts), buffer


def _read_to_close(sock: socket.socket, buffer: bytes) -> bytes:
    parts = [buffer]
    while data := sock.recv(_READ_SIZE):
        parts.append(data)
    return b"".join(parts)
