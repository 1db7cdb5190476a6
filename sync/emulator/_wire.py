"""HTTP/1.1 framing for the emulator: an incremental request parser and a response encoder.

Why not h11: on this project's small machines h11 spent about three quarters of the
emulator's time per request, and the emulator must never be the bottleneck of a benchmark.
This module does only what a server of small JSON requests needs, strictly:

- request line ``METHOD SP target SP HTTP/1.1`` (or ``HTTP/1.0``; those connections close
  after one answer); leading empty lines are skipped, as RFC 9112 allows;
- header fields ``name: value``; obsolete line folding and whitespace before the colon are
  refused; names are lower-cased, repeated names are joined with ``", "``;
- a body framed by ``Content-Length`` or ``Transfer-Encoding: chunked`` (extensions and
  trailers are read and discarded); both at once, or any other transfer coding, is refused;
- ``Expect: 100-continue`` (curl sends it for larger bodies) and pipelined requests;
- limits: 64 KiB of head, :data:`MAX_BODY_BYTES` of body.

Malformed input raises :class:`WireError` with the status to answer before closing.
"""

from __future__ import annotations

import http
import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# Header lines, each a token, a colon and anything but a line break: the rule _TOKEN applies
# to one name, for a whole head.
_FIELD_NAMES = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\r\n]*(?:\r\n(?!\Z)|\Z))*")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Looked up once: building an HTTPStatus per answer showed in the emulator's profile.
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


class WireError(Exception):
    """The bytes are not an HTTP/1.1 request this server accepts; answer ``status``, close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WireRequest:
    """One complete request. ``keep_alive`` is false when the connection must close after it."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes
    keep_alive: bool


@dataclass
class _Head:
    method: str
    target: str
    headers: dict[str, str]
    keep_alive: bool
    length: int | None  # None: chunked
    expects_continue: bool


class RequestParser:
    """Feed it bytes as they arrive; take complete requests out in order."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._body = bytearray()
        self._chunk: int | None = None  # bytes left in the current chunk; None: at a size line
        self._trailers = False

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buffer += data

    def take_continue(self) -> bool:
        """True once per request whose client waits for ``100 Continue`` before its body."""
        head = self._head
        if head is None or not head.expects_continue:
            return False
        head.expects_continue = False
        return True

    def next_request(self) -> WireRequest | None:
        """The next complete request, or ``None`` until more bytes arrive."""
        if self._head is None:
            self._head = self._read_head()
            if self._head is None:
                return None
        length = self._head.length
        body = self._read_chunked() if length is None else self._read_fixed(length)
        if body is None:
            return None
        head, self._head = self._head, None
        return WireRequest(head.method, head.target, head.headers, body, head.keep_alive)

    # -- head --------------------------------------------------------------------------

    def _read_head(self) -> _Head | None:
        buffer = self._buffer
        while buffer.startswith(b"\r\n"):
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise WireError(431, f"request head is larger than {MAX_HEAD_BYTES} bytes")
            return None
        if end > MAX_HEAD_BYTES:
            raise WireError(431, f"request head is larger than {MAX_HEAD_BYTES} bytes")
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        method, target, version = _request_line(lines[0])
        headers = _header_fields(lines[1:])
        connection = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        keep_alive = version == "1.1" and "close" not in connection
        length = _body_length(headers)
        if length is not None and length > self._max_body:
            raise WireError(413, f"request body is larger than {self._max_body} bytes")
        self._body = bytearray()
        self._chunk, self._trailers = None, False
        expects_continue = (
            version == "1.1" and headers.get("expect", "").lower() == "100-continue" and length != 0
        )
        return _Head(method, target, headers, keep_alive, length, expects_continue)

    # -- body --------------------------------------------------------------------------

    def _read_fixed(self, length: int) -> bytes | None:
        if len(self._buffer) < length:
            return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return body

    def _read_chunked(self) -> bytes | None:
        while not self._trailers:
            step = self._read_size_line if self._chunk is None else self._read_chunk_data
            if not step():
                return None
        return bytes(self._body) if self._skip_trailers() else None

    def _read_size_line(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > 1024:
                raise WireError(400, "chunk size line is too long")
            return False
        size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()  # drop chunk extensions
        if not _HEX.fullmatch(size_text):
            raise WireError(400, f"bad chunk size {size_text!r}")
        del buffer[: end + 2]
        size = int(size_text, 16)
        if len(self._body) + size > self._max_body:
            raise WireError(413, f"request body is larger than {self._max_body} bytes")
        if size == 0:
            self._trailers = True
        else:
            self._chunk = size
        return True

    def _read_chunk_data(self) -> bool:
        buffer, size = self._buffer, self._chunk or 0
        if len(buffer) < size + 2:
            return False
        if buffer[size : size + 2] != b"\r\n":
            raise WireError(400, "chunk data is not followed by CRLF")
        self._body += buffer[:size]
        del buffer[: size + 2]
        self._chunk = None
        return True

    def _skip_trailers(self) -> bool:
        buffer = self._buffer
        if buffer.startswith(b"\r\n"):
            del buffer[:2]
            return True
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise WireError(431, "chunked trailers are too large")
            return False
        del buffer[: end + 4]
        return True


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise WireError(400, f"malformed request line {line[:100]!r}")
    version = _VERSIONS.get(parts[2])
    if version is None:
        if parts[2].startswith(b"HTTP/"):
            raise WireError(505, f"HTTP version {parts[2]!r} is not supported; use HTTP/1.1")
        raise WireError(400, f"malformed request line {line[:100]!r}")
    return parts[0].decode("ascii"), parts[1].decode("ascii"), version


def _header_fields(lines: list[bytes]) -> dict[str, str]:
    # One match checks every name at once; only a head that fails it is checked line by line,
    # to name the line at fault.
    if not _FIELD_NAMES.fullmatch(b"\r\n".join(lines)):
        for line in lines:
            name, colon, _ = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                # Also refuses obsolete line folding (a line starting with whitespace).
                raise WireError(400, f"malformed header line {line[:100]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _body_length(headers: Mapping[str, str]) -> int | None:
    """The Content-Length, ``None`` for chunked, 0 for no body."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if "content-length" in headers:
            raise WireError(400, "both Transfer-Encoding and Content-Length are set")
        if coding.strip().lower() != "chunked":
            raise WireError(501, f"Transfer-Encoding {coding!r} is not supported; use chunked")
        return None
    declared = headers.get("content-length")
    if declared is None:
        return 0
    values = {value.strip() for value in declared.split(",")}
    if len(values) != 1:
        raise WireError(400, f"conflicting Content-Length values {declared!r}")
    value = values.pop()
    if not value.isdigit() or not value.isascii():
        raise WireError(400, f"bad Content-Length {declared!r}")
    return int(value)


def encode_response(
    status: int,
    content_type: str,
    body: bytes,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    close: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length (and ``Connection: close``)."""
    lines = [
        f"HTTP/1.1 {status} {_PHRASES[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
