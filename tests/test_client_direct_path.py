"""The client's direct path (its own sockets, no httpx.Client) against scripted loopback servers:
it sends what the httpx path sends, reads every answer framing Amberflo may use, and leaves the
environment's proxies to httpx."""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from sync.amberflo import AmberfloClient
from sync.emulator import EmulatorHandle
from sync.errors import RetriableError

API_KEY = "test-key-0123456789abcdef"
# A self-signed certificate for localhost and 127.0.0.1, valid 2000-2100, made for these tests.
TLS_FILES = Path(__file__).resolve().parent / "tls"


class ScriptedServer:
    """A loopback HTTP server that answers the n-th request it reads with ``answers[n]`` (raw
    bytes, sent as they are) and closes the connection after answers listed in ``close_after``.
    Keeps every request it read (head and body, raw) and counts connections."""

    def __init__(
        self,
        answers: list[bytes],
        *,
        close_after: frozenset[int] = frozenset(),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.answers = answers
        self.tls = tls
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except ssl.SSLError:  # the client refused the handshake
                    conn.close()
                    continue
            self._open.append(conn)
            try:
                while self._answer_one(conn):
                    pass
            except OSError:  # close() closed the connection under a waiting recv
                return

    def _answer_one(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            body += conn.recv(65536)
        number = len(self.requests)
        self.requests.append(head + b"\r\n\r\n" + body)
        conn.sendall(self.answers[number])
        if number in self.close_after:
            conn.close()
            return False
        return True

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in
        self._listener.close()
        for conn in self._open:
            conn.close()
        self._thread.join()


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment without proxy settings, whatever the machine running the tests has."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def head_of(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """The request line, the header fields by lower-case name, and the body of a raw request."""
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (field.partition(":") for field in fields)
    }
    return line, headers, body


@pytest.mark.usefixtures("no_proxy_env")
def test_the_direct_path_sends_what_the_httpx_path_sends() -> None:
    """The same calls through both paths give the same request lines (query encoding
    included), the same key, JSON, User-Agent, Host and Content-Length headers and the same
    bodies, gzip framing of ingest included."""
    customer = {"customerId": "a b+c/é", "customerName": "Zoë", "traits": {"plan": "pro"}}
    ack = b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n1 records were ingested"
    answers = [OK_EMPTY, OK_EMPTY, OK_EMPTY, ack]
    server = ScriptedServer(answers * 2)
    try:
        for transport in (None, httpx.HTTPTransport()):
            with AmberfloClient(
                api_key=API_KEY, base_url=server.url, timeout=5.0, transport=transport
            ) as client:
                client.get_customer("a b+c/é&x=1")
                client.create_customer(customer)
                client.replace_customer(customer)
                client.ingest([{"customerId": "c", "meterApiName": "m", "meterValue": 1}])
    finally:
        server.close()
    direct, via_httpx = server.requests[:4], server.requests[4:]
    compared = ("host", "x-api-key", "accept", "content-type", "user-agent", "content-length")
    for ours, theirs in zip(direct, via_httpx, strict=True):
        line, headers, body = head_of(ours)
        their_line, their_headers, their_body = head_of(theirs)
        assert line == their_line
        assert {k: headers.get(k) for k in compared} == {k: their_headers.get(k) for k in compared}
        assert body == their_body
    assert head_of(direct[0])[0] == "GET /customers?customerId=a+b%2Bc%2F%C3%A9%26x%3D1 HTTP/1.1"
    assert gzip.decompress(head_of(direct[3])[2]).startswith(b'[{"customerId":"c"')


@pytest.mark.usefixtures("no_proxy_env")
def test_chunked_interim_and_read_to_close_answers_are_read_whole() -> None:
    """A chunked answer (extensions, trailer) after a 100 Continue, then an HTTP/1.0 answer
    that ends with the connection, are both read whole."""
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'7;ext=1\r\n{"custo\r\n'
        b'10\r\nmerId":"u1","cus\r\n'
        b'f\r\ntomerName":"A"}\r\n'
        b"0\r\nX-Trailer: t\r\n\r\n"
    )
    to_close = b'HTTP/1.0 200 OK\r\n\r\n{"customerId":"u1","customerName":"A"}'
    server = ScriptedServer([chunked, to_close], close_after=frozenset({1}))
    try:
        with AmberfloClient(api_key=API_KEY, base_url=server.url, timeout=5.0) as client:
            assert client.get_customer("u1") == {"customerId": "u1", "customerName": "A"}
            assert client.get_customer("u1") == {"customerId": "u1", "customerName": "A"}
    finally:
        server.close()
    # The chunked answer, read to its end, left the connection usable for the second request.
    assert server.connections == 1
    assert len(server.requests) == 2


@pytest.mark.usefixtures("no_proxy_env")
def test_an_answer_that_says_close_is_not_reused() -> None:
    """After an answer with ``Connection: close`` the next request opens a new connection."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    server = ScriptedServer([closing, OK_EMPTY, OK_EMPTY], close_after=frozenset({0}))
    try:
        with AmberfloClient(api_key=API_KEY, base_url=server.url, timeout=5.0) as client:
            for _ in range(3):
                assert client.get_customer("u1") is None
    finally:
        server.close()
    assert server.connections == 2


@pytest.mark.usefixtures("no_proxy_env")
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}", "body ended early"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    ],
)
def test_a_malformed_answer_is_a_retriable_protocol_error(answer: bytes, reason: str) -> None:
    """An answer that is not HTTP/1.1 as Amberflo speaks it raises RetriableError (no
    status) naming what was wrong."""
    server = ScriptedServer([answer], close_after=frozenset({0}))
    try:
        with (
            AmberfloClient(api_key=API_KEY, base_url=server.url, timeout=5.0) as client,
            pytest.raises(RetriableError) as caught,
        ):
            client.get_customer("u1")
    finally:
        server.close()
    assert caught.value.status is None
    assert "RemoteProtocolError" in str(caught.value)
    assert reason in str(caught.value)


