"""RPC over AMQP, on nameko's wire format.

Requests go to the topic exchange ``nameko-rpc`` with routing key
``<service>.<method>``; each service consumes its durable queue ``rpc-<service>``.
Replies go back through the same exchange with the caller's ``reply_to`` as routing
key. Unlike nameko, every call can time out, in services too.
"""

from __future__ import annotations

import functools
import logging
import uuid
from functools import partial
from typing import Any

import kombu
import kombu.exceptions

from framework import concurrency, serialization
from framework.amqp.connection import ConnectionLost
from framework.constants import (
    DEFAULT_RPC_EXCHANGE,
    DEFAULT_RPC_PERSISTENT_REPLIES,
    DEFAULT_RPC_PERSISTENT_REQUESTS,
    DEFAULT_RPC_TIMEOUT,
    NON_PERSISTENT,
    PERSISTENT,
    RPC_EXCHANGE_CONFIG_KEY,
    RPC_PERSISTENT_REPLIES_CONFIG_KEY,
    RPC_PERSISTENT_REQUESTS_CONFIG_KEY,
    RPC_QUEUE_TEMPLATE,
    RPC_REPLY_QUEUE_TEMPLATE,
    RPC_REPLY_QUEUE_TTL,
    RPC_TIMEOUT_CONFIG_KEY,
)
from framework.containers import WorkerContext
from framework.exceptions import (
    ContainerBeingKilled,
    MalformedRequest,
    MethodNotFound,
    RpcTimeout,
    UndeliverableMessage,
    UnknownService,
    UnserializableValueError,
    deserialize,
    is_expected,
    safe_error,
    serialize,
)
from framework.extensions import (
    DependencyProvider,
    Entrypoint,
    ProviderCollector,
    SharedExtension,
)
from framework.logs import log_error
from framework.messaging import (
    ContainerPublisher,
    HeaderDecoder,
    HeaderEncoder,
    QueueConsumer,
)
from framework.serialization import content_type_to_serializer
from framework.utils import uuid4_str

log = logging.getLogger(__name__)


def get_rpc_exchange(config: dict[str, Any]) -> kombu.Exchange:
    return _rpc_exchange(config.get(RPC_EXCHANGE_CONFIG_KEY, DEFAULT_RPC_EXCHANGE))


@functools.cache
def _rpc_exchange(name: str) -> kombu.Exchange:
    # One object per name: built per reply and per client, it showed in profiles.
    return kombu.Exchange(name, type="topic", durable=True, auto_delete=False)


def get_rpc_timeout(config: dict[str, Any]) -> float | None:
    value = config.get(RPC_TIMEOUT_CONFIG_KEY, DEFAULT_RPC_TIMEOUT)
    return float(value) if value else None


