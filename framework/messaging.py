"""Messaging building blocks: context headers, the shared queue consumer and
publisher, the ``Publisher`` dependency and the ``@consume`` entrypoint."""

from __future__ import annotations

import inspect
import logging
import traceback
import warnings
from functools import partial
from typing import Any

import kombu

from framework.amqp.connection import CONNECTION_ERRORS, close_quietly, make_connection
from framework.amqp.consume import ConsumeLoop, Delivery
from framework.amqp.frames import fit_headers
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
from framework.deadletters import BOOKKEEPING_HEADERS, SENSITIVE_ARGUMENTS_HEADER
from framework.exceptions import ContainerBeingKilled
from framework.extensions import (
    DependencyProvider,
    Entrypoint,
    ProviderCollector,
    SharedExtension,
)

log = logging.getLogger(__name__)

REDELIVERY_COUNT_HEADER = "x-redelivery-count"

# Redelivery backoff (keys of our own; see ``redelivery_delay``). The defaults
# spread the default 5 redeliveries over 2 + 4 + 8 + 16 + 32 = 62 seconds.
REDELIVERY_DELAY_CONFIG_KEY = "REDELIVERY_DELAY"
REDELIVERY_BACKOFF_CONFIG_KEY = "REDELIVERY_BACKOFF"
REDELIVERY_MAX_DELAY_CONFIG_KEY = "REDELIVERY_MAX_DELAY"
DEFAULT_REDELIVERY_DELAY = 2.0  # seconds before the first redelivery
DEFAULT_REDELIVERY_BACKOFF = 2.0  # each next delay is this many times the last
DEFAULT_REDELIVERY_MAX_DELAY = 300.0  # seconds

