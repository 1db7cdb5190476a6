"""Reading Segment messages from files, folders and standard input (an I/O adapter).

Sources are paths: a file, a folder (read recursively, in sorted order, keeping the files named
``*.json``, ``*.jsonl``, ``*.ndjson`` and the same with ``.gz``), or ``-`` for standard input.
Each file's format is detected from its content, not its name:

- gzip by its magic bytes;
- NDJSON (one message a line, blank lines ignored) when the first line is a JSON value on its
  own. NDJSON streams line by line, and a malformed line is reported and skipped;
- otherwise JSON documents: a JSON array of messages (streamed item by item, never loaded
  whole), a Segment batch envelope ``{"batch": [...], "context": {...}, "integrations":
  {...}}``, or one pretty-printed message. A syntax error inside a document cannot be skipped
  (nothing says where the next item starts), so it is reported once and the file ends there.

An envelope's top-level ``context`` and ``integrations`` are merged into each item, the item's
own values winning (Segment's batch API does the same). An envelope is read whole, because its
``context`` may follow its ``batch``; Segment caps an envelope at 500 KB.

Every message comes out as a :class:`RawEvent` that says where it was read. A line or item that
is not a JSON object comes out with its ``error`` set: reading never stops for bad content, only
for a path that cannot be read (:class:`~sync.errors.SourceError`, naming the path).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, NamedTuple, cast

import orjson

from sync.errors import SourceError
from sync.events import json_type
from sync.orjson_safe import orjson_reads_exactly

__all__ = [
    "EVENT_SUFFIXES",
    "STDIN",
    "NdjsonBlock",
    "RawEvent",
    "events_of_block",
    "read_events",
    "read_stream",
    "read_units",
    "resolve_sources",
]

STDIN: Final = "-"
STDIN_SOURCE: Final = "<stdin>"
EVENT_SUFFIXES: Final = (".json", ".jsonl", ".ndjson")

_GZIP_MAGIC: Final = b"\x1f\x8b"
_UTF8_BOM: Final = b"\xef\xbb\xbf"
_CHUNK: Final = 1 << 16
# NDJSON is read a megabyte at a time: per-read overhead vanishes and memory stays bounded.
_NDJSON_BLOCK: Final = 1 << 20
_MAX_RAW_ON_ERROR: Final = 2000
# How close to the end of the buffer a decode error must be to mean "read more" rather than
# "malformed": JSON's longest token that can be cut mid-way without an open string is short.
_TRUNCATION_MARGIN: Final = 16
_DECODER: Final = json.JSONDecoder()


class RawEvent(NamedTuple):
    """One message as read: where from, its text, and either the decoded object or an error.

    ``line`` is the 1-based line where the message starts (for an envelope's items: where the
    envelope starts). ``raw`` is the line or item text as read; an envelope's item is given
    with the envelope's context merged in, so a dead letter can be replayed on its own.

    A named tuple rather than a frozen dataclass: one is built per message read, and a tuple
    is built three times faster.
    """

    source: str
    line: int
    raw: str
    message: dict[str, Any] | None
    error: str | None = None


def resolve_sources(sources: Sequence[str]) -> list[str]:
    """Expand folders into their event files and check that every path exists.

    Done before anything is read, so a mistyped second path fails the run before the first
    file is sent.
    """
    resolved: list[str] = []
    for source in sources:
        if source == STDIN:
            resolved.append(STDIN)
            continue
        path = Path(source)
        if path.is_dir():
            resolved.extend(str(found) for found in _event_files(path))
        elif path.is_file():
            resolved.append(source)
        else:
            raise SourceError(
                f"event source {source} does not exist (give a file, a folder or - for stdin)"
            )
    return resolved


def read_events(sources: Sequence[str], *, stdin: BinaryIO | None = None) -> Iterator[RawEvent]:
    """Every message of ``sources``, in order; paths are checked at once (``SourceError``)."""
    return _events(read_units(sources, stdin=stdin))


def read_units(
    sources: Sequence[str], *, stdin: BinaryIO | None = None
) -> Iterator[RawEvent | NdjsonBlock]:
    """What :func:`read_events` reads, with NDJSON left as blocks of lines not yet parsed.

    Parsing a block (:func:`events_of_block`) is most of the cost of reading, and needs
    nothing but the block: it may be done elsewhere, in another process, while the next block
    is read. Paths are checked at once (``SourceError``).
    """
    return _read_all(resolve_sources(sources), stdin)


def read_stream(stream: BinaryIO, source: str) -> Iterator[RawEvent]:
    """Every message of one binary stream (gzip or not), named ``source`` in the results.

    The stream is left open: whoever opened it closes it.
    """
    return _events(_stream_units(stream, source))


def _events(units: Iterable[RawEvent | NdjsonBlock]) -> Iterator[RawEvent]:
    for unit in units:
        if isinstance(unit, NdjsonBlock):
            yield from events_of_block(unit)
        else:
            yield unit


def _stream_units(stream: BinaryIO, source: str) -> Iterator[RawEvent | NdjsonBlock]:
    buffered = (
        stream
        if isinstance(stream, io.BufferedReader)
        else io.BufferedReader(cast(io.RawIOBase, stream))
    )
    gunzipped = (
        gzip.GzipFile(fileobj=buffered, mode="rb") if buffered.peek(2)[:2] == _GZIP_MAGIC else None
    )
    binary: io.BufferedIOBase = gunzipped or buffered
    try:
        head, first = _head(binary)
        if first is None:
            return
        if _starts_document(first):
            yield from _read_document_text(source, head, binary)
        else:
            yield from _ndjson_blocks(source, head, binary)
    finally:
        # Detach rather than close: closing the wrappers would close the caller's stream.
        if gunzipped is not None:
            gunzipped.close()  # a GzipFile given a fileobj never closes that fileobj
        if buffered is not stream:
            buffered.detach()


def _head(stream: io.BufferedIOBase) -> tuple[bytes, str | None]:
    """The bytes up to the end of the first line that is not blank, and that line (decoded);
    ``None`` when there is none. A leading UTF-8 byte-order mark is dropped."""
    read: list[bytes] = []
    while line := stream.readline():
        if not read:
            line = line.removeprefix(_UTF8_BOM)
        read.append(line)
        for part in line.splitlines():  # a lone "\r" ends a line too, as in text mode
            text = part.decode("utf-8", "surrogateescape")
            if text.strip():
                return b"".join(read), text
    return b"".join(read), None


def _read_document_text(source: str, head: bytes, stream: io.BufferedIOBase) -> Iterator[RawEvent]:
    """JSON documents (an array, an envelope, pretty-printed messages) are decoded as text."""
    text = io.TextIOWrapper(
        io.BufferedReader(_Replay(head, stream)),
        encoding="utf-8",
        # Bad bytes are kept as lone surrogates, so one bad line is reported, not the file.
        errors="surrogateescape",
    )
    try:
        lines = enumerate(text, start=1)
        number, line = next((number, line) for number, line in lines if line.strip())
        yield from _read_documents(source, _Scanner(line, text, number), lines)
    finally:
        text.detach()


class _Replay(io.RawIOBase):
    """``head`` (bytes already read from ``stream``), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: io.BufferedIOBase) -> None:
        super().__init__()
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            data, self._head = self._head[: len(view)], self._head[len(view) :]
        else:
            data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)


