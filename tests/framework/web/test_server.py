"""``framework.web.server``: binding, the shared server, body limits, concurrency, stop.

Through real sockets against containers in this process (see ``conftest.py``).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
import requests
from werkzeug.wrappers import Request

from framework import concurrency
from framework.exceptions import ConfigurationError
from framework.web.handlers import HttpRequestHandler, http
from framework.web.server import (
    BaseHTTPServer,
    BindAddress,
    HttpOnlyProtocol,
    WebServer,
    WsgiServer,
    parse_address,
)

TIMEOUT = 5


def wait_until(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = concurrency.Deadline(timeout)
    while not condition():
        assert not deadline.expired(), "condition not met before the deadline"
        concurrency.sleep(0.01)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("8000", BindAddress("", 8000)),
        (8000, BindAddress("", 8000)),
        ("127.0.0.1:8080", BindAddress("127.0.0.1", 8080)),
        ("localhost:0", BindAddress("localhost", 0)),
        ("[::1]:9000", BindAddress("::1", 9000)),
    ],
)
def test_parse_address_reads_optional_address_and_port(
    address: Any, expected: BindAddress
) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "host:", ":8000", "8000:host", "a:b:c", "x"])
def test_parse_address_rejects_anything_else_with_the_expected_format(
    address: str,
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_address(address)

    assert str(raised.value) == (
        f"Misconfigured bind address `{address}`. Should be `[address:]port`"
    )


class Store:
    name = "store"

    calls: list[str] = []

    @http("GET", "/a")
    def a(self, request: Request) -> Any:
        return "a"

    @http("GET", "/b")
    def b(self, request: Request) -> Any:
        return "b"

    @http("POST", "/upload")
    def upload(self, request: Request) -> Any:
        Store.calls.append("upload")
        return str(len(request.get_data()))


@pytest.fixture(autouse=True)
def forget_calls() -> None:
    Store.calls.clear()


def test_misconfigured_bind_address_fails_the_container_start(
    container_factory: Any,
) -> None:
    container = container_factory(Store, {"WEB_SERVER_ADDRESS": "not-an-address"})

    with pytest.raises(ConfigurationError, match="Misconfigured bind address"):
        container.start()


def test_all_handlers_of_a_container_share_one_server(run_service: Any) -> None:
    service = run_service(Store)

    servers = [
        ext for ext in service.container.subextensions if isinstance(ext, WebServer)
    ]
    assert len(servers) == 1
    assert requests.get(service.url("/a"), timeout=TIMEOUT).text == "a"
    assert requests.get(service.url("/b"), timeout=TIMEOUT).text == "b"


def test_second_service_on_a_port_in_use_fails_to_start(run_service: Any) -> None:
    first = run_service(Store)

    with pytest.raises(OSError):
        run_service(Store, {"WEB_SERVER_ADDRESS": f"127.0.0.1:{first.port}"})


def test_body_over_the_limit_is_a_413_and_the_method_never_runs(
    run_service: Any,
) -> None:
    service = run_service(Store, {"WEB_MAX_CONTENT_LENGTH": 1024})

    response = requests.post(service.url("/upload"), data=b"x" * 2048, timeout=TIMEOUT)

    assert response.status_code == 413
    assert Store.calls == []


def test_body_at_the_limit_is_served(run_service: Any) -> None:
    service = run_service(Store, {"WEB_MAX_CONTENT_LENGTH": 1024})

    response = requests.post(service.url("/upload"), data=b"x" * 1024, timeout=TIMEOUT)

    assert (response.status_code, response.text) == (200, "1024")


def test_chunked_body_over_the_limit_is_a_413(run_service: Any) -> None:
    service = run_service(Store, {"WEB_MAX_CONTENT_LENGTH": 1024})
    chunks = iter([b"x" * 1000, b"x" * 1000])

    response = requests.post(service.url("/upload"), data=chunks, timeout=TIMEOUT)

    assert response.status_code == 413
    assert Store.calls == []


def test_declared_length_over_the_default_limit_is_refused_before_the_body_is_sent(
    run_service: Any,
) -> None:
    service = run_service(Store)
    request = b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 20000000\r\n\r\n"

    with socket.create_connection(("127.0.0.1", service.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        status_line = sock.makefile("rb").readline()

    assert status_line.startswith(b"HTTP/1.1 413")
    assert Store.calls == []


class Tagged(WebServer):
    def get_wsgi_app(self) -> Any:
        app = super().get_wsgi_app()

        def tagging_app(environ: dict[str, Any], start_response: Any) -> Any:
            def tagging_start_response(
                status: str, headers: list, *exc_info: Any
            ) -> Any:
                headers = [*headers, ("X-Served-By", "middleware")]
                return start_response(status, headers, *exc_info)

            return app(environ, tagging_start_response)

        return tagging_app


class TaggedHttp(HttpRequestHandler):
    server = Tagged()


class TaggedService:
    name = "tagged"

    @TaggedHttp.decorator("GET", "/hello")
    def hello(self, request: Request) -> Any:
        return "hello"


def test_get_wsgi_app_can_wrap_the_app_in_middleware(run_service: Any) -> None:
    service = run_service(TaggedService)
    port = service.container.shared_extensions[Tagged].port

    response = requests.get(f"http://127.0.0.1:{port}/hello", timeout=TIMEOUT)

    assert response.text == "hello"
    assert response.headers["X-Served-By"] == "middleware"


def test_two_slow_requests_are_served_concurrently(run_service: Any) -> None:
    arrived: list[str] = []

    class Slow:
        name = "slow"

        @http("GET", "/slow/<name>")
        def slow(self, request: Request, name: str) -> Any:
            arrived.append(name)
            # Each request waits for the other: served one at a time, the first
            # would give up alone.
            with concurrency.Timeout(TIMEOUT, False):
                while len(arrived) < 2:
                    concurrency.sleep(0.01)
                return "together"
            return "alone"

    service = run_service(Slow)

    threads = [
        concurrency.spawn(requests.get, service.url(f"/slow/{name}"), timeout=10)
        for name in ("first", "second")
    ]

    assert [thread.wait().text for thread in threads] == ["together", "together"]


def test_stop_lets_an_in_flight_request_finish_then_closes_the_port(
    run_service: Any,
) -> None:
    started = concurrency.Event()
    release = concurrency.Event()
    order: list[str] = []

    class Slow:
        name = "slow"

        @http("GET", "/slow")
        def slow(self, request: Request) -> Any:
            started.send()
            release.wait()
            order.append("request finished")
            return "finished"

    service = run_service(Slow)
    port = service.port
    server = service.container.shared_extensions[WebServer]
    request = concurrency.spawn(requests.get, service.url("/slow"), timeout=TIMEOUT)
    with concurrency.Timeout(TIMEOUT):
        started.wait()

    def stop() -> None:
        service.container.stop()
        order.append("container stopped")

    stopper = concurrency.spawn(stop)
    wait_until(lambda: not server.accepting)
    release.send()

    response = request.wait()
    with concurrency.Timeout(TIMEOUT):
        stopper.wait()
    assert (response.status_code, response.text) == (200, "finished")
    assert order == ["request finished", "container stopped"]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/slow", timeout=TIMEOUT)


def test_kill_closes_the_port_without_waiting_for_requests(run_service: Any) -> None:
    started = concurrency.Event()

    class Stuck:
        name = "stuck"

        @http("GET", "/stuck")
        def stuck(self, request: Request) -> Any:
            started.send()
            concurrency.Event().wait()

    service = run_service(Stuck)
    port = service.port
    request = concurrency.spawn(requests.get, service.url("/stuck"), timeout=TIMEOUT)
    with concurrency.Timeout(TIMEOUT):
        started.wait()

    with concurrency.Timeout(TIMEOUT):
        service.container.kill()

    with pytest.raises(requests.ConnectionError):
        request.wait()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/stuck", timeout=TIMEOUT)


def test_keep_alive_connection_serves_consecutive_requests(run_service: Any) -> None:
    service = run_service(Store)

    with requests.Session() as session:
        first = session.post(service.url("/upload"), data=b"abc", timeout=TIMEOUT)
        second = session.get(service.url("/a"), timeout=TIMEOUT)

    assert (first.text, second.text) == ("3", "a")
    assert Store.calls == ["upload"]


# -- nameko's server API: HttpOnlyProtocol, BaseHTTPServer, get_wsgi_server ----------


def _raw_get(port: int, path: str) -> bytes:
    """One request on its own connection, the answer read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_connections_are_served_with_http_only_protocol(
    run_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[type] = []
    handle_one_request = HttpOnlyProtocol.handle_one_request

    def recording(protocol: Any) -> None:
        served.append(type(protocol))
        handle_one_request(protocol)

    monkeypatch.setattr(HttpOnlyProtocol, "handle_one_request", recording)
    service = run_service(Store)

    assert requests.get(service.url("/a"), timeout=TIMEOUT).text == "a"
    assert served and all(issubclass(cls, HttpOnlyProtocol) for cls in served)
    assert issubclass(HttpOnlyProtocol, BaseHTTPServer.BaseHTTPRequestHandler)


def test_connections_send_each_write_at_once(
    run_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nagle's algorithm off on every accepted connection: with it on, a response
    # written in two pieces waited for the client's delayed acknowledgement of
    # the first (40 ms on each keep-alive request for a page over about 16 KB).
    nodelay: list[int] = []
    handle_one_request = HttpOnlyProtocol.handle_one_request

    def recording(protocol: Any) -> None:
        nodelay.append(
            protocol.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        )
        handle_one_request(protocol)

    monkeypatch.setattr(HttpOnlyProtocol, "handle_one_request", recording)
    service = run_service(Store)

    assert requests.get(service.url("/a"), timeout=TIMEOUT).text == "a"
    assert nodelay and all(nodelay)


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("handle_one_request", OSError("raw readinto() returned invalid length")),
        ("finish", OSError("boom")),
    ],
)
def test_an_error_on_one_connection_ends_it_and_the_service_keeps_serving(
    run_service: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    error: Exception,
) -> None:
    # nameko's container died of such an error: one client could stop a service.
    service = run_service(Store)
    owner = (
        HttpOnlyProtocol
        if method == "handle_one_request"
        else BaseHTTPServer.BaseHTTPRequestHandler
    )
    original = getattr(owner, method)
    failures: list[str] = []

    def fail_once(protocol: Any) -> None:
        if not failures:
            failures.append(method)
            raise error
        original(protocol)

    monkeypatch.setattr(owner, method, fail_once)

    _raw_get(service.port, "/a")  # ends, answered or not

    assert failures == [method]
    assert requests.get(service.url("/a"), timeout=TIMEOUT).text == "a"
    (record,) = [
        r for r in caplog.records if r.getMessage() == "error serving a connection"
    ]
    assert record.levelno == logging.ERROR
    assert record.error_type == "builtins.OSError"  # type: ignore[attr-defined]
    assert str(error) not in caplog.text  # its text could quote the request
    with concurrency.Timeout(0.2, False):
        service.container.wait()
        pytest.fail("one connection's error ended the container")


