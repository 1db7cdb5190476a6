"""The emulator's network side: one ``asyncio.Protocol`` per connection, HTTP/1.1 keep-alive.

This layer only moves bytes: it frames requests (``_wire``), asks the :class:`App` for the fault
decision, waits out any injected latency, and writes the answer, or aborts the socket when the
answer is "drop" (the client sees its connection closed with no response at all).

A plain protocol rather than streams, because the emulator must never be the bottleneck of a
benchmark: a request is parsed and answered inside one ``data_received`` call, no task switch.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import cast

from sync.emulator._app import App, Request, Response
from sync.emulator._faults import Decision
from sync.emulator._validate import MAX_BODY_BYTES
from sync.emulator._wire import CONTINUE, RequestParser, WireError, encode_response
from sync.errors import ConfigError

BACKLOG = 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound now so the caller knows the port before serving starts.

    A port in use or an address that is not this machine's is a ``ConfigError`` (exit 2).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise ConfigError(
            f"the emulator cannot listen on {host}:{port} ({_reason(exc)}); "
            "choose another --host or --port (0 picks a free port)"
        ) from exc


def _reason(exc: OSError) -> str:
    # create_server rewrites strerror to name the address again; the errno text is enough.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def url_of(sock: socket.socket) -> str:
    """The base URL clients use to reach ``sock``."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_on(
    app: App, sock: socket.socket, stop: asyncio.Event, on_ready: Callable[[], None]
) -> None:
    """Serve ``app`` on the bound ``sock`` until ``stop`` is set, then close every connection."""
    loop = asyncio.get_running_loop()
    connections: set[_Connection] = set()
    server = await loop.create_server(lambda: _Connection(app, connections), sock=sock)
    try:
        on_ready()
        await stop.wait()
    finally:
        server.close()
        # Python 3.11's wait_closed does not wait for open connections: end them first, and
        # wait until each transport has really let go of its socket.
        await asyncio.gather(*(connection.close() for connection in list(connections)))
        await server.wait_closed()


class _Connection(asyncio.Protocol):
    """One client connection: frames requests and answers each, in order."""

    def __init__(self, app: App, registry: set[_Connection]) -> None:
        self._app = app
        self._registry = registry
        self._parser = RequestParser(MAX_BODY_BYTES)
        self._transport: asyncio.Transport | None = None
        self._pending: asyncio.TimerHandle | None = None  # an answer held back by latency
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # create_server gives a stream one
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        if self._pending is not None:
            self._pending.cancel()
        if not self._lost.done():
            self._lost.set_result(None)

    # A client that stops reading must not make the emulator buffer without bound.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self) -> asyncio.Future[None]:
        """Close the connection now; the future resolves once the socket is released."""
        if self._pending is not None:
            self._pending.cancel()
        if self._transport is not None:
            self._transport.abort()
        return self._lost

    # -- request cycle -------------------------------------------------------------------

    def _advance(self) -> None:
        """Answer every complete request in the buffer, unless one is held back by latency."""
        while self._pending is None and self._open():
            try:
                wire = self._parser.next_request()
            except WireError as exc:
                self._write(encode_response(*_error(exc.status, str(exc)), close=True))
                self._close()
                return
            if wire is None:
                if self._parser.take_continue():
                    self._write(CONTINUE)  # curl waits for this before sending a larger body
                return
            request = Request.from_wire(wire.method, wire.target, wire.headers, wire.body)
            decision = self._app.decide(request)
            if decision.delay_s > 0:
                loop = asyncio.get_running_loop()
                self._pending = loop.call_later(
                    decision.delay_s, self._answer_later, request, decision, wire.keep_alive
                )
                return
            self._answer(request, decision, keep_alive=wire.keep_alive)

    def _answer_later(self, request: Request, decision: Decision, keep_alive: bool) -> None:
        self._pending = None
        self._answer(request, decision, keep_alive=keep_alive)
        self._advance()  # requests pipelined during the delay are waiting

    def _answer(self, request: Request, decision: Decision, *, keep_alive: bool) -> None:
        response = self._app.respond(request, decision)
        if response is None:
            if self._transport is not None:
                self._transport.abort()  # the drop: no status line, no body, just gone
            return
        close = not keep_alive
        self._write(
            encode_response(
                response.status, response.content_type, response.body, response.headers, close=close
            )
        )
        if close:
            self._close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and self._open():
            self._transport.write(data)

    def _open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # flushes what was written, then closes


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    response = Response.json({"message": message}, status)
    return response.status, response.content_type, response.body
