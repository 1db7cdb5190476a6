"""Graceful stop on SIGTERM and SIGINT.

The first signal asks the run to stop: no new user is started, the requests in flight finish,
acknowledged users are committed and the run is recorded as interrupted. A second signal exits
at once; every state write is atomic, so the state folder is consistent either way (the lock is
an ``flock``, released by the kernel when the process ends).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import structlog

log = structlog.get_logger(__name__)

EXIT_SIGNALLED = 130
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CLOSE = b"\0"  # not a signal number: tells the watcher the block has ended


@contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """Install the handlers for the duration of the block; yield the event they set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be installed from the main thread (tests run commands in
        # threads too); the caller's event still works for a programmatic stop.
        yield stop
        return

    # A Python signal handler runs in the main thread between two of its bytecodes, while that
    # thread may hold any lock: the log's write lock (it logs every dead letter), an Event's
    # condition. A handler that logged or set the event could wait for itself forever. So the
    # handler only writes the signal's number to a pipe, which takes no lock, and a watcher
    # thread does the rest.
    read_end, write_end = os.pipe()
    watcher = threading.Thread(
        target=_watch, args=(read_end, stop), name="stop-watcher", daemon=True
    )
    watcher.start()

    def handle(signum: int, frame: FrameType | None) -> None:
        os.write(write_end, bytes([signum]))

    previous = {sig: signal.signal(sig, handle) for sig in _STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.write(write_end, _CLOSE)
        watcher.join()
        os.close(read_end)
        os.close(write_end)


def _watch(read_end: int, stop: threading.Event) -> None:
    """Turn the signal numbers the handler writes into a stop, then an exit at once."""
    while (received := os.read(read_end, 1)) not in (b"", _CLOSE):
        name = signal.Signals(received[0]).name
        if stop.is_set():
            log.warning("stop_forced", signal=name)
            os._exit(EXIT_SIGNALLED)
        log.warning("stop_requested", signal=name, hint="send it again to exit at once")
        stop.set()
