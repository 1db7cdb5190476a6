"""The Amberflo HTTP client: wire format, answers, and the mapping of every failure."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import httpx
import psutil
import pytest

from sync import __version__
from sync.amberflo import AmberfloClient, parse_retry_after
from sync.emulator import EmulatorHandle
from sync.errors import AuthError, PermanentError, RetriableError

API_KEY = "test-key-0123456789abcdef"
BASE = "https://amberflo.test"

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, **kwargs: object) -> AmberfloClient:
    """A client whose requests are answered in-process by ``handler``."""
    return AmberfloClient(
        api_key=API_KEY,
        base_url=BASE,
        transport=httpx.MockTransport(handler),
        **kwargs,  # type: ignore[arg-type]
    )


def status(code: int, **kwargs: object) -> Handler:
    """A handler that answers every request with ``code`` (and the given body or headers)."""
    return lambda _: httpx.Response(code, **kwargs)  # type: ignore[arg-type]


E = TypeVar("E", bound=Exception)


def raised(handler: Handler, call: Callable[[AmberfloClient], object], error_type: type[E]) -> E:
    """The error ``call`` raises on a client whose requests ``handler`` answers."""
    with make_client(handler) as client, pytest.raises(error_type) as caught:
        call(client)
    return caught.value


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


def answering(
    seen: list[httpx.Request], response: Callable[[httpx.Request], httpx.Response]
) -> Handler:
    """A handler that records each request before answering it."""

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return response(request)

    return handler


def test_every_request_carries_the_key_json_headers_user_agent_and_a_timeout(
    seen: list[httpx.Request],
) -> None:
    """Requests send x-api-key, JSON Accept/Content-Type, our User-Agent and explicit timeouts."""
    with make_client(answering(seen, lambda _: httpx.Response(200, json={})), timeout=7.5) as c:
        c.get_customer("u1")
    (request,) = seen
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"amberflo-sync/{__version__}"
    assert request.extensions["timeout"] == {
        "connect": 7.5,
        "read": 7.5,
        "write": 7.5,
        "pool": 7.5,
    }


def test_get_customer_reads_the_query_form_and_maps_empty_object_to_none(
    seen: list[httpx.Request],
) -> None:
    """GET /customers?customerId= returns the customer, and Amberflo's ``{}`` means none."""
    customers = {"u1": {"customerId": "u1", "customerName": "Ada"}}

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=customers.get(request.url.params["customerId"], {}))

    with make_client(answering(seen, respond)) as client:
        assert client.get_customer("u1") == {"customerId": "u1", "customerName": "Ada"}
        assert client.get_customer("nobody") is None
    assert [str(r.url) for r in seen] == [
        f"{BASE}/customers?customerId=u1",
        f"{BASE}/customers?customerId=nobody",
    ]


def test_create_and_replace_send_compact_json_in_the_given_key_order(
    seen: list[httpx.Request],
) -> None:
    """POST and PUT /customers carry the body as compact JSON, keys in the caller's order."""
    body = {"customerName": "Zoë", "customerId": "u1", "traits": {"b": "1", "a": "2"}}
    with make_client(answering(seen, lambda r: httpx.Response(200, content=r.content))) as c:
        assert c.create_customer(body) == body
        assert c.replace_customer(body) == body
    assert [(r.method, r.url.path) for r in seen] == [("POST", "/customers"), ("PUT", "/customers")]
    expected = '{"customerName":"Zoë","customerId":"u1","traits":{"b":"1","a":"2"}}'.encode()
    assert [r.content for r in seen] == [expected, expected]


def test_ingest_posts_a_gzipped_array_that_is_byte_identical_when_resent(
    seen: list[httpx.Request],
) -> None:
    """POST /ingest is gzip JSON, the same bytes on a re-send, and returns Amberflo's count."""

    def respond(request: httpx.Request) -> httpx.Response:
        records = json.loads(gzip.decompress(request.content))
        return httpx.Response(200, text=f"{len(records)} records were ingested")

    records = [
        {"customerId": "u1", "meterApiName": "page", "meterValue": 1, "meterTimeInMillis": 5},
        {"customerId": "u2", "meterApiName": "page", "meterValue": 2.5, "meterTimeInMillis": 6},
    ]
    with make_client(answering(seen, respond)) as client:
        assert client.ingest(records) == 2
        assert client.ingest(records) == 2
    first, second = seen
    assert first.url.path == "/ingest"
    assert first.headers["content-encoding"] == "gzip"
    assert first.content == second.content
    assert json.loads(gzip.decompress(first.content)) == records


def test_ingest_url_moves_ingest_alone_to_another_host(seen: list[httpx.Request]) -> None:
    """With ingest_url set, ingest goes there and customers stay on base_url."""

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ingest":
            return httpx.Response(200, text="1 records were ingested")
        return httpx.Response(200, json={})

    handler = answering(seen, respond)
    with make_client(handler, ingest_url="https://ingest.amberflo.test/") as client:
        client.ingest([{"customerId": "u1"}])
        client.get_customer("u1")
    assert [r.url.host for r in seen] == ["ingest.amberflo.test", "amberflo.test"]


