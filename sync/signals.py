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


@contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """Install the handlers for the duration of the block; yield the event they set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be installed from the main thread (tests run commands in
        # threads too); the caller's event still works for a programmatic stop.
        yield stop
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("stop_forced", signal=name)
            os._exit(EXIT_SIGNALLED)
        log.warning("stop_requested", signal=name, hint="send it again to exit at once")
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
