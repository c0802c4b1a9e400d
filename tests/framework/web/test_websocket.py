"""``framework.web.websocket``: the frame protocol, ``@rpc``, the hub, slow clients.

Through real websockets (``websocket-client``) against containers in this process
(see ``conftest.py``).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import requests
import websocket
from websocket import ABNF
from werkzeug.wrappers import Request

from framework import concurrency
from framework.exceptions import ConnectionNotFound
from framework.extensions import DependencyProvider
from framework.web.handlers import http
from framework.web.websocket import WebSocketHubProvider, origin_allowed, rpc

TIMEOUT = 5


def wait_until(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = concurrency.Deadline(timeout)
    while not condition():
        assert not deadline.expired(), "condition not met before the deadline"
        concurrency.sleep(0.01)


class OutOfStock(Exception):
    pass


class Chat:
    name = "chat"

    hub = WebSocketHubProvider()

    @rpc
    def echo(self, socket_id: str, text: str) -> Any:
        return {"socket_id": socket_id, "text": text}

    @rpc(expected_exceptions=OutOfStock)
    def fail(self, socket_id: str) -> Any:
        raise OutOfStock("no more blue socks")

    @rpc
    def crash(self, socket_id: str) -> Any:
        raise KeyError("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA")

    @rpc
    def unserializable(self, socket_id: str) -> Any:
        # A repr may quote anything: the error frame names the type only.
        return {"password": "s3cret-in-repr", "when": object()}

    @rpc
    def subscribe(self, socket_id: str, channel: str) -> Any:
        self.hub.subscribe(socket_id, channel)
        return self.hub.get_subscriptions(socket_id)

    @rpc
    def unsubscribe(self, socket_id: str, channel: str) -> Any:
        self.hub.unsubscribe(socket_id, channel)
        return self.hub.get_subscriptions(socket_id)

    @rpc
    def subscribers(self, socket_id: str) -> Any:
        return {c: sorted(ids) for c, ids in self.hub.subscriptions.items()}

    @rpc
    def subscribe_other(self, socket_id: str, other: str, channel: str) -> Any:
        self.hub.subscribe(other, channel)

    @rpc
    def unsubscribe_other(self, socket_id: str, other: str, channel: str) -> Any:
        self.hub.unsubscribe(other, channel)

    @rpc
    def subscribers_of(self, socket_id: str, channel: str) -> Any:
        # nameko's hub.subscriptions is a defaultdict: any channel can be read
        return sorted(self.hub.subscriptions[channel])

    @rpc
    def whisper(self, socket_id: str, to: str, text: str) -> Any:
        return self.hub.unicast(to, "whisper", {"from": socket_id, "text": text})

    @http("POST", "/broadcast/<channel>")
    def broadcast(self, request: Request, channel: str) -> Any:
        body = request.get_json()
        return {"queued": self.hub.broadcast(channel, body["event"], body["data"])}

    @http("GET", "/connected/<socket_id>")
    def connected(self, request: Request, socket_id: str) -> Any:
        try:
            self.hub.get_subscriptions(socket_id)
        except ConnectionNotFound:
            return {"connected": False}
        return {"connected": True}


@pytest.fixture
def chat(run_service: Any) -> Any:
    return run_service(Chat)


def broadcast(service: Any, channel: str, event: str, data: Any) -> int:
    response = requests.post(
        service.url(f"/broadcast/{channel}"),
        json={"event": event, "data": data},
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    return response.json()["queued"]


def is_connected(service: Any, socket_id: str) -> bool:
    response = requests.get(service.url(f"/connected/{socket_id}"), timeout=TIMEOUT)
    return response.json()["connected"]


def test_connecting_sends_a_connected_event_with_a_socket_id(
    chat: Any, ws_connect: Any
) -> None:
    first = ws_connect(chat)
    second = ws_connect(chat)

    assert first.socket_id and second.socket_id
    assert first.socket_id != second.socket_id


def test_rpc_replies_with_the_result_and_the_correlation_id(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.rpc("echo", text="hi")

    assert frame["type"] == "result"
    assert frame["success"] is True
    assert frame["data"] == {"socket_id": client.socket_id, "text": "hi"}


def test_invalid_json_is_a_malformed_request(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)

    frame = client.send_raw("{not json")

    assert frame["success"] is False
    assert frame["correlation_id"] is None
    assert frame["error"]["exc_type"] == "MalformedRequest"
    assert frame["error"]["value"] == "Invalid JSON data"


def test_frame_without_a_method_is_a_malformed_request(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.send_raw('{"data": {}, "correlation_id": 7}')

    assert frame["correlation_id"] == 7
    assert frame["error"]["exc_type"] == "MalformedRequest"


def test_unknown_method_is_method_not_found(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)

    frame = client.rpc("no_such_method")

    assert frame["success"] is False
    assert frame["error"]["exc_type"] == "MethodNotFound"
    assert frame["error"]["exc_path"] == "nameko.exceptions.MethodNotFound"


def test_expected_method_error_is_serialized_into_the_reply(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.rpc("fail")

    assert frame["success"] is False
    assert frame["error"]["exc_type"] == "OutOfStock"
    assert frame["error"]["value"] == "no more blue socks"


def test_unexpected_method_error_replies_its_type_and_call_id_not_its_text(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.rpc("crash")

    assert frame["success"] is False
    error = frame["error"]
    assert error["exc_type"] == "KeyError"
    assert error["value"].startswith("unexpected KeyError (correlation id ")
    assert "argon2" not in json.dumps(frame)


def test_wrong_arguments_are_an_incorrect_signature(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)

    frame = client.rpc("echo", wrong="argument")

    assert frame["error"]["exc_type"] == "IncorrectSignature"


def test_unserializable_result_is_an_error_reply(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)

    frame = client.rpc("unserializable")

    assert frame["error"]["exc_type"] == "UnserializableValueError"
    assert "s3cret-in-repr" not in json.dumps(frame)


def test_subscriptions_are_listed_sorted_and_can_be_removed(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    client.rpc("subscribe", channel="zebra")
    subscribed = client.rpc("subscribe", channel="apple")["data"]
    unsubscribed = client.rpc("unsubscribe", channel="zebra")["data"]

    assert subscribed == ["apple", "zebra"]
    assert unsubscribed == ["apple"]
    # nameko's hub.subscriptions: channel -> socket ids
    assert client.rpc("subscribers")["data"] == {"apple": [client.socket_id]}


def test_broadcast_reaches_every_subscriber_of_the_channel_only(
    chat: Any, ws_connect: Any
) -> None:
    alice, bob, carol = ws_connect(chat), ws_connect(chat), ws_connect(chat)
    alice.rpc("subscribe", channel="news")
    bob.rpc("subscribe", channel="news")
    carol.rpc("subscribe", channel="sports")

    queued = broadcast(chat, "news", "headline", {"title": "hello"})
    broadcast(chat, "sports", "score", {"home": 1})

    assert queued == 2
    expected = {"type": "event", "event": "headline", "data": {"title": "hello"}}
    assert alice.wait_for_event("headline") == expected
    assert bob.wait_for_event("headline") == expected
    assert carol.wait_for_event("score")["data"] == {"home": 1}
    assert carol.events == []


def test_unsubscribed_socket_no_longer_gets_the_channel(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)
    client.rpc("subscribe", channel="news")
    client.rpc("unsubscribe", channel="news")

    assert broadcast(chat, "news", "headline", {}) == 0


def test_unicast_reaches_one_socket(chat: Any, ws_connect: Any) -> None:
    alice, bob = ws_connect(chat), ws_connect(chat)

    frame = alice.rpc("whisper", to=bob.socket_id, text="psst")

    assert frame["data"] is True
    assert bob.wait_for_event("whisper")["data"] == {
        "from": alice.socket_id,
        "text": "psst",
    }


def test_unicast_to_an_unknown_socket_returns_false(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)

    assert client.rpc("whisper", to="no-such-socket", text="psst")["data"] is False


def test_subscribing_an_unknown_socket_is_connection_not_found(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.rpc("subscribe_other", other="no-such-socket", channel="news")

    assert frame["error"]["exc_type"] == "ConnectionNotFound"


def test_unsubscribing_an_unknown_socket_is_not_an_error(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)

    frame = client.rpc("unsubscribe_other", other="no-such-socket", channel="news")

    assert frame["success"] is True


def test_subscriptions_of_a_channel_nobody_joined_read_as_empty(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)
    client.rpc("subscribe", channel="news")

    assert client.rpc("subscribers_of", channel="news")["data"] == [client.socket_id]
    assert client.rpc("subscribers_of", channel="sports")["data"] == []


def test_disconnect_forgets_the_socket_and_its_subscriptions(
    chat: Any, ws_connect: Any
) -> None:
    client = ws_connect(chat)
    client.rpc("subscribe", channel="news")

    client.close()

    wait_until(lambda: not is_connected(chat, client.socket_id))
    assert broadcast(chat, "news", "headline", {}) == 0


def test_upgrade_request_headers_become_context_data_of_every_call(
    run_service: Any, ws_connect: Any
) -> None:
    seen: list[dict[str, Any]] = []

    class Recorder(DependencyProvider):
        def worker_setup(self, worker_ctx: Any) -> None:
            seen.append(dict(worker_ctx.data))

    class Service:
        name = "context_service"

        recorder = Recorder()

        @rpc
        def ping(self, socket_id: str) -> Any:
            return "pong"

    service = run_service(Service)
    client = ws_connect(
        service, header=["Accept-Language: de-DE", "X-Request-Id: req-9"]
    )

    client.rpc("ping")
    client.rpc("ping")

    assert [entry.get("language") for entry in seen] == ["de-DE", "de-DE"]
    assert [entry.get("request_id") for entry in seen] == ["req-9", "req-9"]


def test_a_client_that_never_reads_does_not_block_broadcasts_to_others(
    run_service: Any, ws_connect: Any
) -> None:
    service = run_service(
        Chat, {"WEBSOCKET_QUEUE_SIZE": 4, "WEBSOCKET_SEND_TIMEOUT": 2}
    )
    # A tiny receive buffer, and this client never reads: the server's sends to it
    # stall once the kernel buffers are full.
    stuck = ws_connect(service, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    reader = ws_connect(service)
    stuck.rpc("subscribe", channel="feed")
    reader.rpc("subscribe", channel="feed")
    payload = "x" * 256 * 1024

    # 16 MiB in total: far more than the socket buffers between server and `stuck`.
    for sequence in range(64):
        broadcast(service, "feed", "item", {"sequence": sequence, "payload": payload})
        assert reader.wait_for_event("item")["data"]["sequence"] == sequence

    wait_until(lambda: not is_connected(service, stuck.socket_id))
    assert broadcast(service, "feed", "item", {"sequence": 64, "payload": ""}) == 1
    assert reader.wait_for_event("item")["data"]["sequence"] == 64


def test_stop_sends_connected_sockets_a_close_frame(chat: Any, ws_connect: Any) -> None:
    client = ws_connect(chat)
    client.rpc("subscribe", channel="news")

    with concurrency.Timeout(TIMEOUT):
        chat.container.stop()

    opcode, _ = client.ws.recv_data(control_frame=True)
    assert opcode == ABNF.OPCODE_CLOSE


def test_nameko_style_test_fixtures_drive_the_hub(
    container_factory: Any, web_config: dict[str, Any], web_session: Any, websocket: Any
) -> None:
    container = container_factory(Chat, web_config)
    container.start()
    socket = websocket()

    assert socket.rpc("subscribe", channel="news") == ["news"]
    queued = web_session.post(
        "/broadcast/news", json={"event": "headline", "data": {"n": 1}}, timeout=TIMEOUT
    ).json()["queued"]
    assert queued == 1
    assert socket.wait_for_event("headline") == ("headline", {"n": 1})


def test_plain_get_of_the_websocket_path_is_a_400(chat: Any) -> None:
    response = requests.get(chat.url("/ws"), timeout=TIMEOUT)

    assert response.status_code == 400


# -- Origin ------------------------------------------------------------------------------


def test_an_upgrade_from_another_origin_is_refused_with_403(
    chat: Any, ws_connect: Any
) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws_connect(chat, origin="https://evil.example")

    assert refused.value.status_code == 403
    assert chat.container.shared_extensions  # the service is still up
    assert ws_connect(chat).socket_id  # and same-origin clients still connect


def test_an_upgrade_from_the_servers_own_origin_or_without_origin_is_accepted(
    chat: Any, ws_connect: Any
) -> None:
    own = ws_connect(chat, origin=f"http://127.0.0.1:{chat.port}")
    no_browser = ws_connect(chat, suppress_origin=True)

    assert own.rpc("echo", text="a")["success"] is True
    assert no_browser.rpc("echo", text="b")["success"] is True


@pytest.mark.parametrize(
    "allowed", [["https://panel.example"], "https://panel.example, http://x", "*"]
)
def test_configured_origins_are_accepted(
    run_service: Any, ws_connect: Any, allowed: Any
) -> None:
    service = run_service(Chat, {"WEB_ALLOWED_ORIGINS": allowed})

    client = ws_connect(service, origin="https://panel.example")

    assert client.rpc("echo", text="hi")["success"] is True


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        ("http://a.example:8000", "a.example:8000", None, True),
        ("https://a.example", "a.example", None, True),  # behind a TLS proxy
        ("https://A.example:443", "a.example", None, True),
        ("http://a.example:9000", "a.example:8000", None, False),
        ("http://b.example:8000", "a.example:8000", None, False),
        ("null", "a.example", None, False),
        ("not a url", "a.example", None, False),
        ("https://a.example.evil.example", "a.example", None, False),
        ("https://panel.example", "a.example", ["https://panel.example:443"], True),
        ("http://panel.example", "a.example", ["https://panel.example"], False),
    ],
)
def test_origin_allowed_compares_scheme_host_and_port(
    origin: str, host: str, allowed: Any, expected: bool
) -> None:
    environ = {"HTTP_ORIGIN": origin, "HTTP_HOST": host}

    assert origin_allowed(environ, allowed) is expected