def test_ingest_of_nothing_sends_nothing(seen: list[httpx.Request]) -> None:
    """An empty batch is acknowledged locally without a request."""
    with make_client(answering(seen, lambda _: httpx.Response(500))) as client:
        assert client.ingest([]) == 0
    assert seen == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 records were ingested", 3),
        ("1 records were ingested", 1),
        ("  3 Records were ingested\n", 3),
    ],
)
def test_ingest_accepts_amberflos_acknowledgement(text: str, expected: int) -> None:
    """The count comes from Amberflo's plain-text "N records were ingested"."""
    records = [{"n": i} for i in range(expected)]
    with make_client(lambda _: httpx.Response(200, text=text)) as client:
        assert client.ingest(records) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("2 records were ingested", "3 records sent, 2 acknowledged"),
        ("OK", "no 'N records were ingested' answer"),
        ("", "no 'N records were ingested' answer"),
    ],
)
def test_ingest_refuses_an_answer_that_does_not_acknowledge_every_record(
    text: str, match: str
) -> None:
    """A success whose body does not acknowledge the whole batch is an error, not a pass."""
    error = raised(
        status(200, text=text), lambda c: c.ingest([{"n": 1}, {"n": 2}, {"n": 3}]), PermanentError
    )
    assert match in str(error)
    assert error.status == 200
    assert error.endpoint == "POST /ingest"


def test_a_customer_answer_that_is_not_a_json_object_is_an_error() -> None:
    """GET /customers answering HTML or a list raises PermanentError naming the endpoint."""
    html = raised(
        status(200, text="<html>down</html>"), lambda c: c.get_customer("u1"), PermanentError
    )
    assert "GET /customers: the answer is not JSON" in str(html)
    listed = raised(status(200, json=[1, 2]), lambda c: c.get_customer("u1"), PermanentError)
    assert "not a JSON object" in str(listed)


def test_list_customers_walks_every_page(seen: list[httpx.Request]) -> None:
    """list_customers follows /customers/paging from page 1 to totalFilteredPages."""
    everyone = [{"customerId": f"u{i}"} for i in range(5)]

    def respond(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        page = int(request.url.params["page"])
        items = everyone[(page - 1) * limit : page * limit]
        pages = -(-len(everyone) // limit)
        return httpx.Response(
            200, json={"items": items, "metadata": {"totalFilteredPages": pages, "page": page}}
        )

    with make_client(answering(seen, respond)) as client:
        assert list(client.list_customers(page_size=2)) == everyone
    assert [r.url.params["page"] for r in seen] == ["1", "2", "3"]
    assert {r.url.path for r in seen} == {"/customers/paging"}


def test_list_customers_stops_at_an_empty_page_without_metadata() -> None:
    """Without metadata, an empty page ends the listing."""
    pages = {"1": [{"customerId": "a"}], "2": []}

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": pages[request.url.params["page"]]})

    with make_client(respond) as client:
        assert list(client.list_customers()) == [{"customerId": "a"}]


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        (status(401), AuthError, "check AMBERFLO_API_KEY"),
        (status(403, json={"message": "Forbidden"}), AuthError, "rejected the API key"),
        (status(429), RetriableError, "throttling"),
        (status(500, json={"message": "Internal server error"}), RetriableError,
         "Internal server error"),
        (status(502, text="Bad Gateway"), RetriableError, "502"),
        (status(503), RetriableError, "503"),
        (status(400, json={"errorMessage": "meterValue must be a number"}), PermanentError,
         "^meterValue must be a number$"),
        (status(404, json={"message": "customer not found"}), PermanentError,
         "^customer not found$"),
        (status(422, text="unprocessable thing"), PermanentError, "^unprocessable thing$"),
        (status(409), PermanentError, "^Conflict$"),
        (status(302, headers={"Location": "https://elsewhere.test/"}), PermanentError, "Found"),
    ],
)  # fmt: skip
def test_each_failure_status_maps_to_what_the_caller_does_next(
    handler: Handler, error_type: type[Exception], message: str
) -> None:
    """401/403 are fatal, 429/5xx retriable, other statuses permanent with Amberflo's message."""
    with make_client(handler) as client, pytest.raises(error_type) as caught:
        client.replace_customer({"customerId": "u1"})
    error = caught.value
    assert type(error) is error_type
    assert isinstance(error, AuthError | RetriableError | PermanentError)
    assert error.endpoint == "PUT /customers"
    assert error.status == handler(httpx.Request("PUT", BASE)).status_code
    assert isinstance(error.__cause__, httpx.HTTPStatusError)
    assert API_KEY not in str(error)
    assert re.search(message, str(error))


def test_a_long_error_body_is_cut_to_a_readable_length() -> None:
    """A huge error page becomes a message of at most a few hundred characters."""
    error = raised(
        status(400, text="x" * 10_000),
        lambda c: c.create_customer({"customerId": "u1"}),
        PermanentError,
    )
    assert 0 < len(str(error)) <= 503
    assert str(error).endswith("...")


