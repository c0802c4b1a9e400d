"""The websocket test client, against a stand-in server speaking the frame protocol.

The stand-in keeps these tests about the client; the real server has its own tests
(which use this client).
"""

from __future__ import annotations

import json

import pytest

from framework import concurrency
from framework.exceptions import MethodNotFound, RemoteError, serialize
from framework.testing.utils import find_free_port
from framework.testing.websocket import VirtualSocket, make_virtual_socket


class Refused(Exception):
    pass


def handle_socket(ws) -> None:
    """One connection of the stand-in server."""
    ws.send(
        json.dumps(
            {"type": "event", "event": "connected", "data": {"socket_id": "s-1"}}
        )
    )
    while True:
        message = ws.wait()
        if message is None:
            return
        frame = json.loads(message)
        method, data = frame["method"], frame["data"]
        reply = {"type": "result", "correlation_id": frame["correlation_id"]}
        if method == "upper":
            reply.update(success=True, data=data["text"].upper())
        elif method == "notify":
            for n in range(data["times"]):
                event = {"type": "event", "event": data["event"], "data": {"n": n}}
                ws.send(json.dumps(event))
            reply.update(success=True, data=None)
        elif method == "refuse":
            reply.update(success=False, error=serialize(Refused("no way")))
        elif method == "silent":
            continue
        else:
            reply.update(success=False, error=serialize(MethodNotFound(method)))
        ws.send(json.dumps(reply))


@pytest.fixture
def server(web_config_port):
    listener = concurrency.green_listen(("127.0.0.1", web_config_port))
    app = concurrency.websocket_app(handle_socket)
    thread = concurrency.spawn(concurrency.wsgi_server, listener, app, log_output=False)
    yield
    concurrency.kill(thread)
    listener.close()


@pytest.mark.usefixtures("server")
def test_websocket_connects_and_receives_the_connected_event(websocket):
    ws = websocket()
    assert isinstance(ws, VirtualSocket)
    assert ws.wait_for_event("connected") == ("connected", {"socket_id": "s-1"})


@pytest.mark.usefixtures("server")
def test_rpc_returns_the_result_data(websocket):
    ws = websocket()
    assert ws.rpc("upper", text="shout") == "SHOUT"
    assert ws.rpc("upper", text="again") == "AGAIN"


@pytest.mark.usefixtures("server")
def test_rpc_raises_registered_errors_as_themselves_and_others_as_remote_errors(
    websocket,
):
    ws = websocket()
    with pytest.raises(MethodNotFound):
        ws.rpc("nonexistent")
    with pytest.raises(RemoteError) as exc_info:
        ws.rpc("refuse")
    assert exc_info.value.exc_type == "Refused"


@pytest.mark.usefixtures("server")
def test_pushed_events_queue_up_by_type_in_order(websocket):
    ws = websocket()
    ws.rpc("notify", event="tick", times=3)

    assert [ws.wait_for_event("tick") for _ in range(2)] == [
        ("tick", {"n": 0}),
        ("tick", {"n": 1}),
    ]
    assert ws.get_event_queue("tick").get(timeout=5) == ("tick", {"n": 2})
    assert ws.get_event_queue("other").qsize() == 0


@pytest.mark.usefixtures("server")
def test_each_socket_gets_its_own_replies(websocket):
    first, second = websocket(), websocket()
    assert first.rpc("upper", text="one") == "ONE"
    assert second.rpc("upper", text="two") == "TWO"


@pytest.mark.usefixtures("server")
def test_rpc_without_reply_times_out(websocket):
    ws = websocket()
    ws.timeout = 0.05
    with pytest.raises(TimeoutError, match="no reply to 'silent'"):
        ws.rpc("silent")


def test_connecting_to_nothing_raises_connection_refused():
    ws_app, wait_for_socket = make_virtual_socket("127.0.0.1", find_free_port())
    thread = concurrency.spawn(ws_app.run_forever)
    try:
        with pytest.raises(ConnectionRefusedError):
            wait_for_socket(timeout=10)
    finally:
        concurrency.kill(thread)
