"""Websocket entrypoints and the hub that pushes events to connected sockets.

The container's ``WebServer`` serves websockets at ``GET /ws``, speaking nameko's
frame protocol (JSON text frames):

* on connect the server sends
  ``{"type": "event", "event": "connected", "data": {"socket_id": "<id>"}}``;
* the client calls ``{"method": "<name>", "data": {<kwargs>}, "correlation_id": <any>}``
  and gets ``{"type": "result", "success": true, "data": <result>,
  "correlation_id": <same>}``, or ``"success": false`` with ``"error"`` holding the
  serialized exception (``MalformedRequest`` for a frame that is not such an object,
  ``MethodNotFound`` for an unknown method); an exception the method did not declare
  in ``expected_exceptions`` keeps its type, but its ``value`` is a generic message
  with the call id under which the service's log has the details: its text may
  hold anything;
* the hub pushes ``{"type": "event", "event": <event>, "data": <data>}``.

An ``@rpc`` method takes ``(self, socket_id, **data)``. Frames of one socket are
handled one at a time, in order, as in nameko.

Everything sent to a socket goes through its own bounded queue, drained by its own
green thread (``FrameSender``): pushing never blocks, so one slow or dead client
cannot hold up a broadcast, a reply to another socket, or the worker that pushes.
A socket whose queue is full (``WEBSOCKET_QUEUE_SIZE`` frames) or whose send fails
or takes longer than ``WEBSOCKET_SEND_TIMEOUT`` is dropped: closed, its
subscriptions forgotten. Clients reconnect and subscribe again.

A socket holds a slot of the web server (``WEB_MAX_CONNECTIONS``), so a silent one
must not hold it for ever: the server pings every socket that has sent nothing for
half of ``WEBSOCKET_IDLE_TIMEOUT`` (60 s by default), every client library answers
with a pong, and a socket that sends nothing at all, pong included, for the whole
timeout is closed.

The upgrade is refused (403) when the request's ``Origin`` is neither the server's
own (the ``Host`` it was reached at) nor one of ``WEB_ALLOWED_ORIGINS``: a browser
sends the page's cookies with a websocket upgrade whatever page asks for it, so
without this any site a logged-in user visits could drive the socket in their name
(cross-site websocket hijacking). A request without ``Origin`` comes from no
browser and is accepted.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from framework import concurrency
from framework.constants import (
    DEFAULT_WEBSOCKET_QUEUE_SIZE,
    DEFAULT_WEBSOCKET_SEND_TIMEOUT,
    WEBSOCKET_QUEUE_SIZE_CONFIG_KEY,
    WEBSOCKET_SEND_TIMEOUT_CONFIG_KEY,
)
from framework.exceptions import (
    ConnectionNotFound,
    MalformedRequest,
    MethodNotFound,
    UnserializableValueError,
    is_expected,
    safe_error,
)
from framework.extensions import DependencyProvider, Entrypoint, SharedExtension
from framework.logs import log_error
from framework.web.server import (
    WEB_ALLOWED_ORIGINS_CONFIG_KEY,
    WebServer,
    WsgiApplication,
    context_data_from_headers,
)

if TYPE_CHECKING:
    from framework.containers import ExcInfo, WorkerContext

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"
WEBSOCKET_IDLE_TIMEOUT_CONFIG_KEY = "WEBSOCKET_IDLE_TIMEOUT"
DEFAULT_WEBSOCKET_IDLE_TIMEOUT = 60.0  # seconds without a frame from the client

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _normalise_origin(origin: str) -> str | None:
    """``scheme://host:port`` with the scheme's default port made explicit, or
    ``None`` for what is no origin (``null``, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return f"{scheme}://{parts.hostname.lower()}:{port or _DEFAULT_PORTS[scheme]}"


def _allowed_origins(configured: Any) -> tuple[bool, set[str]]:
    """``(any origin allowed, normalised origins)`` from ``WEB_ALLOWED_ORIGINS``."""
    if configured is None:
        return False, set()
    items: Iterable[Any] = (
        configured.split(",") if isinstance(configured, str) else configured
    )
    names = [str(item).strip() for item in items if str(item).strip()]
    allowed = {_normalise_origin(name) for name in names if name != "*"}
    return "*" in names, {origin for origin in allowed if origin is not None}


def origin_allowed(environ: dict[str, Any], configured: Any) -> bool:
    """Whether a websocket upgrade's ``Origin`` may connect: none (no browser), the
    server's own (same host and port as ``Host``), or one of ``configured``."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return True
    any_origin, allowed = _allowed_origins(configured)
    if any_origin:
        return True
    normalised = _normalise_origin(origin)
    if normalised is None:
        return False
    if normalised in allowed:
        return True
    host = environ.get("HTTP_HOST")
    if not host:
        return False
    scheme = normalised.split("://", 1)[0]
    # The Host the client reached us at, in the origin's scheme: a page served
    # from this very server (or through a proxy that keeps Host) is same-origin.
    return _normalise_origin(f"{scheme}://{host}") == normalised


_CLOSE = object()  # queued after the last frame of a socket being closed gracefully
_PING = object()


def event_frame(event: str, data: Any) -> str:
    return json.dumps({"type": "event", "event": event, "data": data})


def result_frame(correlation_id: Any, result: Any) -> str:
    frame = {
        "type": "result",
        "success": True,
        "data": result,
        "correlation_id": correlation_id,
    }
    try:
        return json.dumps(frame)
    except (TypeError, ValueError):
        return error_frame(correlation_id, UnserializableValueError.of_type(result))


def error_frame(
    correlation_id: Any,
    exc: BaseException,
    *,
    expected: bool | None = None,
    error_id: str | None = None,
) -> str:
    """A failed result. ``error`` is nameko's error dict; for an exception that is
    not ``expected`` (by default ``is_expected``) its ``value`` is a generic message
    naming the type and ``error_id`` (the call id), never the exception's text."""
    if expected is None:
        expected = is_expected(exc)
    frame = {
        "type": "result",
        "success": False,
        "error": safe_error(exc, expected, error_id),
        "correlation_id": correlation_id,
    }
    return json.dumps(frame)


class WorkerFailed(Exception):
    """A websocket ``@rpc`` worker raised ``exc``: with what the reply may say of it."""

    def __init__(self, exc: BaseException, expected: bool, call_id: str) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc
        self.expected = expected
        self.call_id = call_id


class Connection:
    """What the server knows about one connected socket."""

    def __init__(self, socket_id: str, context_data: dict[str, Any]) -> None:
        self.socket_id = socket_id
        self.context_data = context_data
        self.subscriptions: set[str] = set()

    def __repr__(self) -> str:
        return f"<Connection {self.socket_id}>"


class FrameSender:
    """The sending side of one socket: a bounded queue and the thread that drains it."""

    def __init__(
        self,
        ws: Any,
        socket_id: str,
        queue_size: int,
        send_timeout: float,
        ping_interval: float | None = None,
    ):
        self.socket_id = socket_id
        self.closed = False
        self._ws = ws
        self._queue: concurrency.Queue = concurrency.Queue(maxsize=queue_size)
        self._send_timeout = send_timeout
        self._ping_interval = ping_interval
        self._thread: concurrency.GreenThread | None = None

    def start(self) -> None:
        self._thread = concurrency.spawn(self._run)

    def push(self, frame: str) -> bool:
        """Queue a frame; ``False`` if the socket is closed, or dropped for lagging."""
        if self.closed:
            return False
        try:
            self._queue.put_nowait(frame)
        except concurrency.Full:
            log.warning(
                "dropping websocket: outgoing queue full",
                extra={"socket_id": self.socket_id, "queue_size": self._queue.maxsize},
            )
            self.drop()
            return False
        return True

    def close(self) -> None:
        """Send what is queued, then a close frame."""
        if self.closed:
            return
        self.closed = True
        try:
            self._queue.put_nowait(_CLOSE)
        except concurrency.Full:
            self.drop()

    def drop(self) -> None:
        """Close now, without waiting for the client: never blocks."""
        self.closed = True
        if self._thread is not None:
            concurrency.kill(self._thread)
        self._shutdown()

    def _shutdown(self) -> None:
        # Wakes the connection's reader (it sees end of stream) and any blocked
        # send, without writing a close frame a stuck client would never read.
        try:
            self._ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            try:
                frame = self._queue.get(timeout=self._ping_interval)
            except concurrency.Empty:
                # Nothing to send for a while: ask for a pong, so that a live
                # client that has nothing to say is not taken for a dead one.
                frame = _PING
            if frame is _CLOSE:
                try:
                    with concurrency.Timeout(self._send_timeout):
                        concurrency.websocket_send_close(self._ws)
                except (Exception, concurrency.Timeout):
                    pass
                # Not waiting for the client's own close frame: we are stopping.
                self._shutdown()
                return
            try:
                with concurrency.Timeout(self._send_timeout):
                    if frame is _PING:
                        concurrency.websocket_send_ping(self._ws)
                    else:
                        self._ws.send(frame)
            except (Exception, concurrency.Timeout) as exc:
                log.info(
                    "dropping websocket: send failed",
                    extra={"socket_id": self.socket_id, "error": repr(exc)},
                )
                self.closed = True
                self._shutdown()
                return


class SocketInfo(NamedTuple):
    """A connected socket: its sending side and the connection's state."""

    socket: FrameSender
    data: Connection


class WebSocketServer(SharedExtension):
    """Serves ``/ws`` on the container's web server and owns the connected sockets."""

    server = WebServer()

    def __init__(self) -> None:
        self.sockets: dict[str, SocketInfo] = {}
        self.subscriptions: dict[str, set[str]] = defaultdict(set)
        self.rpc_methods: dict[str, WebSocketRpc] = {}
        self._all_closed = concurrency.Event()
        self._stopping = False

    @property
    def queue_size(self) -> int:
        return int(
            self.container.config.get(
                WEBSOCKET_QUEUE_SIZE_CONFIG_KEY, DEFAULT_WEBSOCKET_QUEUE_SIZE
            )
        )

    @property
    def send_timeout(self) -> float:
        return float(
            self.container.config.get(
                WEBSOCKET_SEND_TIMEOUT_CONFIG_KEY, DEFAULT_WEBSOCKET_SEND_TIMEOUT
            )
        )

    @property
    def idle_timeout(self) -> float:
        return float(
            self.container.config.get(
                WEBSOCKET_IDLE_TIMEOUT_CONFIG_KEY, DEFAULT_WEBSOCKET_IDLE_TIMEOUT
            )
        )

    def setup(self) -> None:
        self.server.register_provider(self)

    def stop(self) -> None:
        """Flush and close every socket, then let the web server stop."""
        self._stopping = True
        for info in list(self.sockets.values()):
            info.socket.close()
        if self.sockets:
            with concurrency.Timeout(self.send_timeout, False):
                self._all_closed.wait()
        for info in list(self.sockets.values()):
            info.socket.drop()
        self.server.unregister_provider(self)

    def kill(self) -> None:
        self._stopping = True
        for info in list(self.sockets.values()):
            info.socket.drop()
        self.server.unregister_provider(self)

    def register_rpc(self, provider: WebSocketRpc) -> None:
        self.rpc_methods[provider.method_name] = provider  # type: ignore[index]

    def get_url_rule(self) -> Rule:
        return Rule(WEBSOCKET_PATH, methods=["GET"], endpoint=self, websocket=True)

    def context_data_from_headers(self, request: Request) -> dict[str, Any]:
        """Context data for every worker of the socket, from the upgrade request."""
        return context_data_from_headers(request, self.container.config)

    def handle_request(self, request: Request) -> WsgiApplication:
        allowed = self.container.config.get(WEB_ALLOWED_ORIGINS_CONFIG_KEY)
        if not origin_allowed(request.environ, allowed):
            log.warning(
                "websocket upgrade refused: origin not allowed",
                extra={
                    "service": self.container.service_name,
                    "origin": request.headers.get("Origin", "")[:200],
                },
            )
            body = {
                "error": "Forbidden",
                "message": f"Origin not allowed; see {WEB_ALLOWED_ORIGINS_CONFIG_KEY}",
            }
            return Response(json.dumps(body), 403, mimetype="application/json")
        context_data = self.context_data_from_headers(request)
        return concurrency.websocket_app(partial(self._serve_socket, context_data))

    def _serve_socket(self, context_data: dict[str, Any], ws: Any) -> None:
        """The connection's thread: reads frames and answers them, one at a time."""
        socket_id = str(uuid.uuid4())
        idle_timeout = self.idle_timeout
        # Every read waits at most this long (pongs count): a client that sends
        # nothing at all is gone, and its slot is given back.
        ws.socket.settimeout(idle_timeout)
        sender = FrameSender(
            ws,
            socket_id,
            self.queue_size,
            self.send_timeout,
            ping_interval=idle_timeout / 2,
        )
        connection = Connection(socket_id, context_data)
        self.sockets[socket_id] = SocketInfo(sender, connection)
        log.debug("websocket connected", extra={"socket_id": socket_id})
        try:
            sender.start()
            sender.push(event_frame("connected", {"socket_id": socket_id}))
            if self._stopping:
                sender.close()
            while True:
                try:
                    message = ws.wait()
                except Exception as exc:
                    log.debug(
                        "websocket read failed",
                        extra={"socket_id": socket_id, "error": repr(exc)},
                    )
                    break
                if message is None:
                    break
                if not sender.push(self.handle_frame(connection, message)):
                    break
        finally:
            self._forget(connection)
            sender.drop()
            log.debug("websocket disconnected", extra={"socket_id": socket_id})

    def _forget(self, connection: Connection) -> None:
        self.sockets.pop(connection.socket_id, None)
        for channel in connection.subscriptions:
            subscribers = self.subscriptions.get(channel)
            if subscribers is not None:
                subscribers.discard(connection.socket_id)
                if not subscribers:
                    del self.subscriptions[channel]
        connection.subscriptions.clear()
        if self._stopping and not self.sockets and not self._all_closed.ready():
            self._all_closed.send()

    def handle_frame(self, connection: Connection, message: str | bytes) -> str:
        """One client frame → the reply frame (a result or an error)."""
        correlation_id = None
        try:
            try:
                payload = json.loads(message)
            except ValueError:
                raise MalformedRequest("Invalid JSON data") from None
            if not isinstance(payload, dict):
                raise MalformedRequest("A frame must be a JSON object")
            correlation_id = payload.get("correlation_id")
            method = payload.get("method")
            data = payload.get("data")
            if data is None:
                data = {}
            if not isinstance(method, str) or not isinstance(data, dict):
                raise MalformedRequest(
                    "A frame needs `method` (a string) and `data` (an object)"
                )
            provider = self.rpc_methods.get(method)
            if provider is None:
                raise MethodNotFound(method)
            result = provider.handle_message(connection, data)
        except WorkerFailed as failed:
            # The worker's error log has the details under its call id.
            return error_frame(
                correlation_id,
                failed.exc,
                expected=failed.expected,
                error_id=failed.call_id,
            )
        except Exception as exc:
            expected = is_expected(exc)
            error_id = str(uuid.uuid4())
            if not expected:
                log_error(
                    log,
                    "could not start a websocket worker",
                    exc,
                    expected=False,
                    correlation_id=error_id,
                    fields={"socket_id": connection.socket_id},
                )
            return error_frame(
                correlation_id, exc, expected=expected, error_id=error_id
            )
        return result_frame(correlation_id, result)

    # -- used by the hub -----------------------------------------------------------

    def get_connection(self, socket_id: str) -> Connection:
        try:
            return self.sockets[socket_id].data
        except KeyError:
            raise ConnectionNotFound(socket_id) from None

    def push(self, socket_id: str, frame: str) -> bool:
        info = self.sockets.get(socket_id)
        if info is None:
            return False
        return info.socket.push(frame)


class WebSocketRpc(Entrypoint):
    """``@rpc``: a method websocket clients call as ``(self, socket_id, **data)``."""

    server = WebSocketServer()

    def setup(self) -> None:
        self.server.register_rpc(self)

    def handle_message(self, connection: Connection, data: dict[str, Any]) -> Any:
        """Run the method in a worker and wait for its result (or its exception)."""
        args = (connection.socket_id,)
        self.check_signature(args, data)
        done = concurrency.Event()
        self.container.spawn_worker(
            self,
            args,
            data,
            context_data=connection.context_data,
            handle_result=partial(self._handle_result, done),
        )
        return done.wait()

    def _handle_result(
        self,
        done: concurrency.Event,
        worker_ctx: WorkerContext,
        result: Any,
        exc_info: ExcInfo | None,
    ) -> tuple[Any, ExcInfo | None]:
        if exc_info is not None:
            exc = exc_info[1]
            done.send_exception(
                WorkerFailed(
                    exc,
                    is_expected(exc, self.expected_exceptions),
                    worker_ctx.call_id,
                )
            )
        else:
            done.send(result)
        return result, exc_info


class WebSocketHub:
    """Subscriptions and pushes to the sockets connected to this process.

    State lives in this process only. With several replicas of a web service, each
    holds its own sockets, so an event meant for every subscriber must reach every
    replica; that fan-out is the application's, with a BROADCAST event handler
    (one queue per replica) that hands the event to its local hub::

        class Gateway:
            name = "gateway"
            hub = WebSocketHubProvider()

            @event_handler("orders", "order_shipped", handler_type=BROADCAST,
                           reliable_delivery=False)
            def push_order_shipped(self, payload):
                self.hub.broadcast(f"orders.{payload['order_id']}",
                                   "order_shipped", payload)

    ``reliable_delivery=False`` because a replica's queue must go away with it:
    its sockets did too.
    """

    def __init__(self, server: WebSocketServer) -> None:
        self._server = server

    def subscribe(self, socket_id: str, channel: str) -> None:
        connection = self._server.get_connection(socket_id)
        connection.subscriptions.add(channel)
        self._server.subscriptions[channel].add(socket_id)

    def unsubscribe(self, socket_id: str, channel: str) -> None:
        """Idempotent, and a socket that is not (or no longer) connected here is
        not an error: whatever it was subscribed to went with it."""
        info = self._server.sockets.get(socket_id)
        if info is not None:
            info.data.subscriptions.discard(channel)
        subscribers = self._server.subscriptions.get(channel)
        if subscribers is not None:
            subscribers.discard(socket_id)
            if not subscribers:
                del self._server.subscriptions[channel]

    def get_subscriptions(self, socket_id: str) -> list[str]:
        return sorted(self._server.get_connection(socket_id).subscriptions)

    @property
    def subscriptions(self) -> defaultdict[str, set[str]]:
        """Channel -> ids of the sockets subscribed to it here (nameko's attribute).

        A copy: subscribing goes through ``subscribe``, which keeps the socket's
        own record in step. A channel nobody listens to reads as an empty set.
        """
        return defaultdict(
            set,
            {
                channel: set(sockets)
                for channel, sockets in self._server.subscriptions.items()
            },
        )

    def broadcast(self, channel: str, event: str, data: Any) -> int:
        """Queue the event for every subscriber; returns how many got it queued."""
        frame = event_frame(event, data)
        subscribers = list(self._server.subscriptions.get(channel, ()))
        return sum(self._server.push(socket_id, frame) for socket_id in subscribers)

    def unicast(self, socket_id: str, event: str, data: Any) -> bool:
        """Queue the event for one socket; ``False`` if it is not connected here."""
        return self._server.push(socket_id, event_frame(event, data))


class WebSocketHubProvider(DependencyProvider):
    """Injects the container's ``WebSocketHub``."""

    server = WebSocketServer()

    def setup(self) -> None:
        self.hub = WebSocketHub(self.server)

    def get_dependency(self, worker_ctx: WorkerContext) -> WebSocketHub:
        return self.hub


rpc = WebSocketRpc.decorator
