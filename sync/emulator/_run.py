"""Running the emulator: blocking for the CLI, or in a background thread for tests."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from sync.emulator._app import App
from sync.emulator._http import bind, serve_on, url_of
from sync.emulator._options import EmulatorOptions

log = structlog.get_logger(__name__)

TEST_OPTIONS = EmulatorOptions(port=0)
"""The default of :func:`running_emulator`: loopback, any free port, no faults."""


class EmulatorHandle:
    """A running emulator as tests see it: its URL and direct, thread-safe access to its data.

    Every read returns a copy. The same data is served over HTTP under ``/_emulator/``.
    """

    def __init__(self, url: str, app: App) -> None:
        self.url = url
        self._app = app

    def customers(self) -> dict[str, dict[str, Any]]:
        """Every stored customer, by customerId."""
        return self._app.store.customers()

    def ingested(self) -> list[dict[str, Any]]:
        """Every unique meter record, in arrival order."""
        return self._app.store.ingested()

    def stats(self) -> dict[str, Any]:
        """Requests by route and status (``"drop"`` for dropped ones); records received,
        unique and duplicated; the number of customers."""
        return self._app.store.stats()

    def requests(self) -> list[dict[str, Any]]:
        """The most recent API requests (method, path, status; status ``None`` = dropped)."""
        return self._app.store.requests()

    def faults(self) -> dict[str, Any]:
        """The fault settings in force."""
        return self._app.faults.settings().as_dict()

    def set_faults(self, **changes: Any) -> None:
        """Change fault settings (``rate_429``, ``retry_after``, ``rate_5xx``, ``rate_drop``,
        ``latency_ms``, ``fail_all``, ``reject_customers``); raises ``ConfigError`` for an unknown
        name or bad value."""
        self._app.faults.update(**changes)

    def reset(self) -> None:
        """Forget every customer, record and counter; faults go back to the start-up options."""
        self._app.reset()


def serve(options: EmulatorOptions) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and return.

    Prints ``Amberflo emulator listening on <url>`` once the socket is bound, so a user (or a
    script that started it with ``port=0``) knows where to point ``AMBERFLO_BASE_URL``.
    """
    sock = bind(options.host, options.port)
    app = App(options)
    url = url_of(sock)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def ready() -> None:
            print(f"Amberflo emulator listening on {url}", flush=True)
            log.info("emulator_started", url=url, **app.faults.settings().as_dict())

        await serve_on(app, sock, stop, ready)

    try:
        asyncio.run(main())
    finally:
        sock.close()
    stats = app.store.stats()
    log.info(
        "emulator_stopped",
        requests=stats["requests_total"],
        records_unique=stats["records_unique"],
        customers=stats["customers"],
    )


@contextmanager
def running_emulator(options: EmulatorOptions = TEST_OPTIONS) -> Iterator[EmulatorHandle]:
    """Serve in a background thread on a real socket; yield a handle; stop on exit.

    The socket is bound and listening before this yields, so the first request cannot race the
    start-up; on exit every connection is closed and the thread joined.
    """
    sock = bind(options.host, options.port)
    app = App(options)
    thread = _ServerThread(app, sock)
    try:
        thread.start()
        yield EmulatorHandle(url_of(sock), app)
    finally:
        thread.stop()
        sock.close()


class _ServerThread:
    """An event loop in a daemon thread serving one app; ``stop`` is callable from any thread."""

    def __init__(self, app: App, sock: Any) -> None:
        self._app = app
        self._sock = sock
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amberflo-emulator", daemon=True)

    def start(self) -> None:
        """Start serving; returns once the loop accepts connections, or raises its error."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError("the emulator failed to start") from self._error

    def stop(self) -> None:
        """Close every connection, stop the loop and join the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve_on(self._app, self._sock, self._stop, self._ready.set)
