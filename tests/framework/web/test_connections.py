"""``framework.web.connections``: slow, silent and half-open clients against the web server.

Raw sockets play the hostile clients (a request line and one header, then nothing;
a body that stops halfway; a websocket that never answers a ping) against a real
container's server; timeouts are configured short so that each test waits well
under a second for the server to act, and every wait has a deadline.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import websocket
from werkzeug.wrappers import Request

from framework import concurrency
from framework.exceptions import ConfigurationError
from framework.web.connections import ConnectionLimits
from framework.web.handlers import http
from framework.web.server import WebServer
from framework.web.websocket import rpc

from .conftest import RunningService

TIMEOUT = 5.0


class Store:
    name = "store"

    calls: list[str] = []

    @http("GET", "/a")
    def a(self, request: Request) -> Any:
        return "a"

    @http("POST", "/upload")
    def upload(self, request: Request) -> Any:
        Store.calls.append("upload")
        return str(len(request.get_data()))

    @rpc
    def echo(self, socket_id: str, value: Any) -> Any:
        return value


@pytest.fixture(autouse=True)
def forget_calls() -> None:
    Store.calls.clear()


@pytest.fixture
def open_socket() -> Iterator[Callable[..., socket.socket]]:
    """Raw client sockets to a service, closed at teardown."""
    sockets: list[socket.socket] = []

    def connect(service: RunningService, first_bytes: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=TIMEOUT)
        sockets.append(sock)
        if first_bytes:
            sock.sendall(first_bytes)
        return sock

    yield connect

    for sock in sockets:
        sock.close()


HALF_OPEN = b"GET /a HTTP/1.1\r\nHost: x\r\n"  # no blank line: headers never end


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a socket timeout fails the test."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def guard_of(service: RunningService) -> Any:
    return service.container.shared_extensions[WebServer]._connections  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = concurrency.Deadline(timeout)
    while not condition():
        assert not deadline.expired(), "condition not met before the deadline"
        concurrency.sleep(0.01)


# -- timeouts ------------------------------------------------------------------------


def test_headers_that_stop_coming_get_a_408_and_the_connection_closed(
    run_service: Any, open_socket: Any
) -> None:
    service = run_service(Store, {"WEB_HEADER_TIMEOUT": 0.3})
    sock = open_socket(service, HALF_OPEN)

    received = read_until_closed(sock)

    assert received.startswith(b"HTTP/1.1 408 ")
    assert requests.get(service.url("/a"), timeout=TIMEOUT).text == "a"


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(
    run_service: Any, open_socket: Any
) -> None:
    service = run_service(Store, {"WEB_IDLE_TIMEOUT": 0.3})
    silent = open_socket(service)

    assert read_until_closed(silent) == b""


def test_a_request_line_trickled_byte_by_byte_is_cut_at_the_idle_timeout(
    run_service: Any, open_socket: Any
) -> None:
    # Each byte arrives well within the timeout; the line as a whole does not.
    service = run_service(Store, {"WEB_IDLE_TIMEOUT": 0.3})
    sock = open_socket(service)
    line = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n"

    closed = False
    for byte in line:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        concurrency.sleep(0.02)
        if guard_of(service).running() == 0:
            closed = True
            break

    assert closed, "the server still held the connection after the whole line"


def test_a_body_that_stops_coming_gets_a_408_and_never_reaches_the_handler(
    run_service: Any, open_socket: Any
) -> None:
    service = run_service(Store, {"WEB_BODY_TIMEOUT": 0.3})
    sock = open_socket(
        service,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    )

    received = read_until_closed(sock)

    assert received.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in received
    assert Store.calls == []


def test_limits_are_validated_at_setup(container_factory: Any) -> None:
    container = container_factory(
        Store, {"WEB_SERVER_ADDRESS": "127.0.0.1:0", "WEB_MAX_CONNECTIONS": 0}
    )

    with pytest.raises(ConfigurationError, match="WEB_"):
        container.start()


# -- the connection cap ------------------------------------------------------------------


def test_half_open_connections_beyond_the_cap_give_way_to_new_requests(
    run_service: Any, open_socket: Any
) -> None:
    service = run_service(Store, {"WEB_MAX_CONNECTIONS": 8})
    hostile = [open_socket(service, HALF_OPEN) for _ in range(64)]

    for _ in range(3):
        response = requests.get(service.url("/a"), timeout=TIMEOUT)
        assert response.text == "a"
    # The oldest half-open ones were closed to make room, without a response.
    assert read_until_closed(hostile[0]) == b""
    assert guard_of(service).running() <= 8


def test_busy_connections_are_capped_and_a_new_one_waits_for_a_free_slot(
    run_service: Any, ws_connect: Any
) -> None:
    # Websockets are never evicted: with both slots held by them, a request waits.
    service = run_service(Store, {"WEB_MAX_CONNECTIONS": 2})
    first = ws_connect(service)
    ws_connect(service)
    request = concurrency.spawn(requests.get, service.url("/a"), timeout=TIMEOUT)

    wait_until(lambda: guard_of(service).waiting() == 1)
    assert not request.dead
    first.close()

    assert request.wait().text == "a"


def test_a_websocket_that_never_answers_pings_is_closed_after_the_idle_timeout(
    run_service: Any,
) -> None:
    service = run_service(Store, {"WEBSOCKET_IDLE_TIMEOUT": 0.4})
    # websocket-client answers pings only while recv() runs: this one never does.
    mute = websocket.create_connection(service.ws_url, timeout=TIMEOUT)
    server = guard_of(service)
    try:
        wait_until(lambda: server.running() == 1)
        wait_until(lambda: server.running() == 0)
    finally:
        mute.close()


def test_a_quiet_websocket_that_answers_pings_stays_connected(
    run_service: Any, ws_connect: Any
) -> None:
    service = run_service(Store, {"WEBSOCKET_IDLE_TIMEOUT": 0.4})
    client = ws_connect(service)

    # The client says nothing but pongs for 4 pings, 2 idle timeouts.
    pings = 0
    while pings < 4:
        opcode, _ = client.ws.recv_data_frame(control_frame=True)  # pongs a ping
        pings += opcode == websocket.ABNF.OPCODE_PING

    assert client.rpc("echo", value=1)["data"] == 1


# -- the eventlet internals the guarded protocol overrides -----------------------------


def test_eventlet_internals_the_guarded_protocol_overrides_are_still_there() -> None:
    # concurrency.GuardedHttpProtocol overrides these; if eventlet renames or
    # reshapes them the deadlines silently stop applying, so fail here instead.
    base = concurrency.GuardedHttpProtocol.__mro__[1]
    for name in ("_read_request_line", "parse_request", "get_environ"):
        method = getattr(base, name)
        assert list(inspect.signature(method).parameters) == ["self"], name
    source = inspect.getsource(base.handle_one_request)
    assert "self._read_request_line()" in source
    assert "self.parse_request()" in source
    assert "self.get_environ()" in source
    assert "close_connection" in inspect.getsource(base.handle_one_response)


def test_connection_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="header_timeout"):
        ConnectionLimits(1, 1.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /a?x=1&y=%20 HTTP/1.1\r\nHost: h:1\r\nX-Many: 1\r\nX-Many: 2\r\n"
        b"X_Under: dropped\r\nAccept-Language: fr\r\n\r\n",
        b"POST /upload HTTP/1.0\r\nHost: h\r\nContent-Type: text/csv\r\n"
        b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
        b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    ],
)
def test_the_environ_of_a_plainly_parsed_request_is_eventlets(
    run_service: Any, open_socket: Any, monkeypatch: pytest.MonkeyPatch, head: bytes
) -> None:
    # The guarded protocol builds the environ itself for requests it parsed;
    # here both are built for the same request and compared, so that a change
    # in eventlet's environ fails this test rather than services.
    protocol = concurrency.GuardedHttpProtocol
    built: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def both(self: Any) -> dict[str, Any]:
        plain = self._plain_headers
        assert plain is not None, "not parsed by the plain parser"
        ours = self._plain_environ(plain)
        self._plain_headers = None
        theirs = protocol.__mro__[1].get_environ(self)
        built.append((ours, dict(theirs)))  # before the application adds to it
        return theirs

    monkeypatch.setattr(protocol, "get_environ", both)
    service = run_service(Store)
    sock = open_socket(service, head)
    assert sock.recv(4096)

    [(ours, theirs)] = built
    objects = ("wsgi.input", "eventlet.input", "eventlet.set_idle", "wsgi.errors")
    assert {k: v for k, v in ours.items() if k not in objects} == {
        k: v for k, v in theirs.items() if k not in objects
    }
    for key in ("wsgi.input", "eventlet.input"):
        assert vars(ours[key]).keys() == vars(theirs[key]).keys()
        for attribute in ("content_length", "chunked_input", "wfile_line"):
            assert getattr(ours[key], attribute) == getattr(theirs[key], attribute)
