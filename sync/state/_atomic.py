"""Crash-safe file writes: a file is either the old one or the new one, never torn.

Every write goes to a temporary file in the target's folder, is flushed and ``fsync``-ed, then
``os.replace``-d over the target, and the folder itself is ``fsync``-ed so the rename survives a
power cut (after dlt's ``FileStorage.save_atomic``, with the fsyncs it leaves to the OS).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class Written:
    """What an atomic write produced: the sha256 of the bytes and how many there were."""

    sha256: str
    size: int


class HashingWriter:
    """A write-only file object that hashes every byte on its way to the real file.

    Hashing while writing means the content hash of a large Parquet file costs no second read.
    """

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` through to the target and add it to the hash."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += len(view)
        self._target.write(view)
        return len(view)

    def tell(self) -> int:
        """Bytes written so far (writers such as Parquet ask for the position)."""
        return self._size

    def flush(self) -> None:
        """Flush the underlying file's buffer."""
        self._target.flush()

    def writable(self) -> bool:
        """Always true: this object only writes."""
        return True

    def seekable(self) -> bool:
        """Always false: the hash is only right for a strictly sequential write."""
        return False

    @property
    def closed(self) -> bool:
        """Whether the underlying file is closed."""
        return self._target.closed

    def close(self) -> None:
        """Do nothing: the atomic write owns the underlying file and closes it after fsync."""

    @property
    def written(self) -> Written:
        """The digest and size of everything written so far."""
        return Written(sha256=self._hash.hexdigest(), size=self._size)


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (new names, renames, removals) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) durably if it is missing."""
    if directory.is_dir():
        return
    ensure_dir(directory.parent)
    directory.mkdir(exist_ok=True)
    fsync_dir(directory.parent)


def atomic_write(path: Path, produce: Callable[[HashingWriter], object]) -> Written:
    """Write ``path`` all or nothing; ``produce`` writes the content to the file it is given.

    If ``produce`` raises, the temporary file is removed and ``path`` is left as it was.
    """
    ensure_dir(path.parent)
    # mkstemp creates the file 0600: the state holds customer names and emails.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            writer = HashingWriter(file)
            produce(writer)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return writer.written


def atomic_write_bytes(path: Path, data: bytes) -> Written:
    """Write ``data`` to ``path`` all or nothing."""

    def produce(out: HashingWriter) -> None:
        out.write(data)

    return atomic_write(path, produce)


def replace_durably(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target`` (same folder) and make the rename durable."""
    source.replace(target)
    fsync_dir(target.parent)


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a leftover temporary file of an interrupted atomic write."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)