class NdjsonBlock(NamedTuple):
    """Whole NDJSON lines of one source, as read; :func:`events_of_block` parses them.

    ``first_line`` is the number of the block's first line in its source.
    """

    source: str
    first_line: int
    data: bytes


def _ndjson_blocks(source: str, head: bytes, stream: io.BufferedIOBase) -> Iterator[NdjsonBlock]:
    number = 1
    for block in _blocks(head, stream):
        yield NdjsonBlock(source, number, block)
        number += _count_lines(block)


def _count_lines(block: bytes) -> int:
    """The lines ``bytes.splitlines`` makes of ``block``: split at ``\n``, ``\r\n`` and a lone
    ``\r``, a last line without its ending counted too."""
    endings = block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
    return endings + (not block.endswith((b"\n", b"\r")) and len(block) > 0)


def events_of_block(block: NdjsonBlock) -> Iterator[RawEvent]:
    """The messages of an NDJSON block.

    Each line is parsed by orjson, which takes bytes and checks UTF-8 itself, at a fraction of
    the cost of decoding the line and parsing it with the standard library. A line orjson
    refuses is read again exactly as before (:func:`_read_line`), so that every line gets the
    standard library's verdict and message: NaN and Infinity are still read, a line that is not
    UTF-8 or not JSON is reported the same way. Lines are split where text mode splits them
    (``\n``, ``\r\n`` and a lone ``\r``), so line numbers are the ones an editor shows.
    """
    source = block.source
    fast = orjson_reads_exactly(block.data)
    for number, line in enumerate(block.data.splitlines(), start=block.first_line):
        stripped = line.strip()
        if not stripped:
            continue
        if fast:
            try:
                value = orjson.loads(stripped)
            except orjson.JSONDecodeError:
                pass
            else:
                # orjson only succeeds on valid UTF-8, so the strict decode cannot fail.
                raw = stripped.decode()
                if type(value) is dict and type(value.get("batch")) is not list:
                    yield RawEvent(source, number, raw, value)  # the common case, inlined
                else:
                    yield from _messages(source, number, raw, value)
                continue
        yield from _read_line(source, number, line.decode("utf-8", "surrogateescape"))