def _flag(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def reply_options(config: dict[str, Any]) -> dict[str, Any]:
    """Publish options of an RPC reply.

    Transient unless ``RPC_PERSISTENT_REPLIES``: a reply goes to the caller's
    reply queue, which is not durable and expires with its connection, so a
    persistent reply survives nothing, yet costs the broker a disk write (and
    its confirm waits for it).
    """
    persistent = _flag(
        config, RPC_PERSISTENT_REPLIES_CONFIG_KEY, DEFAULT_RPC_PERSISTENT_REPLIES
    )
    return {"delivery_mode": PERSISTENT if persistent else NON_PERSISTENT}


def request_options(config: dict[str, Any]) -> dict[str, Any]:
    """Publish options of an RPC request.

    Transient unless ``RPC_PERSISTENT_REQUESTS``. A persistent request outlives
    a broker restart, but its caller does not wait through one: the caller's
    reply queue goes with the broker, the call times out or is resent (a request
    lost with its connection is sent again, see ``RpcClient``), and a replayed
    request would run for no one.
    """
    persistent = _flag(
        config, RPC_PERSISTENT_REQUESTS_CONFIG_KEY, DEFAULT_RPC_PERSISTENT_REQUESTS
    )
    return {"delivery_mode": PERSISTENT if persistent else NON_PERSISTENT}


# -- server side ----------------------------------------------------------------------


class Responder:
    """Publishes the reply to one request: ``{"result": ..., "error": ...}``."""

    def __init__(
        self, config: dict[str, Any], publisher: ContainerPublisher, message: Any
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.message = message

    def send_response(
        self,
        result: Any,
        exc_info: Any,
        expected_exceptions: Any = (),
        correlation_id: str | None = None,
    ) -> tuple[Any, Any]:
        """Publish the reply. An error the entrypoint did not expect travels as its
        type and ``correlation_id`` only (``safe_error``): its text stays here."""
        reply_to = self.message.properties.get("reply_to")
        if not reply_to:
            return result, exc_info  # a fire-and-forget caller: nobody to answer
        error = None
        if exc_info is not None:
            exc = exc_info[1]
            expected = is_expected(exc, expected_exceptions)
            error = safe_error(exc, expected, correlation_id)
        serializer = content_type_to_serializer(self.message.content_type, "json")
        options = {
            "exchange": get_rpc_exchange(self.config),
            "routing_key": reply_to,
            "serializer": serializer,
            "correlation_id": self.message.properties.get("correlation_id"),
            **reply_options(self.config),
        }
        serializer = options.pop("serializer")
        try:
            content_type, content_encoding, body = serialization.dumps(
                {"result": result, "error": error}, serializer
            )
        except Exception as exc:
            # Anything serialising raises (an encode error, a RecursionError from
            # a self-referencing value, a broken __str__...) is about the result,
            # not the broker: say so to the caller instead of leaving it waiting
            # or requeueing a request that would fail the same way. Its type only:
            # the value (its repr) may hold anything.
            log.warning(
                "unserializable RPC result",
                extra={
                    "result_type": type(result).__name__,
                    "error_type": type(exc).__name__,
                    "correlation_id": correlation_id,
                },
            )
            unserializable = UnserializableValueError.of_type(result)
            exc_info = (UnserializableValueError, unserializable, None)
            self.publisher.publish(
                {"result": None, "error": serialize(unserializable)},
                serializer=serializer,
                **options,
            )
            return None, exc_info
        self.publisher.publish_encoded(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            **options,
        )
        return result, exc_info


class RpcConsumer(SharedExtension, ProviderCollector):
    """Consumes ``rpc-<service>`` and routes each request to its ``@rpc`` method."""

    queue_consumer = QueueConsumer()
    publisher = ContainerPublisher()
    no_ack = False

    def __init__(self) -> None:
        self._methods: dict[str, Rpc] = {}
        # Methods whose entrypoint stopped (the container is stopping): their
        # requests go back to the queue, for another replica.
        self._retired: set[str] = set()
        super().__init__()

    def setup(self) -> None:
        service_name = self.container.service_name
        self.queue = kombu.Queue(
            RPC_QUEUE_TEMPLATE.format(service_name),
            exchange=get_rpc_exchange(self.container.config),
            routing_key=f"{service_name}.*",
            durable=True,
        )
        self.prefetch_count = self.queue_consumer.default_prefetch
        self.queue_consumer.register_provider(self)

    def register_provider(self, provider: Any) -> None:
        self._methods[provider.method_name] = provider
        self._retired.discard(provider.method_name)
        super().register_provider(provider)

    def unregister_provider(self, provider: Any) -> None:
        self._methods.pop(provider.method_name, None)
        self._retired.add(provider.method_name)
        super().unregister_provider(provider)
        if not self._providers:
            self.queue_consumer.unregister_provider(self)

    def stop(self) -> None:
        self.wait_for_providers()
        if not self._providers_registered:
            # No ``@rpc`` entrypoint ever registered (``restrict_entrypoints``
            # removed them all), so no last unregistration takes this consumer
            # off the queue consumer, which would wait for it.
            self.queue_consumer.unregister_provider(self)

    def get_provider_for_method(self, routing_key: str) -> Rpc:
        """The ``@rpc`` entrypoint a request's routing key names, or
        ``MethodNotFound``."""
        service, _, method_name = routing_key.rpartition(".")
        provider = (
            self._methods.get(method_name)
            if service == self.container.service_name
            else None
        )
        if provider is None:
            raise MethodNotFound(method_name)
        return provider

    def handle_message(self, body: Any, message: Any) -> None:
        routing_key = message.delivery_info.get("routing_key", "")
        method_name = routing_key.rsplit(".", 1)[-1]
        try:
            try:
                provider = self.get_provider_for_method(routing_key)
            except MethodNotFound:
                service = routing_key.rpartition(".")[0]
                if (
                    service == self.container.service_name
                    and method_name in self._retired
                ):
                    self._give_back(message, method_name)
                    return
                raise
            provider.handle_message(body, message)
        except ContainerBeingKilled:
            self.requeue_message(message)
        except Exception as exc:
            # The caller's correlation id is the only id this request has yet.
            correlation_id = message.properties.get("correlation_id")
            if not is_expected(exc):
                log_error(
                    log,
                    "could not start an RPC worker",
                    exc,
                    expected=False,
                    correlation_id=correlation_id,
                    fields={"routing_key": routing_key},
                )
            # Off the consumer loop: the reply waits for a publisher confirm. A
            # worker-related thread, so that a graceful stop waits for the reply.
            self.container.spawn_worker_related(
                self.handle_result,
                message,
                None,
                (type(exc), exc, exc.__traceback__),
                (),
                correlation_id,
            )

    def requeue_message(self, message: Any) -> None:
        """Give a request this container cannot run now (it is being killed)
        back to the queue, for another replica (nameko's name)."""
        method_name = message.delivery_info.get("routing_key", "").rsplit(".", 1)[-1]
        self._give_back(message, method_name)

    def _give_back(self, message: Any, method_name: str) -> None:
        # A stopping container no longer runs this method, but the service still
        # does: another replica (or this one, restarted) answers. Not at once, so
        # that this consumer, until it is gone, doesn't take it straight back.
        log.info(
            "stopping: request for %s goes back to the queue",
            method_name,
            extra={"correlation_id": message.properties.get("correlation_id")},
        )
        message.requeue_later()

    def handle_result(
        self,
        message: Any,
        result: Any,
        exc_info: Any,
        expected_exceptions: Any = (),
        correlation_id: str | None = None,
    ) -> tuple[Any, Any]:
        """Reply first, then ack: a request is never acked without its answer sent."""
        responder = Responder(self.container.config, self.publisher, message)
        try:
            result, exc_info = responder.send_response(
                result, exc_info, expected_exceptions, correlation_id
            )
        except Exception:
            # The publisher already retried. Give the request back to the broker,
            # after a pause so a broken broker link doesn't spin, rather than
            # hold it unacked (and a prefetch slot) until the connection drops.
            log.exception(
                "could not send an RPC reply; the request will be redelivered"
            )
            message.requeue_later()
            raise
        message.ack()
        return result, exc_info


class Rpc(Entrypoint, HeaderDecoder):
    """Exposes the decorated method over RPC as ``<service>.<method>``."""

    rpc_consumer = RpcConsumer()

    def setup(self) -> None:
        self.rpc_consumer.register_provider(self)

    def stop(self) -> None:
        self.rpc_consumer.unregister_provider(self)

    def handle_message(self, body: Any, message: Any) -> None:
        if not isinstance(body, dict) or "args" not in body or "kwargs" not in body:
            raise MalformedRequest("Message missing `args` or `kwargs`")
        args, kwargs = body["args"], body["kwargs"]
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise MalformedRequest("`args` must be a list and `kwargs` a mapping")
        self.check_signature(args, kwargs)
        context_data = self.unpack_message_headers(message)
        handle_result = partial(self.handle_result, message)
        try:
            self.rpc_consumer.queue_consumer.spawn_worker(
                self, message, tuple(args), kwargs, context_data, handle_result
            )
        except ContainerBeingKilled:
            self.rpc_consumer.requeue_message(message)

    def handle_result(
        self, message: Any, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        return self.rpc_consumer.handle_result(
            message, result, exc_info, self.expected_exceptions, worker_ctx.call_id
        )


rpc = Rpc.decorator


# -- client side ------------------------------------------------------------------------


class ReplyEvent:
    """Where one pending call's reply lands."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = concurrency.Event()

    def send(self, body: Any) -> None:
        if not self._event.ready():
            self._event.send(body)

    def fail(self, error: BaseException) -> None:
        """The request never made it (see ``RpcClient``): the wait raises ``error``."""
        if not self._event.ready():
            self._event.send_exception(error)

    def rearm(self) -> None:
        self._event = concurrency.Event()

    def ready(self) -> bool:
        return self._event.ready()

    def wait(self, timeout: float | None) -> Any:
        with concurrency.Timeout(timeout, False):
            return self._event.wait()
        raise RpcTimeout(timeout)


class ReplyListener(SharedExtension):
    """The container's reply queue, and the calls waiting on it.

    A reply whose caller gave up (timed out) finds no waiter and is dropped.
    """

    queue_consumer = QueueConsumer()
    no_ack = True  # replies are disposable: a lost one is a timed-out call

    def __init__(self) -> None:
        self.pending: dict[str, ReplyEvent] = {}
        super().__init__()

    def setup(self) -> None:
        self.routing_key = str(uuid.uuid4())
        self.queue = kombu.Queue(
            RPC_REPLY_QUEUE_TEMPLATE.format(
                self.container.service_name, self.routing_key
            ),
            exchange=get_rpc_exchange(self.container.config),
            routing_key=self.routing_key,
            queue_arguments={"x-expires": RPC_REPLY_QUEUE_TTL},
        )
        self.prefetch_count = 0
        self.queue_consumer.register_provider(self)

    def stop(self) -> None:
        self.queue_consumer.unregister_provider(self)

    def get_reply_event(self, correlation_id: str) -> ReplyEvent:
        event = self.pending[correlation_id] = ReplyEvent()
        return event

    def forget(self, correlation_id: str) -> None:
        self.pending.pop(correlation_id, None)

    def handle_message(self, body: Any, message: Any) -> None:
        correlation_id = message.properties.get("correlation_id")
        event = self.pending.pop(correlation_id, None)
        if event is None:
            log.debug(
                "dropping a reply nobody waits for",
                extra={"correlation_id": correlation_id},
            )
            return
        event.send(body)


class RequestUnconfirmed(Exception):
    """The connection went before the broker confirmed a request: send it again."""


class RpcReply:
    """A call in flight. ``result()`` waits for it (once) and returns or raises.

    The timeout runs from the call, not from ``result()``: of twenty
    ``call_async`` replies to a dead service, all fail once the timeout has
    passed since they were sent, not one timeout after the other.
    """

    def __init__(
        self,
        reply_event: Any,
        correlation_id: str,
        timeout: float | None,
        on_timeout: Any,
        resend: Any = None,
    ) -> None:
        self.reply_event = reply_event
        self.correlation_id = correlation_id
        self.timeout = timeout
        self._on_timeout = on_timeout
        self._resend = resend
        self._response: Any = None
        self._received = False
        self._deadline = concurrency.Deadline(timeout)

    def get_response(self, timeout: Any = "default") -> Any:
        """The raw reply body. ``timeout`` (seconds from now) replaces the
        call's own deadline for this wait."""
        if not self._received:
            if timeout == "default":
                wait, deadline = self.timeout, self._deadline
            else:
                wait, deadline = timeout, concurrency.Deadline(timeout)
            while True:
                try:
                    self._response = self.reply_event.wait(deadline.remaining())
                    break
                except RequestUnconfirmed:
                    # At least once, as a publish retry would be: the callee may
                    # see the request twice; we take the first reply.
                    log.warning(
                        "resending a request lost with its connection",
                        extra={"correlation_id": self.correlation_id},
                    )
                    self.reply_event.rearm()
                    self._resend()
                except RpcTimeout:
                    self._on_timeout(self.correlation_id)
                    raise RpcTimeout(
                        f"no reply within {wait}s (correlation id {self.correlation_id})"
                    ) from None
            self._received = True
        return self._response

    def result(self, timeout: Any = "default") -> Any:
        response = self.get_response(timeout)
        if not isinstance(response, dict):
            raise MalformedRequest(f"malformed RPC reply: {response!r}")
        error = response.get("error")
        if error:
            raise deserialize(error)
        return response.get("result")


class MethodProxy(HeaderEncoder):
    """``proxy.service.method(...)``; ``.call_async(...)``; ``.with_timeout(s)``."""

    def __init__(
        self,
        client: RpcClient,
        service_name: str,
        method_name: str,
        timeout: float | None,
    ) -> None:
        self.client = client
        self.service_name = service_name
        self.method_name = method_name
        self.timeout = timeout

    def with_timeout(self, timeout: float | None) -> MethodProxy:
        return MethodProxy(self.client, self.service_name, self.method_name, timeout)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call_async(*args, **kwargs).result()

    def call_async(self, *args: Any, **kwargs: Any) -> RpcReply:
        return self.client.call(
            self.service_name, self.method_name, args, kwargs, self.timeout
        )

    def __repr__(self) -> str:
        return f"<MethodProxy {self.service_name}.{self.method_name}>"


class ServiceProxy:
    def __init__(
        self, client: RpcClient, service_name: str, timeout: float | None
    ) -> None:
        self._client = client
        self.service_name = service_name
        self.timeout = timeout

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("__"):
            raise AttributeError(name)
        return MethodProxy(self._client, self.service_name, name, self.timeout)

    def with_timeout(self, timeout: float | None) -> ServiceProxy:
        return ServiceProxy(self._client, self.service_name, timeout)


class ClusterProxy:
    """``proxy.<service>.<method>(...)`` or ``proxy["service-name"].<method>(...)``."""

    def __init__(self, client: RpcClient, timeout: float | None) -> None:
        self._client = client
        self.timeout = timeout
        self._proxies: dict[str, ServiceProxy] = {}

    def __getattr__(self, name: str) -> ServiceProxy:
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def with_timeout(self, timeout: float | None) -> ClusterProxy:
        """The same proxy with another timeout (so no service may be named
        ``with_timeout``; reach one with ``proxy["with_timeout"]``)."""
        return ClusterProxy(self._client, timeout)

    def __getitem__(self, name: str) -> ServiceProxy:
        proxy = self._proxies.get(name)
        if proxy is None:
            proxy = self._proxies[name] = ServiceProxy(self._client, name, self.timeout)
        return proxy


class RpcClient:
    """Publishes requests and waits for replies; shared by in-service and standalone
    proxies, which differ only in how they publish, listen and wait."""

    def __init__(
        self,
        config: dict[str, Any],
        publish: Any,
        reply_listener: Any,
        context_headers: Any,
        serializer: str,
        options: dict[str, Any],
    ) -> None:
        self.config = config
        self.exchange = get_rpc_exchange(config)
        self._publish = publish
        self._reply_listener = reply_listener
        self._context_headers = context_headers
        self._serializer = serializer
        # The caller's own publisher options win over the configured defaults.
        self._options = {**request_options(config), **options}

    def call(
        self,
        service_name: str,
        method_name: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
    ) -> RpcReply:
        correlation_id = uuid4_str()
        reply_event = self._reply_listener.get_reply_event(correlation_id)
        options = {
            k: v
            for k, v in self._options.items()
            if k not in RESTRICTED_PUBLISHER_OPTIONS
        }
        headers = {**(options.pop("headers", None) or {}), **self._context_headers()}
        options.setdefault("serializer", self._serializer)
        send = partial(
            self._send,
            {"args": list(args), "kwargs": kwargs},
            service_name,
            f"{service_name}.{method_name}",
            correlation_id,
            reply_event,
            headers,
            options,
        )
        try:
            send()
        except BaseException:
            self._reply_listener.forget(correlation_id)
            raise
        return RpcReply(
            reply_event, correlation_id, timeout, self._reply_listener.forget, send
        )

    def _send(
        self,
        request: dict[str, Any],
        service_name: str,
        routing_key: str,
        correlation_id: str,
        reply_event: Any,
        headers: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        # Not waiting for the confirm: the reply proves the request arrived (and
        # the confirm of a persistent request only comes once the callee acked
        # it, after its reply). A request the broker returns (no such service),
        # refuses or loses with the connection fails or resends via ``on_failure``.
        try:
            self._publish(
                request,
                exchange=self.exchange,
                routing_key=routing_key,
                mandatory=True,
                reply_to=self._reply_listener.routing_key,
                correlation_id=correlation_id,
                headers=headers,
                declare=[self.exchange],
                on_failure=partial(self._request_failed, reply_event, service_name),
                **options,
            )
        except UndeliverableMessage:
            raise UnknownService(service_name) from None

    @staticmethod
    def _request_failed(
        reply_event: Any, service_name: str, error: BaseException
    ) -> None:
        if isinstance(error, ConnectionLost):
            # Wake the caller, who resends (from its own thread: in a plain,
            # unpatched program nothing else would run).
            error = RequestUnconfirmed(str(error))
        elif isinstance(error, UndeliverableMessage):
            error = UnknownService(service_name)
        reply_event.fail(error)


RESTRICTED_PUBLISHER_OPTIONS = (
    "exchange",
    "routing_key",
    "mandatory",
    "reply_to",
    "correlation_id",
    "timeout",
    "use_confirms",
    "uri",
)


class ClusterRpc(DependencyProvider, HeaderEncoder):
    """Injects a proxy to every service: ``self.rpc.<service>.<method>(...)``."""

    reply_listener = ReplyListener()
    publisher = ContainerPublisher()

    def __init__(self, timeout: float | None = None, **publisher_options: Any) -> None:
        self.timeout = timeout
        self.publisher_options = publisher_options

    def _client(self, worker_ctx: WorkerContext) -> RpcClient:
        return RpcClient(
            self.container.config,
            self.publisher.publish,
            self.reply_listener,
            partial(self.get_message_headers, worker_ctx),
            self.container.serializer,
            self.publisher_options,
        )

    def _timeout(self) -> float | None:
        return (
            self.timeout
            if self.timeout is not None
            else get_rpc_timeout(self.container.config)
        )

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        return ClusterProxy(self._client(worker_ctx), self._timeout())


class RpcProxy(ClusterRpc):
    """Injects a proxy to one service: ``self.greeter.hello(...)``."""

    def __init__(
        self,
        target_service: str,
        timeout: float | None = None,
        **publisher_options: Any,
    ) -> None:
        self.target_service = target_service
        super().__init__(timeout=timeout, **publisher_options)

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        return ServiceProxy(
            self._client(worker_ctx), self.target_service, self._timeout()
        )


ServiceRpc = RpcProxy
