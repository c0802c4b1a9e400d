"""RPC proxies for code outside any service: scripts, shells, tests, web apps.

Single-connection and caller-driven: whoever waits for a reply or a publisher
confirm reads the connection (see ``DrainedConnection``), so these proxies work in
plain, unpatched programs as well as under eventlet.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import amqp.exceptions
import kombu
import kombu.serialization

from framework import concurrency, containers, serialization
from framework import rpc as rpc_module
from framework.amqp import channels
from framework.amqp.connection import CONNECTION_ERRORS, DrainedConnection, Waiter
from framework.amqp.frames import speed_up_deliveries
from framework.amqp.publish import Publisher
from framework.constants import (
    ACCEPT_CONFIG_KEY,
    CALL_ID_STACK_CONTEXT_KEY,
    DEFAULT_SERIALIZER,
    RPC_REPLY_QUEUE_TEMPLATE,
    SERIALIZER_CONFIG_KEY,
)
from framework.exceptions import (
    ProxyUsedAcrossThreads,
    ReplyQueueExpiredWithPendingReplies,
    RpcTimeout,
)
from framework.messaging import encode_to_headers
from framework.rpc import (
    ClusterProxy,
    RpcClient,
    RpcReply,
    ServiceProxy,
    get_rpc_exchange,
    get_rpc_timeout,
)

log = logging.getLogger(__name__)

STANDALONE_SERVICE_NAME = "standalone_rpc_proxy"


class StandaloneReplyEvent:
    def __init__(
        self, listener: SingleThreadedReplyListener, correlation_id: str
    ) -> None:
        self.listener = listener
        self.correlation_id = correlation_id
        self.waiter = Waiter()

    def ready(self) -> bool:
        return self.waiter.ready()

    def fail(self, error: BaseException) -> None:
        self.waiter.set(error=error)

    def rearm(self) -> None:
        self.waiter = Waiter()

    def wait(self, timeout: float | None) -> Any:
        self.listener.check_usable()
        deadline = concurrency.Deadline(timeout)
        connection = self.listener.connection
        while True:
            generation = connection.generation
            try:
                connection.ensure_connected()
                if connection.wait_for(self.waiter, deadline):
                    if self.waiter.error is not None:
                        raise self.waiter.error
                    return self.waiter.value
            except CONNECTION_ERRORS as exc:
                # The reply queue is durable and redeclared on reconnect, so a
                # reply published meanwhile is still waiting for us there.
                log.warning(
                    "connection lost while waiting for a reply (%s); reconnecting", exc
                )
                connection.reset(generation)
                if deadline.expired():
                    raise
                continue
            self.listener.forget(self.correlation_id)
            raise RpcTimeout(timeout)


class SingleThreadedReplyListener:
    """The proxy's reply queue, consumed on the proxy's own connection."""

    def __init__(self, connection: DrainedConnection, config: dict[str, Any]) -> None:
        self.connection = connection
        self.accept = kombu.serialization.prepare_accept_content(
            config.get(ACCEPT_CONFIG_KEY)
            or [config.get(SERIALIZER_CONFIG_KEY, DEFAULT_SERIALIZER)]
        )
        self.routing_key = str(uuid.uuid4())
        self.queue = kombu.Queue(
            RPC_REPLY_QUEUE_TEMPLATE.format(STANDALONE_SERVICE_NAME, self.routing_key),
            exchange=get_rpc_exchange(config),
            routing_key=self.routing_key,
            # Read from framework.rpc at each proxy, where nameko users patch it.
            queue_arguments={"x-expires": rpc_module.RPC_REPLY_QUEUE_TTL},
        )
        self.waiting: dict[str, StandaloneReplyEvent] = {}
        self.owner_thread: int | None = None
        self.stopped = False
        self._declared = False
        connection.on_connect(self._consume)

    def check_usable(self) -> None:
        """Refuse calls after the proxy stopped (its ``with`` block ended).

        Otherwise the connection would quietly be reopened by a proxy nobody will
        close again, as nameko's refusal avoids.
        """
        if self.stopped:
            raise RuntimeError(
                "this RPC proxy has been stopped (its `with` block ended) and can "
                "no longer be used; start a new one"
            )
        self.check_thread()

    def check_thread(self) -> None:
        """Fail fast in any OS thread but the proxy's own.

        Another thread would wait on green primitives that belong to the owner's
        hub (or read the socket the owner reads): its call would hang past its
        timeout, or take the owner's replies. The owner is the thread that
        started the proxy (green threads of that thread are all fine).
        """
        current = concurrency.os_thread_id()
        if self.owner_thread is None:
            self.owner_thread = current
        elif current != self.owner_thread:
            raise ProxyUsedAcrossThreads(
                f"this standalone RPC proxy belongs to OS thread {self.owner_thread}, "
                f"which started it, and was used from thread {current}; it is not "
                "thread-safe: give each thread its own proxy"
            )

    def _consume(self, connection: kombu.Connection) -> None:
        if self._declared and self.waiting and not self._queue_exists(connection):
            # The queue expired (x-expires) while we were disconnected: replies to
            # the calls still waiting went nowhere, so fail them now instead of
            # letting each wait out its timeout.
            waiting, self.waiting = self.waiting, {}
            for event in waiting.values():
                event.fail(
                    ReplyQueueExpiredWithPendingReplies(
                        f"lost replies for {len(waiting)} call(s): the reply queue "
                        f"{self.queue.name} expired while disconnected"
                    )
                )
        channel = connection.channel()
        if channels.is_amqp(connection):
            speed_up_deliveries(channel)
        self.queue.bind(channel).declare()
        self._declared = True
        channels.consume(channel, self.queue.name, self._on_message, no_ack=True)

    def _on_message(self, raw: Any) -> None:
        received = channels.parts(raw)
        correlation_id = str(received.properties.get("correlation_id"))
        event = self.waiting.pop(correlation_id, None)
        if event is None:
            log.debug(
                "dropping a reply nobody waits for",
                extra={"correlation_id": correlation_id},
            )
            return
        try:
            body = serialization.loads(
                received.body,
                received.properties.get("content_type"),
                received.properties.get("content_encoding"),
                self.accept,
            )
        except Exception as exc:  # a broken reply must fail its call, not the proxy
            body = {
                "result": None,
                "error": {
                    "exc_type": "MalformedReply",
                    "exc_path": "",
                    "exc_args": [str(exc)],
                    "value": str(exc),
                },
            }
        event.waiter.set(body)

    def _queue_exists(self, connection: kombu.Connection) -> bool:
        channel = connection.channel()  # a failed passive declare closes it
        try:
            channel.queue_declare(self.queue.name, passive=True)
        except amqp.exceptions.NotFound:
            return False
        channel.close()
        return True

    def get_reply_event(self, correlation_id: str) -> StandaloneReplyEvent:
        event = self.waiting[correlation_id] = StandaloneReplyEvent(
            self, correlation_id
        )
        return event

    def forget(self, correlation_id: str) -> None:
        self.waiting.pop(correlation_id, None)


class StandaloneRpcClient(RpcClient):
    """An ``RpcClient`` that refuses calls from any OS thread but its proxy's."""

    _reply_listener: SingleThreadedReplyListener

    def call(
        self,
        service_name: str,
        method_name: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
    ) -> RpcReply:
        self._reply_listener.check_usable()
        return super().call(service_name, method_name, args, kwargs, timeout)


