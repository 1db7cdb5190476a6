"""Append-only JSON Lines files: per-run failure and dead-letter logs, and ``runs.jsonl``.

Appends are not atomic, so a crash can leave a torn last line. Readers skip a line that does not
parse (and say so in the log); writers start on a fresh line if the file does not end with one,
so a torn line never swallows the next record.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import structlog

from sync.state._atomic import ensure_dir, fsync_dir

log = structlog.get_logger(__name__)


def encode_line(obj: Mapping[str, Any]) -> bytes:
    """One JSON object as one line (values JSON cannot hold are written as their ``str``)."""
    return (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode()


class JsonlLog:
    """A per-run JSON Lines log; the file is created on the first write only.

    Safe to write from several threads (delivery reports outcomes from its workers). Each line is
    flushed as it is written; ``close`` also fsyncs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file: BinaryIO | None = None
        self._closed = False
        self._lock = threading.Lock()

    def write(self, obj: Mapping[str, Any]) -> None:
        """Append ``obj`` as one line and flush it."""
        line = encode_line(obj)
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path} is closed")
            if self._file is None:
                self._file = _open_for_append(self.path)
            self._file.write(line)
            self._file.flush()
            self.count += 1

    def close(self) -> None:
        """Make the lines written durable and close the file (again is a no-op)."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def append_durably(path: Path, obj: Mapping[str, Any]) -> None:
    """Append one line to ``path`` and fsync it before returning."""
    with _open_for_append(path) as file:
        file.write(encode_line(obj))
        file.flush()
        os.fsync(file.fileno())


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON object in ``path``, in order; a line that does not parse is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("jsonl_line_skipped", file=str(path), line=number)
    return records


def _open_for_append(path: Path) -> BinaryIO:
    """Open ``path`` for appending, creating it durably, on a fresh line."""
    created = not path.exists()
    if created:
        ensure_dir(path.parent)
    file = path.open("ab")
    try:
        if created:
            fsync_dir(path.parent)
        elif file.tell() > 0 and not _ends_with_newline(path):
            file.write(b"\n")
    except BaseException:
        file.close()
        raise
    return file


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
