"""Several web replicas each push events to their own websockets: a BROADCAST event
handler in every replica forwards to its hub (real broker, real sockets)."""

from __future__ import annotations

from typing import Any

from framework.events import BROADCAST, event_handler
from framework.standalone.events import event_dispatcher
from framework.web.websocket import WebSocketHubProvider, rpc


class LiveFeed:
    name = "live_feed"
    hub = WebSocketHubProvider()

    @rpc
    def watch(self, socket_id: str, channel: str) -> Any:
        self.hub.subscribe(socket_id, channel)
        return channel

    @event_handler(
        "orders", "order_created", handler_type=BROADCAST, reliable_delivery=False
    )
    def forward(self, payload: Any) -> None:
        self.hub.broadcast("orders", "order_created", payload)


def test_an_event_reaches_the_sockets_of_every_replica(
    rabbit_config, run_service, ws_connect
):
    replicas = [run_service(LiveFeed, rabbit_config) for _ in range(2)]
    clients = [ws_connect(replica) for replica in replicas]
    bystander = ws_connect(replicas[0])
    for client in clients:
        assert client.rpc("watch", channel="orders")["data"] == "orders"

    dispatch = event_dispatcher(rabbit_config)
    dispatch("orders", "order_created", {"id": 7})
    dispatch.close()

    for client in clients:
        frame = client.wait_for_event("order_created")
        assert frame == {"type": "event", "event": "order_created", "data": {"id": 7}}
    # A socket that did not subscribe hears nothing: it still answers its own calls.
    assert bystander.rpc("watch", channel="other")["data"] == "other"
    assert bystander.events == []