def _blocks(head: bytes, stream: io.BufferedIOBase) -> Iterator[bytes]:
    """``head`` and the rest of ``stream`` in blocks of whole lines (the last block: whatever
    follows the last line ending).

    ``read1`` takes what is at hand, up to a block: a pipe is processed as it flows rather than
    a megabyte at a time, and a gzip stream broken further on still yields what came before.
    """
    pending: list[bytes] = []  # the start of a line not ended yet, joined once it ends: O(n)
    chunk = head
    while chunk:
        end = _end_of_last_line(chunk)
        if end:
            yield b"".join([*pending, chunk[:end]])
            pending = [chunk[end:]]
        else:
            pending.append(chunk)
        chunk = stream.read1(_NDJSON_BLOCK)
    yield b"".join(pending)


def _end_of_last_line(data: bytes) -> int:
    """Where the last line ending in ``data`` ends (0: none). A final ``\r`` does not count,
    as the ``\n`` of its ``\r\n`` may be in the next block."""
    end = data.rfind(b"\n") + 1
    return end if end else data.rfind(b"\r", 0, len(data) - 1) + 1


def _read_all(paths: Iterable[str], stdin: BinaryIO | None) -> Iterator[RawEvent | NdjsonBlock]:
    for path in paths:
        if path == STDIN:
            stream = stdin if stdin is not None else sys.stdin.buffer
            yield from _guarded(STDIN_SOURCE, stream)
            continue
        try:
            with Path(path).open("rb") as handle:
                yield from _guarded(path, handle)
        except OSError as exc:  # opening failed; read errors are mapped by _guarded
            raise SourceError(f"event source {path} cannot be read: {exc.strerror}") from exc


def _guarded(source: str, stream: BinaryIO) -> Iterator[RawEvent | NdjsonBlock]:
    """Map I/O failures while reading (a truncated gzip, a disk error) to ``SourceError``."""
    try:
        yield from _stream_units(stream, source)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; EOFError is a gzip stream cut short.
        raise SourceError(
            f"event source {source} cannot be read: {exc} (is it a complete gzip or text file?)"
        ) from exc


