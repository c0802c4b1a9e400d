"""A websocket client that speaks the framework's websocket RPC frames, for tests.

Frames (nameko's protocol): on connect the server sends
``{"type": "event", "event": "connected", "data": {"socket_id": ...}}``; a call is
``{"method": ..., "data": {...}, "correlation_id": ...}``, answered by
``{"type": "result", "success": true, "data": ..., "correlation_id": ...}`` or
``{"type": "result", "success": false, "error": {...}, "correlation_id": ...}``;
pushed events are ``{"type": "event", "event": ..., "data": ...}``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from websocket import WebSocketApp

from framework import concurrency
from framework.exceptions import deserialize

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds a call or an event wait gives the server


class VirtualSocket:
    """The test's end of one websocket connection.

    ``rpc(method, **data)`` calls a websocket RPC method and returns its result
    (or raises the remote error); ``wait_for_event(event_type)`` returns the next
    ``(event_type, data)`` pushed to this socket. Both give up after ``timeout``
    seconds with ``TimeoutError``. ``app`` is the underlying ``WebSocketApp``.
    """

    def __init__(
        self, app: WebSocketApp, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.app = app
        self.timeout = timeout
        self._event_queues: defaultdict[str, Any] = defaultdict(concurrency.Queue)
        self._pending: dict[int, Any] = {}
        self._correlation_ids = itertools.count()

    def get_event_queue(self, event_type: str) -> Any:
        """The queue of ``(event_type, data)`` pairs received for ``event_type``."""
        return self._event_queues[event_type]

    def wait_for_event(self, event_type: str) -> tuple[str, Any]:
        try:
            return self.get_event_queue(event_type).get(timeout=self.timeout)
        except concurrency.Empty:
            raise TimeoutError(
                f"no {event_type!r} event within {self.timeout} seconds"
            ) from None

    def rpc(self, _method: str, **data: Any) -> Any:
        correlation_id = next(self._correlation_ids)
        reply = concurrency.Event()
        self._pending[correlation_id] = reply
        self.app.send(
            json.dumps(
                {"method": _method, "data": data, "correlation_id": correlation_id}
            )
        )
        try:
            with concurrency.Timeout(
                self.timeout,
                TimeoutError(f"no reply to {_method!r} within {self.timeout} seconds"),
            ):
                frame = reply.wait()
        finally:
            self._pending.pop(correlation_id, None)
        if frame.get("success"):
            return frame.get("data")
        raise deserialize(frame.get("error") or {})

    def _receive(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if frame.get("type") == "event":
            event_type = frame.get("event")
            self._event_queues[event_type].put((event_type, frame.get("data")))
        elif frame.get("type") == "result":
            reply = self._pending.get(frame.get("correlation_id"))
            if reply is None:
                log.warning("reply to no pending call", extra={"frame": frame})
            elif not reply.ready():
                reply.send(frame)
        else:
            log.warning("unexpected websocket frame", extra={"frame": frame})


def make_virtual_socket(
    host: str, port: int, path: str = "/ws"
) -> tuple[WebSocketApp, Callable[..., VirtualSocket]]:
    """A websocket client for ``ws://host:port/path``, not yet connected.

    Returns ``(ws_app, wait_for_socket)``: run ``ws_app.run_forever`` in a green
    thread, then ``wait_for_socket()`` returns the connected ``VirtualSocket`` or
    raises why the connection failed (e.g. ``ConnectionRefusedError``).
    """
    opened = concurrency.Event()
    socket_holder: list[VirtualSocket] = []

    def on_open(ws: WebSocketApp) -> None:
        if not opened.ready():
            opened.send(None)

    def on_error(ws: WebSocketApp, error: Exception) -> None:
        # Before the socket opened, the error is why it never will; after, the
        # connection is gone and pending calls will time out.
        if not opened.ready():
            opened.send(error)
        else:
            log.warning("websocket error: %r", error)

    def on_message(ws: WebSocketApp, message: str | bytes) -> None:
        socket_holder[0]._receive(message)

    ws_app = WebSocketApp(
        f"ws://{host}:{port}{path}",
        on_open=on_open,
        on_error=on_error,
        on_message=on_message,
    )
    socket_holder.append(VirtualSocket(ws_app))

    def wait_for_socket(timeout: float | None = DEFAULT_TIMEOUT) -> VirtualSocket:
        with concurrency.Timeout(
            timeout,
            TimeoutError(
                f"websocket {ws_app.url} did not open within {timeout} seconds"
            ),
        ):
            error = opened.wait()
        if error is not None:
            raise error
        return socket_holder[0]

    return ws_app, wait_for_socket
