"""The run lock: one run at a time per state folder.

``flock`` rather than a pid file: the kernel drops the lock when its holder dies, even by
``kill -9``, so there is never a stale lock to clean up. The holder's pid is written into the
file only so the refusal can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from sync.errors import LockHeldError
from sync.state._atomic import ensure_dir
from sync.state._layout import LOCK_FILE

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def hold_lock(directory: Path) -> Iterator[None]:
    """Hold the lock of ``directory`` for the ``with`` block; ``LockHeldError`` at once if taken."""
    ensure_dir(directory)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = _holder(fd)
            raise LockHeldError(
                f"another amberflo-sync run ({holder}) holds the lock on the state folder "
                f"{directory}; nothing was done. Wait for it to finish (the lock is released "
                "when that process exits), then run again."
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        log.debug("state_lock_acquired", directory=str(directory))
        try:
            yield
        finally:
            # Clear the pid before unlocking, so it never names a process that let go.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            log.debug("state_lock_released", directory=str(directory))
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """``pid N`` from the lock file, or a neutral phrase while the holder has not written it."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