class StandaloneProxyBase:
    def __init__(
        self,
        config: dict[str, Any],
        context_data: dict[str, Any] | None = None,
        timeout: float | None = None,
        **publisher_options: Any,
    ) -> None:
        self.config = config
        self.context_data = dict(context_data or {})
        self.timeout = timeout if timeout is not None else get_rpc_timeout(config)
        self.connection = DrainedConnection(config, purpose="standalone rpc proxy")
        self.publisher = Publisher(
            config,
            connection=self.connection,
            use_confirms=publisher_options.pop("use_confirms", True),
        )
        self.reply_listener = SingleThreadedReplyListener(self.connection, config)
        self.client = StandaloneRpcClient(
            config,
            self.publisher.publish,
            self.reply_listener,
            self._context_headers,
            config.get(SERIALIZER_CONFIG_KEY, DEFAULT_SERIALIZER),
            publisher_options,
        )

    def _context_headers(self) -> dict[str, Any]:
        # Looked up on the module so that ``predictable_call_ids`` covers proxies.
        call_id = f"{STANDALONE_SERVICE_NAME}.call.{containers.new_call_id()}"
        return encode_to_headers(
            {**self.context_data, CALL_ID_STACK_CONTEXT_KEY: [call_id]}
        )

    def _connect(self) -> None:
        self.reply_listener.check_thread()
        self.reply_listener.stopped = False
        self.connection.ensure_connected()

    def stop(self) -> None:
        self.reply_listener.stopped = True
        self.connection.close()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class ClusterRpcProxy(StandaloneProxyBase):
    """``with ClusterRpcProxy(config) as rpc: rpc.greeter.hello("Matt")``."""

    def start(self) -> ClusterProxy:
        self._connect()
        return ClusterProxy(self.client, self.timeout)

    def __enter__(self) -> ClusterProxy:
        return self.start()


class ServiceRpcProxy(StandaloneProxyBase):
    """``with ServiceRpcProxy("greeter", config) as greeter: greeter.hello("Matt")``."""

    def __init__(
        self,
        service_name: str,
        config: dict[str, Any],
        context_data: dict[str, Any] | None = None,
        timeout: float | None = None,
        **publisher_options: Any,
    ) -> None:
        self.service_name = service_name
        super().__init__(config, context_data, timeout, **publisher_options)

    def start(self) -> ServiceProxy:
        self._connect()
        return ServiceProxy(self.client, self.service_name, self.timeout)

    def __enter__(self) -> ServiceProxy:
        return self.start()


#: nameko's name for the event a standalone call waits on.
ConsumeEvent = StandaloneReplyEvent
ClusterRpcClient = ClusterRpcProxy
ServiceRpcClient = ServiceRpcProxy