def test_429_carries_retry_after_in_seconds_or_as_a_date() -> None:
    """Retry-After is parsed from delta-seconds and from an HTTP-date."""

    def retry_after(headers: dict[str, str]) -> float | None:
        handler = status(429, headers=headers)
        return raised(handler, lambda c: c.get_customer("u1"), RetriableError).retry_after

    assert retry_after({"Retry-After": "7"}) == 7.0
    assert retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # past: now
    assert retry_after({}) is None


NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        ("0.25", 0.25),
        (" 3 ", 3.0),
        ("-5", 0.0),
        ("Wed, 01 Jan 2025 12:00:30 GMT", 30.0),
        ("Wednesday, 01-Jan-25 12:01:00 GMT", 60.0),
        ("Wed, 01 Jan 2025 11:00:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After gives seconds from delta-seconds or HTTP-dates; junk gives None."""
    assert parse_retry_after(header, now=NOW) == expected


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_transport_failures_are_retriable_without_a_status(error: httpx.TransportError) -> None:
    """Refused, timed-out and dropped connections raise RetriableError(status=None), chained."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with make_client(handler) as client, pytest.raises(RetriableError) as caught:
        client.ingest([{"customerId": "u1"}])
    assert caught.value.status is None
    assert caught.value.endpoint == "POST /ingest"
    assert caught.value.__cause__ is error
    assert type(error).__name__ in str(caught.value)


def test_the_api_key_never_reaches_an_error_message() -> None:
    """An error body or transport message that echoes the key is redacted."""
    echoed = status(400, json={"message": f"bad key {API_KEY} in request"})
    error = raised(echoed, lambda c: c.create_customer({"customerId": "u1"}), PermanentError)
    assert API_KEY not in str(error)
    assert str(error) == "bad key [redacted] in request"

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused {request.headers['x-api-key']}")

    with make_client(handler) as client, pytest.raises(RetriableError) as caught_transport:
        client.get_customer("u1")
    assert API_KEY not in str(caught_transport.value)


def test_an_empty_api_key_is_refused_up_front() -> None:
    """A client cannot be built without a key."""
    with pytest.raises(ValueError, match="api_key"):
        AmberfloClient(api_key="")


def test_closing_the_client_closes_its_pool() -> None:
    """After close, the client refuses to send."""
    client = make_client(status(200, json={}))
    client.close()
    with pytest.raises(RuntimeError):
        client.get_customer("u1")


# -- the direct transport, over real sockets ---------------------------------------------------


class OneShotServer:
    """A loopback HTTP server that answers each connection's first request with ``{}`` and then
    closes it, as a server whose keep-alive timeout expired does; or, with ``silent``, reads
    requests and never answers. Counts the connections it accepted."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._open: list[socket.socket] = []
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            conn.recv(65536)
            if not self.silent:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                conn.sendall(b"Content-Length: 2\r\n\r\n{}")
                conn.close()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in
        self._listener.close()
        for conn in self._open:
            conn.close()
        self._thread.join()


def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error() -> None:
    """An idle connection closed by the server is noticed before reuse: the next request
    goes out on a new connection and succeeds."""
    server = OneShotServer()
    try:
        with AmberfloClient(api_key=API_KEY, base_url=server.url, timeout=5.0) as client:
            for _ in range(3):
                assert client.get_customer("u1") is None
                time.sleep(0.05)  # lets the server's close reach the client
    finally:
        server.close()
    assert server.connections == 3


def test_connections_are_kept_alive_between_requests(emulator: EmulatorHandle) -> None:
    """Sequential requests reuse one kept-alive connection rather than opening one each."""
    with AmberfloClient(api_key=API_KEY, base_url=emulator.url, timeout=5.0) as client:
        for i in range(20):
            client.create_customer({"customerId": f"c{i}", "customerName": "C"})
            assert client.get_customer(f"c{i}") is not None
        opened = {conn.laddr for conn in psutil.Process().net_connections("tcp")}
    server_port = int(emulator.url.rsplit(":", 1)[1])
    client_ends = [addr for addr in opened if addr.port != server_port]
    # One open, pooled socket: none would mean a connection per request, more would mean none
    # was reused.
    assert len(client_ends) == 1


def test_an_answer_that_does_not_come_in_time_is_a_retriable_timeout() -> None:
    """A server that reads the request and never answers raises RetriableError after the
    read timeout, with no status."""
    server = OneShotServer(silent=True)
    try:
        with (
            AmberfloClient(api_key=API_KEY, base_url=server.url, timeout=0.2) as client,
            pytest.raises(RetriableError) as caught,
        ):
            client.get_customer("u1")
    finally:
        server.close()
    assert caught.value.status is None
    assert "ReadTimeout" in str(caught.value)


def test_a_refused_connection_is_a_retriable_connect_error() -> None:
    """Nobody listening on the port raises RetriableError naming the connect failure."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with (
        AmberfloClient(api_key=API_KEY, base_url=url, timeout=2.0) as client,
        pytest.raises(RetriableError) as caught,
    ):
        client.get_customer("u1")
    assert "ConnectError" in str(caught.value)