def test_a_proxy_in_the_environment_is_used_through_httpx(
    no_proxy_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, requests go to the proxy in absolute form, as httpx sends them."""
    proxy = ScriptedServer([OK_EMPTY])
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    try:
        with AmberfloClient(
            api_key=API_KEY, base_url="http://amberflo.invalid", timeout=5.0
        ) as client:
            assert client.get_customer("u1") is None
    finally:
        proxy.close()
    line, headers, _ = head_of(proxy.requests[0])
    assert line == "GET http://amberflo.invalid/customers?customerId=u1 HTTP/1.1"
    assert headers["x-api-key"] == API_KEY


@pytest.mark.usefixtures("no_proxy_env")
def test_the_direct_path_refuses_requests_once_closed() -> None:
    """After close, the client refuses to send, as httpx's client does."""
    client = AmberfloClient(api_key=API_KEY, base_url="http://127.0.0.1:9", timeout=5.0)
    client.close()
    with pytest.raises(RuntimeError):
        client.get_customer("u1")


@pytest.mark.usefixtures("no_proxy_env")
def test_json_that_orjson_would_alter_survives_a_round_trip(emulator: EmulatorHandle) -> None:
    """A customer field holding an integer beyond 64 bits or a lone surrogate comes back
    from the emulator exactly as stored (both sides fall back to the json module)."""
    body = (
        b'{"customerId":"big","customerName":"Big","description":"\\ud800 lone",'
        b'"test":123456789012345678901234567890}'
    )
    # Sent as raw bytes: this client serializes only valid Unicode.
    answer = httpx.post(f"{emulator.url}/customers", content=body, headers={"x-api-key": API_KEY})
    answer.raise_for_status()
    with AmberfloClient(api_key=API_KEY, base_url=emulator.url, timeout=5.0) as client:
        found = client.get_customer("big")
    assert found is not None
    assert found["test"] == 123456789012345678901234567890
    assert found["description"] == "\ud800 lone"


def test_https_goes_through_tls_with_the_trusted_certificates(
    no_proxy_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https the direct path verifies the server's certificate (trusting SSL_CERT_FILE,
    as httpx does), sends the server's name, and keeps the TLS connection alive."""
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(TLS_FILES / "cert.pem", TLS_FILES / "key.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_FILES / "cert.pem"))
    server = ScriptedServer([OK_EMPTY, OK_EMPTY], tls=server_tls)
    url = server.url.replace("http://127.0.0.1", "https://localhost")
    try:
        with AmberfloClient(api_key=API_KEY, base_url=url, timeout=5.0) as client:
            assert client.get_customer("u1") is None
            assert client.get_customer("u2") is None
    finally:
        server.close()
    assert server.connections == 1
    _, headers, _ = head_of(server.requests[1])
    assert headers["host"] == url.removeprefix("https://")


def test_a_certificate_nobody_trusts_is_refused(no_proxy_env: None) -> None:
    """A server whose certificate is not trusted gets no request: the connection fails with
    a ConnectError before anything is sent."""
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(TLS_FILES / "cert.pem", TLS_FILES / "key.pem")
    server = ScriptedServer([OK_EMPTY], tls=server_tls)
    url = server.url.replace("http://127.0.0.1", "https://localhost")
    try:
        with (
            AmberfloClient(api_key=API_KEY, base_url=url, timeout=5.0) as client,
            pytest.raises(RetriableError) as caught,
        ):
            client.get_customer("u1")
    finally:
        server.close()
    assert "ConnectError" in str(caught.value)
    assert server.requests == []


@pytest.mark.usefixtures("no_proxy_env")
def test_a_request_the_server_does_not_take_in_time_is_a_retriable_write_timeout() -> None:
    """A body the server never reads (it does not even accept the connection) fills the
    socket buffers; sending gives up after the timeout with a retriable WriteTimeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        body = {"customerId": "u1", "customerName": "x" * 64_000_000}
        with (
            AmberfloClient(api_key=API_KEY, base_url=url, timeout=0.3) as client,
            pytest.raises(RetriableError) as caught,
        ):
            client.create_customer(body)
    assert caught.value.status is None
    assert "WriteTimeout" in str(caught.value)
