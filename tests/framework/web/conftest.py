"""Fixtures for the web entrypoint tests: real containers on a free local port.

Everything goes through real sockets, ``requests`` for HTTP and ``websocket-client``
for websockets, against containers started in this process; nothing is mocked.
Every wait has a deadline (client timeouts), so a hang fails the test instead of
stalling the run. Eventlet monkey patching comes from the framework's pytest plugin.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import websocket

from framework.containers import ServiceContainer
from framework.web.server import WebServer

CLIENT_TIMEOUT = 5.0  # seconds any single client read may wait


@dataclass
class RunningService:
    container: ServiceContainer

    @property
    def port(self) -> int:
        return self.container.shared_extensions[WebServer].port  # type: ignore[attr-defined]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
def run_service(container_factory: Any) -> Callable[..., RunningService]:
    """Start a service class in a container bound to 127.0.0.1 on a port the OS picks.

    Port 0 rather than a "free port" found beforehand: nothing can take it between
    the lookup and the bind. The container is killed at teardown.
    """

    def start(
        service_cls: type, config: dict[str, Any] | None = None
    ) -> RunningService:
        config = {"WEB_SERVER_ADDRESS": "127.0.0.1:0", **(config or {})}
        container = container_factory(service_cls, config)
        container.start()
        return RunningService(container)

    return start


class WsClient:
    """A websocket client speaking the framework's frame protocol."""

    def __init__(self, url: str, **options: Any) -> None:
        self.ws = websocket.create_connection(url, timeout=CLIENT_TIMEOUT, **options)
        self.events: list[dict[str, Any]] = []
        hello = self.receive()
        assert hello["type"] == "event" and hello["event"] == "connected", hello
        self.socket_id: str = hello["data"]["socket_id"]

    def receive(self) -> dict[str, Any]:
        return json.loads(self.ws.recv())

    def send_raw(self, text: str) -> dict[str, Any]:
        self.ws.send(text)
        return self.next_result()

    def rpc(self, method: str, **data: Any) -> dict[str, Any]:
        """Call ``method``; the result frame (events seen meanwhile are kept)."""
        correlation_id = str(uuid.uuid4())
        self.ws.send(
            json.dumps(
                {"method": method, "data": data, "correlation_id": correlation_id}
            )
        )
        frame = self.next_result()
        assert frame["correlation_id"] == correlation_id, frame
        return frame

    def next_result(self) -> dict[str, Any]:
        while True:
            frame = self.receive()
            if frame["type"] == "result":
                return frame
            self.events.append(frame)

    def wait_for_event(self, event: str) -> dict[str, Any]:
        for frame in self.events:
            if frame["event"] == event:
                self.events.remove(frame)
                return frame
        while True:
            frame = self.receive()
            if frame["type"] == "event" and frame["event"] == event:
                return frame
            self.events.append(frame)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def ws_connect() -> Iterator[Callable[..., WsClient]]:
    """Open websocket clients, closed at teardown."""
    clients: list[WsClient] = []

    def connect(service: RunningService, **options: Any) -> WsClient:
        client = WsClient(service.ws_url, **options)
        clients.append(client)
        return client

    yield connect

    for client in clients:
        try:
            client.close()
        except Exception:
            pass