def _event_files(folder: Path) -> list[Path]:
    def wanted(path: Path) -> bool:
        name = path.name.lower().removesuffix(".gz")
        return path.is_file() and name.endswith(EVENT_SUFFIXES) and not path.name.startswith(".")

    return sorted((path for path in folder.rglob("*") if wanted(path)), key=lambda p: p.as_posix())


def _starts_document(first_line: str) -> bool:
    """True when the first non-blank line opens a JSON document rather than an NDJSON line.

    An array always does. An object does when its line alone is valid JSON cut short at the
    end of the line (a pretty-printed ``{``); a line broken in the middle is a bad NDJSON line.
    """
    text = first_line.strip()
    if text.startswith("["):
        return True
    if not text.startswith("{"):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text)
    return False


def _read_lines(source: str, lines: Iterable[tuple[int, str]]) -> Iterator[RawEvent]:
    for number, line in lines:
        yield from _read_line(source, number, line)


def _read_line(source: str, number: int, line: str) -> Iterator[RawEvent]:
    """The messages of one NDJSON line, decoded with ``surrogateescape``; blank: none."""
    text = line.strip()
    if not text:
        return
    try:
        # Only a non-ASCII line can hold the lone surrogates that stand for bad bytes.
        if not text.isascii():
            text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        yield RawEvent(source, number, raw, None, "line is not valid UTF-8")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        yield RawEvent(source, number, text, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
        return
    yield from _messages(source, number, text, value)


def _messages(source: str, line: int, raw: str, value: object) -> Iterator[RawEvent]:
    """The messages in one decoded value: an object, an envelope, or an array of objects."""
    if isinstance(value, dict):
        batch = value.get("batch")
        if isinstance(batch, list):
            yield from _envelope(source, line, value, batch)
        else:
            yield RawEvent(source, line, raw, value)
    elif isinstance(value, list):
        for item in value:
            yield from _item(source, line, item)
    else:
        yield RawEvent(source, line, raw, None, f"expected a JSON object, got {json_type(value)}")


def _envelope(
    source: str, line: int, envelope: Mapping[str, Any], batch: list[Any]
) -> Iterator[RawEvent]:
    shared = {key: envelope[key] for key in ("context", "integrations") if key in envelope}
    for item in batch:
        yield from _item(source, line, _merge(shared, item) if isinstance(item, dict) else item)


def _item(source: str, line: int, item: object) -> Iterator[RawEvent]:
    raw = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    if isinstance(item, dict):
        yield RawEvent(source, line, raw, item)
    else:
        yield RawEvent(source, line, raw, None, f"expected a JSON object, got {json_type(item)}")


def _merge(shared: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """``item`` over ``shared``, nested objects merged key by key (the item wins); the item's
    keys keep their order and the shared ones it lacks follow."""
    merged: dict[str, Any] = {}
    for key, value in item.items():
        base = shared.get(key)
        if isinstance(value, Mapping) and isinstance(base, Mapping):
            merged[key] = _merge(base, value)
        else:
            merged[key] = value
    for key, value in shared.items():
        merged.setdefault(key, value)
    return merged


def _read_documents(
    source: str, scanner: _Scanner, lines: Iterator[tuple[int, str]]
) -> Iterator[RawEvent]:
    first = True
    try:
        while (char := scanner.peek()) is not None:
            if char == "[":
                for line, raw, value in scanner.array_items():
                    yield from _item_or_error(source, line, raw, value)
            else:
                try:
                    line, raw, value = scanner.value()
                except _MalformedJSONError:
                    if not first:
                        raise
                    # The first "document" did not parse: it was NDJSON whose first line is
                    # broken. Read everything again line by line, from the buffered text on.
                    yield from _read_lines(source, scanner.lines_from_cursor(lines))
                    return
                yield from _messages(source, line, raw.strip(), value)
            first = False
    except _MalformedJSONError as exc:
        error = f"invalid JSON: {exc.message} (line {exc.line}); the rest of this file was not read"
        yield RawEvent(source, exc.line, exc.raw, None, error)


def _item_or_error(source: str, line: int, raw: str, value: object) -> Iterator[RawEvent]:
    if isinstance(value, dict):
        yield from _messages(source, line, raw, value)
    else:
        yield RawEvent(source, line, raw, None, f"expected a JSON object, got {json_type(value)}")


class _MalformedJSONError(Exception):
    """A JSON document with a syntax error at ``line``."""

    def __init__(self, message: str, line: int, raw: str) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.raw = raw


class _Scanner:
    """Decodes JSON values one at a time from a text stream, counting lines.

    Only the text from the current value on is buffered, so a long array streams in constant
    memory (bounded by the largest item).
    """

    def __init__(self, text: str, stream: IO[str], line: int) -> None:
        self._buf = text
        self._pos = 0
        self._stream: IO[str] | None = stream
        self._chunk = _CHUNK
        self.line = line

    def peek(self) -> str | None:
        """Skip whitespace; the next character, or ``None`` at the end of the stream."""
        while True:
            buf, pos = self._buf, self._pos
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    self.line += 1
                pos += 1
            self._pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self._fill():
                return None

    def lines_from_cursor(self, rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """Numbered lines from the cursor on: the buffered text, then the rest of ``rest``.

        Everything from the value being decoded on is still buffered (the scanner drops only
        consumed text), so nothing read is lost when a caller switches to reading lines.
        """
        self.peek()
        buffered = self._buf[self._pos :]
        if not buffered.endswith("\n") and self._stream is not None:
            buffered += self._stream.readline()
        head = buffered.splitlines()
        start = self.line
        # ``rest`` counted only the lines it yielded itself; renumber what follows the buffer.
        tail = ((start + len(head) + index, text) for index, (_, text) in enumerate(rest))
        return chain(enumerate(head, start=start), tail)

    def value(self) -> tuple[int, str, Any]:
        """Decode the value at the cursor: (its first line, its text, the value)."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._maybe_truncated(exc) and self._fill():
                    continue
                raise self._malformed(exc.msg, exc.pos) from exc
            # A number that ends the buffer may go on in the next chunk.
            if end == len(self._buf) and self._fill():
                continue
            break
        self._chunk = _CHUNK
        raw = self._buf[self._pos : end]
        start = self.line
        self.line += raw.count("\n")
        self._pos = end
        return start, raw, value

    def array_items(self) -> Iterator[tuple[int, str, Any]]:
        """Stream the items of the array at the cursor, consuming it whole."""
        self._expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            char = self.peek()
            if char == ",":
                self._pos += 1
                self.peek()
            elif char == "]":
                self._pos += 1
                return
            else:
                raise self._malformed("expected ',' or ']' after an array item", self._pos)

    def _expect(self, char: str) -> None:
        if self.peek() != char:
            raise self._malformed(f"expected {char!r}", self._pos)
        self._pos += 1

    def _maybe_truncated(self, exc: json.JSONDecodeError) -> bool:
        return exc.pos >= len(self._buf) - _TRUNCATION_MARGIN or exc.msg.startswith(
            "Unterminated string"
        )

    def _fill(self) -> bool:
        """Read more text, dropping what is consumed; False at the end of the stream."""
        if self._stream is None:
            return False
        chunk = self._stream.read(self._chunk)
        if not chunk:
            self._stream = None
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        # Reads grow while one value spans many chunks (reset after each value), so a huge
        # item costs O(n) and not O(n^2) re-decoding.
        self._chunk = min(self._chunk * 2, 1 << 24)
        return True

    def _malformed(self, message: str, at: int) -> _MalformedJSONError:
        line = self.line + self._buf.count("\n", self._pos, at)
        line_start = self._buf.rfind("\n", 0, at) + 1
        line_end = self._buf.find("\n", at)
        raw = self._buf[line_start : line_end if line_end >= 0 else len(self._buf)]
        return _MalformedJSONError(message, line, raw.strip()[:_MAX_RAW_ON_ERROR])
