"""Messaging building blocks: context headers, the shared queue consumer and
publisher, the ``Publisher`` dependency and the ``@consume`` entrypoint."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import kombu

from framework import concurrency
from framework.amqp.connection import CONNECTION_ERRORS, close_quietly, make_connection
from framework.amqp.consume import ConsumeLoop, Delivery
from framework.amqp.publish import Publisher as AmqpPublisher
from framework.constants import (
    DEAD_LETTER_EXCHANGE_CONFIG_KEY,
    DEFAULT_DEAD_LETTER_EXCHANGE,
    DEFAULT_MAX_REDELIVERIES,
    HEADER_PREFIX,
    MAX_REDELIVERIES_CONFIG_KEY,
    PERSISTENT,
    PREFETCH_COUNT_CONFIG_KEY,
)
from framework.containers import WorkerContext
from framework.exceptions import ContainerBeingKilled
from framework.extensions import (
    DependencyProvider,
    Entrypoint,
    ProviderCollector,
    SharedExtension,
)

log = logging.getLogger(__name__)

REDELIVERY_COUNT_HEADER = "x-redelivery-count"
# Properties a republished message gets anew rather than copied.
_REPLACED_PROPERTIES = (
    "application_headers",
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
)


# -- context headers ------------------------------------------------------------------


def encode_to_headers(
    context_data: dict[str, Any], prefix: str = HEADER_PREFIX
) -> dict[str, Any]:
    """``nameko.<key>`` for every context value that is not ``None``."""
    return {
        f"{prefix}.{key}": value
        for key, value in context_data.items()
        if value is not None
    }


def decode_from_headers(
    headers: dict[str, Any] | None, prefix: str = HEADER_PREFIX
) -> dict[str, Any]:
    """Context data from message headers.

    Unlike nameko, only ``nameko.``-prefixed headers become context: broker
    headers such as ``x-death`` must not leak into context and be re-published
    downstream as ``nameko.x-death``.
    """
    if not headers:
        return {}
    start = len(prefix) + 1
    return {
        key[start:]: value
        for key, value in headers.items()
        if key.startswith(prefix + ".")
    }


class HeaderEncoder:
    header_prefix = HEADER_PREFIX

    def get_message_headers(self, worker_ctx: WorkerContext) -> dict[str, Any]:
        return encode_to_headers(worker_ctx.context_data, self.header_prefix)


class HeaderDecoder:
    header_prefix = HEADER_PREFIX

    def unpack_message_headers(self, message: Delivery) -> dict[str, Any]:
        return decode_from_headers(message.headers, self.header_prefix)


# -- shared per-container extensions -----------------------------------------------------


class ContainerPublisher(SharedExtension):
    """The container's one confirm-mode publishing channel, shared by every
    publisher in it (replies, events, RPC requests, ``Publisher``)."""

    publisher: AmqpPublisher

    def setup(self) -> None:
        self.publisher = AmqpPublisher(
            self.container.config,
            purpose=f"{self.container.service_name} publisher",
            service=self.container.service_name,
        )

    def publish(self, payload: Any, **options: Any) -> None:
        self.publisher.publish(payload, **options)

    def stop(self) -> None:
        self.publisher.close()

    def kill(self) -> None:
        self.publisher.close()

    def health_check(self) -> tuple[bool, str]:
        """Readiness (see ``framework.health``): could this container publish now?

        The publishing connection opens on the first publish and reopens on the
        next one after a loss, so while it is down we only ask whether the broker
        would take a connection, on a throwaway one: opening the publisher's own
        from the probe could race with a stop and leave it open.
        """
        if self.publisher.connection.connected:
            return True, "connected"
        probe = make_connection(self.container.config)
        try:
            probe.connect()
        except CONNECTION_ERRORS as exc:
            return False, f"broker unreachable: {exc}"
        finally:
            close_quietly(probe)
        return True, "broker reachable; connects on the next publish"


class QueueConsumer(SharedExtension, ProviderCollector):
    """Consumes every queue of the container on one connection.

    Undecodable messages and messages that keep failing are dead-lettered: published
    as received to the ``DEAD_LETTER_EXCHANGE`` (routing key = the source queue, into a
    durable ``<queue>.dead-letter`` queue) before the original is acked, so nothing is
    lost and nothing loops. Our queues keep nameko's exact arguments, which is why we
    republish rather than rely on a queue-level ``x-dead-letter-exchange``.
    """

    publisher = ContainerPublisher()

    _loop: ConsumeLoop | None = None

    @property
    def loop(self) -> ConsumeLoop:
        # Built on first use: setups run concurrently, so a provider may register
        # before this extension's own setup has run.
        if self._loop is None:
            self._loop = ConsumeLoop(
                self.container.config,
                self.container.accept,
                name=self.container.service_name,
                spawn=self.container.spawn_managed_thread,
                on_undecodable=self._on_undecodable,
            )
        return self._loop

    @property
    def dead_letter_exchange(self) -> str | None:
        return self.container.config.get(
            DEAD_LETTER_EXCHANGE_CONFIG_KEY, DEFAULT_DEAD_LETTER_EXCHANGE
        )

    @property
    def max_redeliveries(self) -> int:
        return int(
            self.container.config.get(
                MAX_REDELIVERIES_CONFIG_KEY, DEFAULT_MAX_REDELIVERIES
            )
        )

    @property
    def default_prefetch(self) -> int:
        return int(
            self.container.config.get(PREFETCH_COUNT_CONFIG_KEY)
            or self.container.max_workers
        )

    def start(self) -> None:
        self.loop.start()

    def register_provider(self, provider: Any) -> None:
        super().register_provider(provider)
        self.loop.add(provider)

    def unregister_provider(self, provider: Any) -> None:
        self.loop.remove(provider)
        super().unregister_provider(provider)

    def stop(self) -> None:
        self.wait_for_providers()
        self.loop.stop()

    def kill(self) -> None:
        self.loop.stop()

    @property
    def connected(self) -> bool:
        return self.loop.connected

    def health_check(self) -> tuple[bool, str]:
        """Readiness (see ``framework.health``): consumers registered, connection up."""
        if not self.loop.ready.ready():
            return False, "consumers not registered with the broker yet"
        if not self.connected:
            return False, "consumer connection down; reconnecting"
        return True, "consuming"

    # -- handing messages to workers without blocking the loop -----------------------

    def spawn_worker(
        self,
        entrypoint: Entrypoint,
        message: Delivery,
        args: tuple,
        kwargs: dict,
        context_data: dict,
        handle_result: Any,
    ) -> None:
        """Spawn a worker for ``message``; never blocks the consumer loop.

        With the pool full, a green thread waits for a free worker instead of the
        loop, so heartbeats and replies keep flowing.
        """
        if self.container.free_workers > 0:
            self._spawn(entrypoint, message, args, kwargs, context_data, handle_result)
        else:
            concurrency.spawn_n(
                self._spawn,
                entrypoint,
                message,
                args,
                kwargs,
                context_data,
                handle_result,
            )

    def _spawn(
        self,
        entrypoint: Entrypoint,
        message: Delivery,
        args: tuple,
        kwargs: dict,
        context_data: dict,
        handle_result: Any,
    ) -> None:
        try:
            self.container.spawn_worker(
                entrypoint,
                args,
                kwargs,
                context_data=context_data,
                handle_result=handle_result,
            )
        except ContainerBeingKilled:
            message.requeue()

    # -- dead letters ---------------------------------------------------------------

    def _on_undecodable(self, message: Delivery, exc: BaseException) -> None:
        if message.subscriber.no_ack:
            # An RPC reply: already gone from the broker, and its caller will time
            # out; a dead-letter queue would outlive the reply queue it came from.
            log.error(
                "cannot decode a reply; dropped",
                extra={"service": self.container.service_name, "error": str(exc)},
            )
            return
        log.error(
            "cannot decode message: %s",
            exc,
            extra={
                "service": self.container.service_name,
                "queue": message.subscriber.queue.name,
                "content_type": message.content_type,
            },
        )
        concurrency.spawn_n(self.dead_letter, message, f"undecodable: {exc}")

    def dead_letter(self, message: Delivery, reason: str) -> None:
        """Move ``message`` to the dead-letter queue of its source queue, then ack it."""
        queue_name = message.subscriber.queue.name
        if not self.dead_letter_exchange:
            log.error(
                "dropping message (no dead-letter exchange configured)",
                extra={
                    "queue": queue_name,
                    "reason": reason,
                    "body": message.body[:1000],
                },
            )
            message.ack()
            return
        exchange = kombu.Exchange(self.dead_letter_exchange, type="topic", durable=True)
        dlq = kombu.Queue(
            f"{queue_name}.dead-letter",
            exchange=exchange,
            routing_key=queue_name,
            durable=True,
        )
        headers = {
            **message.headers,
            "x-dead-letter-reason": reason[:1000],
            "x-original-exchange": message.delivery_info.get("exchange", ""),
            "x-original-routing-key": message.delivery_info.get("routing_key", ""),
            "x-original-queue": queue_name,
        }
        try:
            self._republish(
                message,
                exchange,
                queue_name,
                headers,
                declare=[exchange, dlq],
                mandatory=True,
            )
        except Exception:
            # Given back to the broker (after a pause, not to spin) rather than lost.
            log.exception(
                "could not dead-letter a message; requeueing it",
                extra={"queue": queue_name},
            )
            message.requeue_later()
            return
        log.warning(
            "message dead-lettered",
            extra={
                "queue": queue_name,
                "reason": reason,
                "dead_letter_queue": dlq.name,
            },
        )
        message.ack()

    def _republish(
        self,
        message: Delivery,
        exchange: Any,
        routing_key: str,
        headers: dict[str, Any],
        **options: Any,
    ) -> None:
        """Publish ``message`` as received (body, properties), with new headers."""
        properties = {
            k: v for k, v in message.properties.items() if k not in _REPLACED_PROPERTIES
        }
        self.publisher.publisher.publish_encoded(
            message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            delivery_mode=message.properties.get("delivery_mode", PERSISTENT),
            **options,
            **properties,
        )

    def retry_or_dead_letter(self, message: Delivery, reason: str) -> None:
        """Redeliver a failed message, at most ``MAX_REDELIVERIES`` times.

        Re-published to the tail of its own queue with a count in its headers, since a
        plain requeue carries no count and would loop forever on a poison message.
        """
        count = int(message.headers.get(REDELIVERY_COUNT_HEADER, 0))
        if count >= self.max_redeliveries:
            self.dead_letter(message, f"failed {count + 1} times: {reason}")
            return
        headers = {**message.headers, REDELIVERY_COUNT_HEADER: count + 1}
        try:
            self._republish(message, "", message.subscriber.queue.name, headers)
        except Exception:
            log.exception("could not re-publish a failed message; requeueing it")
            message.requeue()
            return
        message.ack()


# -- the Publisher dependency ------------------------------------------------------------


class Publisher(DependencyProvider, HeaderEncoder):
    """Injects ``publish(msg, **kwargs)`` publishing to ``exchange`` with context headers."""

    container_publisher = ContainerPublisher()

    def __init__(
        self,
        exchange: kombu.Exchange | None = None,
        queue: kombu.Queue | None = None,
        declare: list[Any] | None = None,
        **options: Any,
    ) -> None:
        self.exchange = exchange
        self.queue = queue
        self.declare = list(declare or [])
        self.options = options
        if exchange is not None:
            self.declare.append(exchange)
        if queue is not None:
            self.declare.append(queue)
            if exchange is None:
                self.exchange = queue.exchange

    def publish_options(self, call_options: dict[str, Any]) -> dict[str, Any]:
        options = {
            "serializer": self.container.serializer,
            **self.options,
            **call_options,
        }
        options.pop("use_confirms", None)
        options.pop("uri", None)
        extra = options.pop("extra_headers", None) or {}
        return {
            **options,
            "headers": {
                **(self.options.get("headers") or {}),
                **(call_options.get("headers") or {}),
                **extra,
            },
        }

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        def publish(msg: Any, **kwargs: Any) -> None:
            options = self.publish_options(kwargs)
            options["headers"] = {
                **self.get_message_headers(worker_ctx),
                **options["headers"],
            }
            options.setdefault("exchange", self.exchange or "")
            options.setdefault("declare", self.declare)
            self.container_publisher.publish(msg, **options)

        return publish


# -- the @consume entrypoint -------------------------------------------------------------


class Consumer(Entrypoint, HeaderDecoder):
    """Runs the decorated method with the body of every message on ``queue``."""

    queue_consumer = QueueConsumer()
    no_ack = False

    def __init__(
        self,
        queue: kombu.Queue,
        requeue_on_error: bool = False,
        prefetch_count: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.queue = queue
        self.requeue_on_error = requeue_on_error
        self._prefetch_count = prefetch_count
        super().__init__(**kwargs)

    @property
    def prefetch_count(self) -> int:
        return self._prefetch_count or self.queue_consumer.default_prefetch

    def setup(self) -> None:
        self.queue_consumer.register_provider(self)

    def stop(self) -> None:
        self.queue_consumer.unregister_provider(self)

    def handle_message(self, body: Any, message: Delivery) -> None:
        context_data = self.unpack_message_headers(message)
        self.queue_consumer.spawn_worker(
            self,
            message,
            (body,),
            {},
            context_data,
            partial(self.handle_result, message),
        )

    def handle_result(
        self, message: Delivery, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        if exc_info is not None and self.requeue_on_error:
            self.queue_consumer.retry_or_dead_letter(
                message, f"{exc_info[0].__name__}: {exc_info[1]}"
            )
        else:
            message.ack()
        return result, exc_info


consume = Consumer.decorator