class OtherApp(WebServer):
    """Serves its own application instead of the routed one."""

    def get_wsgi_server(
        self,
        sock: Any,
        wsgi_app: Any,
        protocol: type = HttpOnlyProtocol,
        debug: bool = False,
    ) -> WsgiServer:
        def other_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Length", "8")])
            return [b"Override"]

        return WsgiServer(sock, other_app, protocol=protocol, debug=debug)


class OtherAppHttp(HttpRequestHandler):
    server = OtherApp()


class OtherAppService:
    name = "other_app"

    @OtherAppHttp.decorator("GET", "/")
    def index(self, request: Request) -> Any:
        return "routed"  # never: the other application answers


def test_get_wsgi_server_can_serve_another_application_behind_the_same_limits(
    run_service: Any,
) -> None:
    service = run_service(OtherAppService, {"WEB_IDLE_TIMEOUT": 0.2})
    port = service.container.shared_extensions[OtherApp].port

    response = requests.get(f"http://127.0.0.1:{port}/", timeout=TIMEOUT)
    assert response.text == "Override"
    # The idle deadline still closes a connection that never sends a request.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as silent:
        assert silent.recv(1) == b""


def test_get_wsgi_server_receives_the_socket_and_the_wsgi_app(
    run_service: Any,
) -> None:
    received: list[Any] = []

    class Recording(WebServer):
        def get_wsgi_server(self, sock: Any, wsgi_app: Any, **kwargs: Any) -> Any:
            received.extend([sock, wsgi_app, kwargs])
            return super().get_wsgi_server(sock, wsgi_app, **kwargs)

    class RecordingHttp(HttpRequestHandler):
        server = Recording()

    class RecordingService:
        name = "recording"

        @RecordingHttp.decorator("GET", "/")
        def index(self, request: Request) -> Any:
            return "routed"

    service = run_service(RecordingService)
    server = service.container.shared_extensions[Recording]

    sock, app, kwargs = received
    assert sock.getsockname()[1] == server.port
    assert callable(app) and kwargs == {}
    assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=TIMEOUT).text == (
        "routed"
    )


def test_a_wsgi_server_asking_for_another_protocol_stops_the_container(
    container_factory: Any,
) -> None:
    class OwnProtocol(HttpOnlyProtocol):
        pass

    class OwnProtocolServer(WebServer):
        def get_wsgi_server(self, sock: Any, wsgi_app: Any, **kwargs: Any) -> Any:
            return WsgiServer(sock, wsgi_app, protocol=OwnProtocol)

    class OwnProtocolHttp(HttpRequestHandler):
        server = OwnProtocolServer()

    class OwnProtocolService:
        name = "own_protocol"

        @OwnProtocolHttp.decorator("GET", "/")
        def index(self, request: Request) -> Any:
            return "routed"

    container = container_factory(
        OwnProtocolService, {"WEB_SERVER_ADDRESS": "127.0.0.1:0"}
    )
    container.start()

    with concurrency.Timeout(TIMEOUT), pytest.raises(ConfigurationError) as raised:
        container.wait()
    assert "HttpOnlyProtocol" in str(raised.value)
