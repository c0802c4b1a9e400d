"""The web server's own request parsing and response path, byte for byte.

The server parses the common request shape itself (``concurrency.GuardedHttpProtocol``)
and writes plain responses without werkzeug's general path (``server._plain_response``),
both for speed; these tests pin what a client sees on the wire, through raw sockets.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.wrappers import Request, Response

from framework.web.handlers import http

from .conftest import RunningService

TIMEOUT = 5.0


class Site:
    name = "site"

    @http("GET", "/a")
    def a(self, request: Request) -> Any:
        return "a"

    @http("GET", "/dir/")
    def directory(self, request: Request) -> Any:
        return "listing"

    @http("GET", "/headers")
    def headers(self, request: Request) -> Any:
        return {
            "host": request.headers.get("Host"),
            "x_many": request.headers.get("X-Many"),
            "content_type": request.content_type,
        }

    @http("POST", "/echo")
    def echo(self, request: Request) -> Any:
        return request.get_data()

    @http("GET", "/on-close")
    def on_close(self, request: Request) -> Any:
        response = Response("closing")
        response.call_on_close(lambda: Site.closed.append(True))
        return response

    closed: list[bool] = []


@pytest.fixture
def site(run_service: Any) -> RunningService:
    Site.closed.clear()
    return run_service(Site)


@pytest.fixture
def raw(site: RunningService) -> Iterator[Callable[[bytes], bytes]]:
    """Send bytes on a fresh connection; everything the server sends until it
    closes, or until one complete response when the server keeps it open."""
    sockets: list[socket.socket] = []

    def exchange(data: bytes) -> bytes:
        sock = socket.create_connection(("127.0.0.1", site.port), timeout=TIMEOUT)
        sockets.append(sock)
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = _content_length(head)
            if length is not None and len(body) >= length:
                return received

    yield exchange

    for sock in sockets:
        sock.close()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def test_a_plain_get_gets_status_length_type_and_date(raw: Any) -> None:
    response = raw(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")

    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Length: 1" in lines
    assert b"Content-Type: text/plain; charset=utf-8" in lines
    assert any(line.startswith(b"Date: ") for line in lines)
    assert body == b"a"


def test_head_gets_the_headers_without_a_body(raw: Any) -> None:
    response = raw(b"HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\n")


def test_http_1_0_and_connection_close_end_the_connection_after_the_response(
    raw: Any,
) -> None:
    old = raw(b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n")
    closing = raw(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    for response in (old, closing):
        assert response.endswith(b"\r\n\r\na")
        assert b"Connection: close" in response


def test_headers_reach_the_handler_repeated_ones_joined(raw: Any) -> None:
    response = raw(
        b"GET /headers HTTP/1.1\r\nHost: example.test:8000\r\n"
        b"X-Many: 1\r\nx-many: 2\r\nContent-Type: text/csv\r\n\r\n"
    )

    assert response.endswith(
        b'{"host": "example.test:8000", "x_many": "1,2", "content_type": "text/csv"}'
    )


def test_a_redirect_to_the_slashed_url_names_the_host_the_client_used(
    raw: Any,
) -> None:
    first = raw(b"GET /dir HTTP/1.1\r\nHost: one.test\r\n\r\n")
    second = raw(b"GET /dir?x=1 HTTP/1.1\r\nHost: two.test\r\n\r\n")

    assert first.startswith(b"HTTP/1.1 308 ")
    assert b"Location: http://one.test/dir/\r\n" in first
    assert b"Location: http://two.test/dir/?x=1\r\n" in second


def test_expect_100_continue_is_answered_before_the_body(
    site: RunningService,
) -> None:
    with socket.create_connection(("127.0.0.1", site.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(4096)
        sock.sendall(b"hello")
        final = b""
        while not final.endswith(b"hello"):
            final += sock.recv(4096)

    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200 OK")


def test_a_response_with_close_callbacks_runs_them(
    raw: Any, site: RunningService
) -> None:
    response = raw(b"GET /on-close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert response.endswith(b"closing")
    assert Site.closed == [True]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",  # obsolete folding
        b"GET /a HTTP/1.1\r\nHost: x\r\nBad Name: a\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n",
    ],
)
def test_malformed_header_lines_are_a_400(raw: Any, head: bytes) -> None:
    assert raw(head).startswith(b"HTTP/1.1 400 ")


def test_more_than_100_headers_is_a_431(raw: Any) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))

    assert raw(b"GET /a HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n").startswith(
        b"HTTP/1.1 431 "
    )


@pytest.mark.parametrize(
    ("request_line", "answer"),
    [
        # The standard library splits on any run of spaces.
        (b"GET  /a HTTP/1.1", b"HTTP/1.1 200 OK"),
        # It answers a bad version as HTTP/0.9 would: an error page, no status line.
        (b"GET /a HTTP/2.0", b"Error code: 505"),
        (b"GET /a HTTP/1.x", b"Error code: 400"),
    ],
)
def test_other_request_lines_are_left_to_the_standard_library(
    raw: Any, request_line: bytes, answer: bytes
) -> None:
    response = raw(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert answer in response


class Items:
    name = "items"

    @http("GET", "/items/<int:item_id>")
    def get_item(self, request: Request, item_id: int) -> Any:
        # A handler that mutates its path values must not change the next match.
        request.path_values["item_id"] = -1
        return str(item_id)


def test_repeated_urls_are_matched_afresh_for_each_request(run_service: Any) -> None:
    service = run_service(Items)

    with socket.create_connection(("127.0.0.1", service.port), timeout=TIMEOUT) as sock:
        answers = []
        for _ in range(3):
            sock.sendall(b"GET /items/7 HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"\r\n\r\n7"):
                received += sock.recv(4096)
            answers.append(received)

    assert len(answers) == 3


def test_serving_a_get_leaves_no_reference_cycles_behind(
    site: RunningService,
) -> None:
    # Cyclic garbage wakes the collector, whose full passes stall every request
    # in flight (tens of ms on a service's heap): the tail latency. werkzeug's
    # request/environ pair and its matcher each made cycles per request.
    requests_sent = 100
    with socket.create_connection(("127.0.0.1", site.port), timeout=TIMEOUT) as sock:

        def get() -> None:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"\r\n\r\na"):
                received += sock.recv(4096)

        get()  # warm: first match, first connection
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(requests_sent):
                get()
            gc.collect()
            garbage = len(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    assert garbage < requests_sent  # was 22 objects per request