#: A message this process failed to dead-letter this many times is rejected; one
#: it failed to redeliver this many times is dead-lettered.
MAX_DEAD_LETTER_ATTEMPTS = 5
# Headers of ours a republished message must keep, whatever else it loses.
_BOOKKEEPING_HEADERS = (*BOOKKEEPING_HEADERS, "nameko.call_id_stack")
# Properties a republished message gets anew rather than copied.
_REPLACED_PROPERTIES = (
    "application_headers",
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    # Dropped: a dead letter must not expire (and ``publish_encoded`` takes
    # seconds where the property holds milliseconds), and RabbitMQ refuses a
    # ``user_id`` other than the publishing connection's user.
    "expiration",
    "user_id",
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
    downstream as ``nameko.x-death``. Context travels with every downstream call
    and into logs, so a value that is not a plain scalar (or a short list of
    them) or is oversized is dropped, and so is whatever exceeds
    ``MAX_CONTEXT_SIZE`` in all (downstream, it must still fit in a frame with
    headers of ours), each with a warning naming the key only: a malformed
    header costs its sender that value, never the message.
    """
    if not headers:
        return {}
    start = len(prefix) + 1
    context: dict[str, Any] = {}
    budget = MAX_CONTEXT_SIZE
    for key, value in headers.items():
        if not isinstance(key, str) or not key.startswith(prefix + "."):
            continue
        size = _context_value_size(value)
        if size is None or size + len(key) > budget:
            log.warning(
                "ignoring a malformed context header",
                extra={"header": key[:100], "value_type": type(value).__name__},
            )
            continue
        budget -= size + len(key)
        context[key[start:]] = value
    return context


#: Bounds of context carried in headers (see ``decode_from_headers``).
MAX_CONTEXT_VALUE_LENGTH = 4096  # characters of one string
MAX_CONTEXT_LIST_LENGTH = 256  # items of one list
MAX_CONTEXT_SIZE = 32768  # roughly bytes, every key and value together
_CONTEXT_SCALARS = (str, int, float, bool)


def _context_value_size(value: Any) -> int | None:
    """About how many bytes ``value`` takes, or None if it is no context value."""
    if value is None:
        return 1
    if isinstance(value, str):
        return len(value) if len(value) <= MAX_CONTEXT_VALUE_LENGTH else None
    if isinstance(value, _CONTEXT_SCALARS):
        return 8
    if isinstance(value, list | tuple) and len(value) <= MAX_CONTEXT_LIST_LENGTH:
        total = 0
        for item in value:
            if isinstance(item, list | tuple) or item is None:
                return None
            size = _context_value_size(item)
            if size is None:
                return None
            total += size
        return total
    return None


class HeaderEncoder:
    header_prefix = HEADER_PREFIX

    def get_message_headers(self, worker_ctx: WorkerContext) -> dict[str, Any]:
        """Context as headers; a ``None`` value is dropped, with a warning (as
        nameko's), since its key then does not reach downstream services."""
        context_data = worker_ctx.context_data
        if None in context_data.values():
            warnings.warn(
                "context values of None are not published as headers: "
                + ", ".join(sorted(k for k, v in context_data.items() if v is None)),
                UserWarning,
                stacklevel=2,
            )
        return encode_to_headers(context_data, self.header_prefix)


class HeaderDecoder:
    header_prefix = HEADER_PREFIX

    def unpack_message_headers(self, message: Delivery) -> dict[str, Any]:
        return decode_from_headers(message.headers, self.header_prefix)


# -- shared per-container extensions -----------------------------------------------------


class ContainerPublisher(SharedExtension):
    """The container's one confirm-mode publishing channel, shared by every
    publisher in it (replies, events, RPC requests, ``Publisher``)."""

    _publisher: AmqpPublisher | None = None

    @property
    def publisher(self) -> AmqpPublisher:
        """The publisher, made on first use as well as at setup: a provider bound
        and set up on its own (nameko's tests do so, with a mock container) has
        its shared extensions bound but not set up."""
        if self._publisher is None:
            self._publisher = AmqpPublisher(
                self.container.config,
                purpose=f"{self.container.service_name} publisher",
                service=self.container.service_name,
            )
        return self._publisher

    def setup(self) -> None:
        _ = self.publisher

    def publish(self, payload: Any, **options: Any) -> None:
        self.publisher.publish(payload, **options)

    def publish_encoded(self, body: bytes | str, **options: Any) -> None:
        self.publisher.publish_encoded(body, **options)

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

    Whatever one message does, it ends acked, redelivered later, dead-lettered or
    rejected, and the loop carries on: undecodable messages (any error while
    decoding, a ``RecursionError`` included) are dead-lettered at once; a message
    whose routing to its entrypoint raises, and a failed ``requeue_on_error``
    one, are redelivered with a growing delay at most ``MAX_REDELIVERIES`` times,
    then dead-lettered. Dead letters are published as received to the
    ``DEAD_LETTER_EXCHANGE`` (routing key = the source queue, into a durable
    ``<queue>.dead-letter`` queue) before the original is acked, so nothing is
    lost. Our queues keep nameko's exact arguments, which is why we republish
    rather than rely on a queue-level ``x-dead-letter-exchange``.
    """

    publisher = ContainerPublisher()

    _loop: ConsumeLoop | None = None
    _dead_letter_failures: dict[tuple[Any, ...], int] | None = None

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
                on_failed=self._on_failed,
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
        loop, so heartbeats and replies keep flowing. A graceful stop waits for
        it as for a worker.

        ``ContainerBeingKilled`` goes to the caller, which gives the message back
        its own way (RPC after a pause, see ``RpcConsumer.requeue_message``); on
        the waiting green thread the message is requeued.
        """
        if self.container.free_workers > 0:
            # Errors go to the caller: RPC answers them, the loop disposes of
            # the message (see ConsumeLoop._on_message).
            self._spawn(entrypoint, message, args, kwargs, context_data, handle_result)
        else:
            self.container.spawn_worker_related(
                self._spawn_when_free,
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
        self.container.spawn_worker(
            entrypoint,
            args,
            kwargs,
            context_data=context_data,
            handle_result=handle_result,
        )

    def _spawn_when_free(self, *spawn_args: Any) -> None:
        try:
            self._spawn(*spawn_args)
        except ContainerBeingKilled:
            spawn_args[1].requeue()
        except Exception as exc:
            # E.g. the service class's constructor failed. No caller to tell on
            # this thread: the message follows the redelivery policy.
            self._on_failed(spawn_args[1], exc)

    # -- messages that cannot be handled -----------------------------------------------

    def _describe(self, message: Delivery) -> dict[str, Any]:
        """What may be logged about a message: metadata, never its body."""
        return {
            "service": self.container.service_name,
            "queue": message.subscriber.queue.name,
            "routing_key": message.delivery_info.get("routing_key"),
            "size": len(message.body) if message.body is not None else 0,
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
        }

    def _on_undecodable(self, message: Delivery, exc: BaseException) -> None:
        # The type only: a codec's error text may quote the body (yaml does).
        reason = f"undecodable ({type(exc).__name__})"
        if message.subscriber.no_ack:
            # An RPC reply: already gone from the broker, and its caller will time
            # out; a dead-letter queue would outlive the reply queue it came from.
            log.error(
                "cannot decode a reply; dropped",
                extra={**self._describe(message), "reason": reason},
            )
            return
        log.error(
            "cannot decode a message",
            extra={**self._describe(message), "reason": reason},
        )
        self.container.spawn_worker_related(self.dead_letter, message, reason)

    def _on_failed(self, message: Delivery, exc: BaseException) -> None:
        """Routing ``message`` to its entrypoint raised: a bug, not a lost connection.

        Logged with the error's type and where it was raised, never its text (it
        may quote the message), then redelivered later or dead-lettered.
        """
        reason = f"{type(exc).__name__} while routing to the entrypoint"
        log.error(
            "error handling a message",
            extra={
                **self._describe(message),
                "error_type": type(exc).__name__,
                "stack": "".join(traceback.format_tb(exc.__traceback__)),
            },
        )
        if message.subscriber.no_ack:
            return
        self.container.spawn_worker_related(self.retry_or_dead_letter, message, reason)

    # -- dead letters ---------------------------------------------------------------

    def dead_letter(self, message: Delivery, reason: str) -> None:
        """Move ``message`` to the dead-letter queue of its source queue, then ack it.

        Without a dead-letter exchange it is rejected (dropped, unless an
        operator policy gives the queue a dead-letter exchange of its own), and
        only its metadata is logged.
        """
        queue_name = message.subscriber.queue.name
        if not self.dead_letter_exchange:
            log.error(
                "rejecting a message (no dead-letter exchange configured)",
                extra={**self._describe(message), "reason": reason},
            )
            message.reject()
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
        sensitive = self._sensitive_arguments(message)
        if sensitive is not None:
            headers[SENSITIVE_ARGUMENTS_HEADER] = sensitive
        try:
            self._republish(
                message,
                exchange,
                queue_name,
                headers,
                declare=[exchange, dlq],
                mandatory=True,
            )
        except Exception as exc:
            failures = self._count_failure(message, "dead-letter")
            if failures >= MAX_DEAD_LETTER_ATTEMPTS:
                # Something about this message keeps it from being published:
                # dropping it is better than bringing it back forever.
                log.error(
                    "could not dead-letter a message %d times; rejecting it",
                    failures,
                    extra={**self._describe(message), "error_type": type(exc).__name__},
                )
                message.reject()
                return
            # Given back to the broker (after a pause, not to spin) rather than lost.
            log.error(
                "could not dead-letter a message; requeueing it",
                extra={**self._describe(message), "error_type": type(exc).__name__},
            )
            message.requeue_later()
            return
        log.warning(
            "message dead-lettered",
            extra={
                **self._describe(message),
                "reason": reason,
                "dead_letter_queue": dlq.name,
            },
        )
        message.ack()

    def _count_failure(self, message: Delivery, what: str) -> int:
        """How many times this process failed to ``what`` (dead-letter,
        redeliver) ``message`` (by its queue, routing key and body), this time
        included."""
        if self._dead_letter_failures is None:
            self._dead_letter_failures = {}
        failures = self._dead_letter_failures
        key = (
            what,
            message.subscriber.queue.name,
            message.delivery_info.get("routing_key"),
            hash(message.body),
        )
        failures[key] = failures.pop(key, 0) + 1
        while len(failures) > 1000:  # bounded: forget the oldest
            del failures[next(iter(failures))]
        return failures[key]

    def _sensitive_arguments(self, message: Delivery) -> dict[str, Any] | None:
        """What ``framework dead-letters list`` needs to mask the entrypoint's
        ``sensitive_arguments`` in the body, or None when it has none."""
        entrypoint = self._entrypoint_of(message)
        paths = getattr(entrypoint, "sensitive_arguments", None)
        if not entrypoint or not paths:
            return None
        if isinstance(paths, str):
            paths = (paths,)
        try:
            method = getattr(entrypoint.container.service_cls, entrypoint.method_name)
            parameters = list(inspect.signature(method).parameters)[1:]  # not self
        except (AttributeError, TypeError, ValueError):
            parameters = []
        return {
            "paths": list(paths),
            "parameters": parameters,
            # An RPC body is {"args": [...], "kwargs": {...}}; others are the
            # method's one argument.
            "layout": "message" if message.subscriber is entrypoint else "rpc",
        }

    def _entrypoint_of(self, message: Delivery) -> Any:
        subscriber = message.subscriber
        if isinstance(subscriber, Entrypoint):
            return subscriber
        # A shared consumer (RPC): the entrypoint is named by the routing key.
        method_name = str(message.delivery_info.get("routing_key", "")).rsplit(".")[-1]
        for entrypoint in self.container.entrypoints:
            if entrypoint.method_name == method_name and any(
                value is subscriber for value in vars(entrypoint).values()
            ):
                return entrypoint
        return None

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
        headers = fit_headers(
            headers,
            {
                **properties,
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
            },
            protected=_BOOKKEEPING_HEADERS,
        )
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

    # -- redelivery -----------------------------------------------------------------

    def retry_or_dead_letter(self, message: Delivery, reason: str) -> None:
        """Redeliver a failed message later, at most ``MAX_REDELIVERIES`` times.

        The n-th redelivery waits ``redelivery_delay(n)``: the message is parked
        in a queue whose message TTL is that delay and which dead-letters back
        to the source queue, so a message whose dependency is down for a minute
        is not dead-lettered in a second, and nothing waits in this process (a
        restart loses nothing). A plain requeue would carry no count and loop
        forever on a poison message.
        """
        count = redelivery_count(message.headers)
        if count >= self.max_redeliveries:
            self.dead_letter(message, f"failed {count + 1} times: {reason}")
            return
        queue_name = message.subscriber.queue.name
        headers = {**message.headers, REDELIVERY_COUNT_HEADER: count + 1}
        delay = redelivery_delay(self.container.config, count + 1)
        try:
            if self.loop.emulated or delay <= 0:
                # kombu's in-memory broker has neither TTLs nor dead-lettering:
                # back to the tail of the queue at once.
                self._republish(message, "", queue_name, headers)
            else:
                parking = delay_queue(queue_name, delay)
                self._republish(message, "", parking.name, headers, redeclare=[parking])
        except Exception as exc:
            log.error(
                "could not re-publish a failed message",
                extra={**self._describe(message), "error_type": type(exc).__name__},
            )
            if self._count_failure(message, "redeliver") >= MAX_DEAD_LETTER_ATTEMPTS:
                # E.g. its parking queue cannot be declared: no more redeliveries.
                self.dead_letter(message, f"could not be redelivered: {reason}")
            else:
                message.requeue_later()
            return
        log.info(
            "message will be redelivered",
            extra={
                **self._describe(message),
                "reason": reason,
                "redelivery": count + 1,
                "delay_s": delay,
            },
        )
        message.ack()


def redelivery_count(headers: dict[str, Any]) -> int:
    """The ``x-redelivery-count`` of a message; anything but a count is 0."""
    value = headers.get(REDELIVERY_COUNT_HEADER, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


def redelivery_delay(config: dict[str, Any], redelivery: int) -> float:
    """Seconds before the ``redelivery``-th redelivery (1 for the first):
    ``REDELIVERY_DELAY * REDELIVERY_BACKOFF ** (n - 1)``, at most
    ``REDELIVERY_MAX_DELAY``."""
    first = float(config.get(REDELIVERY_DELAY_CONFIG_KEY, DEFAULT_REDELIVERY_DELAY))
    factor = float(
        config.get(REDELIVERY_BACKOFF_CONFIG_KEY, DEFAULT_REDELIVERY_BACKOFF)
    )
    ceiling = float(
        config.get(REDELIVERY_MAX_DELAY_CONFIG_KEY, DEFAULT_REDELIVERY_MAX_DELAY)
    )
    return max(0.0, min(first * factor ** max(redelivery - 1, 0), ceiling))


def delay_queue(queue_name: str, delay: float) -> kombu.Queue:
    """Where a message waits ``delay`` seconds before going back to ``queue_name``.

    One queue per source queue and delay (a queue's TTL applies at its head, so
    one TTL per queue keeps them in order). It expires once unused for the delay
    plus five minutes; it is redeclared with every message parked in it, which
    counts as use, so it never expires with a message inside.
    """
    ttl = max(int(delay * 1000), 1)
    return kombu.Queue(
        f"{queue_name}.redelivery-{ttl}ms",
        routing_key=f"{queue_name}.redelivery-{ttl}ms",
        durable=True,
        queue_arguments={
            "x-message-ttl": ttl,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue_name,
            "x-expires": ttl + 300_000,
        },
    )


# -- the Publisher dependency ------------------------------------------------------------


def declare_at_setup(config: dict[str, Any], entities: list[Any]) -> None:
    """Declare a publisher's exchange (and queue) when its container sets up.

    As nameko does: a service that binds a queue to the exchange, or a consumer
    started before anything was published, finds it there. The first publish
    declares again anyway, so a broker unreachable now only costs a warning; the
    container's own connections report it.
    """
    if not entities:
        return
    connection = make_connection(config)
    try:
        connection.connect()
        channel = connection.default_channel
        for entity in entities:
            entity.bind(channel).declare()
    except Exception as exc:
        log.warning(
            "could not declare %s at setup (%s); the first publish will",
            ", ".join(str(getattr(e, "name", e)) for e in entities),
            type(exc).__name__,
        )
    finally:
        close_quietly(connection)


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

    def setup(self) -> None:
        declare_at_setup(self.container.config, self.declare)

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
        context_headers = self.get_message_headers(worker_ctx)

        def publish(msg: Any, **kwargs: Any) -> None:
            options = self.publish_options(kwargs)
            options["headers"] = {**context_headers, **options["headers"]}
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
        try:
            self.queue_consumer.spawn_worker(
                self,
                message,
                (body,),
                {},
                context_data,
                partial(self.handle_result, message),
            )
        except ContainerBeingKilled:
            message.requeue()

    def handle_result(
        self, message: Delivery, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        if exc_info is not None and self.requeue_on_error:
            # An expected exception's message is part of the service's API; an
            # unexpected one's may quote anything (SQL parameters...).
            expected = self.expected_exceptions
            reason = exc_info[0].__name__
            if expected and isinstance(exc_info[1], expected):
                reason = f"{reason}: {exc_info[1]}"
            self.queue_consumer.retry_or_dead_letter(message, reason)
        else:
            message.ack()
        return result, exc_info


consume = Consumer.decorator
