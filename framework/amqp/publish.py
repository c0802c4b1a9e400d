"""Publishing with publisher confirms, handled asynchronously.

Every publish is confirmed by the broker before ``publish`` returns, as nameko
does, but confirms are matched by delivery tag instead of waiting for each in
turn on a private connection: many green threads publish on one channel and
their confirms arrive batched (``multiple=True``). That is most of the gap
between nameko's throughput and the broker's.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import amqp
import amqp.exceptions
import kombu
import kombu.compression
import kombu.pools
import kombu.serialization
from amqp import spec

from framework import concurrency, serialization
from framework.amqp import channels, frames
from framework.amqp.connection import (
    ConnectionLost,
    DrainedConnection,
    Waiter,
    is_connection_error,
)
from framework.constants import (
    AMQP_SSL_CONFIG_KEY,
    DEFAULT_PUBLISH_CONFIRM_TIMEOUT,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TRANSPORT_OPTIONS,
    LOGIN_METHOD_CONFIG_KEY,
    PERSISTENT,
    PUBLISH_CONFIRM_TIMEOUT_CONFIG_KEY,
)
from framework.exceptions import PublishConfirmFailed, UndeliverableMessage

log = logging.getLogger(__name__)


#: Called once per message the broker took: ``observer(publisher, exchange_name)``.
#: ``framework.metrics`` counts messages here; observers must be cheap and not raise.
publish_observers: list[Callable[[Publisher, str], None]] = []


class _Confirm(Waiter):
    """A publish waiting for the broker's ack (or nack, or return)."""

    __slots__ = ("correlation_id", "mandatory", "returned", "on_failure")

    def __init__(
        self,
        correlation_id: str | None,
        mandatory: bool,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__()
        self.correlation_id = correlation_id
        self.mandatory = mandatory
        self.returned: BaseException | None = None
        self.on_failure = on_failure

    def settle(self, error: BaseException | None) -> None:
        if self.ready():
            return
        self.set(error=error)
        if error is not None and self.on_failure is not None:
            self.on_failure(error)


class _PublishDefault:
    """A publish option's default, read and set as an attribute (nameko's
    ``publisher.mandatory = True``, ``publisher.retry_policy``)."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.defaults.get(self.name, self.fallback)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.defaults[self.name] = value


class Publisher:
    """Publishes messages on one confirm-mode channel shared by many green threads.

    Also constructible as nameko's ``Publisher(amqp_uri, serializer=..., ...)``: a
    URI instead of a config, and publish options given to the constructor are the
    defaults of every ``publish`` (``ssl`` and ``login_method`` configure the
    connection); they read and set as attributes too (``publisher.mandatory``).
    Headers merge: the constructor's, then the call's ``headers``, then its
    ``extra_headers``; ``declare`` lists add up the same way.
    """

    mandatory = _PublishDefault(False)
    retry = _PublishDefault(True)
    retry_policy = _PublishDefault(DEFAULT_RETRY_POLICY)
    delivery_mode = _PublishDefault(PERSISTENT)
    priority = _PublishDefault(0)
    expiration = _PublishDefault(None)
    serializer = _PublishDefault("json")
    compression = _PublishDefault(None)

    def __init__(
        self,
        config: dict[str, Any] | str,
        *,
        uri: str | None = None,
        connection: DrainedConnection | None = None,
        use_confirms: bool | None = True,
        purpose: str = "publish",
        service: str | None = None,
        ssl: Any = None,
        login_method: str | None = None,
        **defaults: Any,
    ) -> None:
        if isinstance(config, str):  # nameko's Publisher(amqp_uri, ...)
            uri = uri or config
            config = {}
        if ssl is not None or login_method is not None:
            config = {
                **config,
                AMQP_SSL_CONFIG_KEY: ssl,
                LOGIN_METHOD_CONFIG_KEY: login_method,
            }
        # None means "the default", as in nameko's constructor.
        self.defaults = {k: v for k, v in defaults.items() if v is not None}
        use_confirms = True if use_confirms is None else use_confirms
        self.config = config
        self.service = service  # the publishing service, for metrics; None outside one
        self.use_confirms = use_confirms
        self.confirm_timeout = float(
            config.get(
                PUBLISH_CONFIRM_TIMEOUT_CONFIG_KEY, DEFAULT_PUBLISH_CONFIRM_TIMEOUT
            )
        )
        self.connection = connection or DrainedConnection(
            config, uri=uri, purpose=purpose
        )
        self.connection.on_connect(self._open_channel)
        self.connection.on_lost(self._fail_pending)
        self._channel: Any = None
        self._declared: set[Any] = set()
        self._publish_lock = concurrency.Semaphore(1)
        self._next_tag = 1
        self._pending: dict[int, _Confirm] = {}
        self._emulated = False

    # -- connection --------------------------------------------------------------

    def _open_channel(self, connection: kombu.Connection) -> None:
        self._fail_pending(ConnectionLost("connection lost before the confirm"))
        self._declared = set()
        channel = connection.channel()
        self._emulated = not channels.is_amqp(connection)
        if self._emulated:
            # An in-memory broker delivers (or refuses) at once: nothing to confirm.
            self._channel = channel
            return
        if self.use_confirms:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        channel._callbacks[spec.Channel.Close] = partial(
            self._on_channel_close, channel
        )
        self._channel = channel
        self._next_tag = 1

    def _on_channel_close(
        self,
        channel: Any,
        reply_code: int,
        reply_text: str,
        class_id: int,
        method_id: int,
    ) -> None:
        """The broker closed the channel because of a message it refused (a
        ``user_id`` that is not the connection's user, an exchange that does not
        exist): that publish raises the broker's error (``PreconditionFailed``,
        ``NotFound``...), not a lost connection that a retry would repeat.

        py-amqp would reopen the channel in place, outside confirm mode and while
        the reader thread owns the socket; instead the connection is dropped, and
        the next publish opens a fresh one. The broker does not say which message
        it refused: the oldest unconfirmed one takes the error (with one publisher
        at a time, the one just sent), the others fail as lost and are sent again.
        """
        channel.send_method(spec.Channel.CloseOk)
        error = amqp.exceptions.error_for_code(
            reply_code,
            reply_text,
            (class_id, method_id),
            amqp.exceptions.ChannelError,
        )
        log.warning(
            "the broker closed the publishing channel",
            extra={"reply_code": reply_code, "reply_text": reply_text},
        )
        pending, self._pending = self._pending, {}
        lost = ConnectionLost(f"the broker closed the channel: {reply_text}")
        for number, tag in enumerate(sorted(pending)):
            pending[tag].settle(error if number == 0 else lost)
        # A connection error, so that whoever drains the connection drops it.
        raise lost from error

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for confirm in pending.values():
            confirm.settle(error)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._resolve(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._resolve(
            delivery_tag,
            multiple,
            PublishConfirmFailed("the broker nacked the message"),
        )

    def _resolve(
        self, delivery_tag: int, multiple: bool, error: BaseException | None
    ) -> None:
        tags = (
            [t for t in self._pending if t <= delivery_tag]
            if multiple
            else [delivery_tag]
        )
        for tag in tags:
            confirm = self._pending.pop(tag, None)
            if confirm is not None:
                confirm.settle(confirm.returned or error)

    def _on_return(
        self, exc: Exception, exchange: str, routing_key: str, message: Any
    ) -> None:
        # RabbitMQ sends basic.return before the basic.ack of the same message, so
        # marking the pending confirm here makes the ack resolve it as undeliverable.
        correlation_id = message.properties.get("correlation_id")
        error = UndeliverableMessage(
            f"no queue is bound to {exchange!r} for {routing_key!r}"
        )
        candidates = [
            c for c in self._pending.values() if c.mandatory and c.returned is None
        ]
        match = next(
            (
                c
                for c in candidates
                if correlation_id and c.correlation_id == correlation_id
            ),
            None,
        )
        if match is None and candidates:
            match = candidates[0]
        if match is not None:
            match.returned = error

    # -- publishing ----------------------------------------------------------------

    def publish(self, payload: Any, **options: Any) -> None:
        """Serialize ``payload`` and publish it; options as for ``publish_encoded``.

        With confirms, returns once the broker has taken the message. Raises
        ``UndeliverableMessage`` for a mandatory message nothing is bound to route,
        and ``PublishConfirmFailed`` when the broker refuses it or does not confirm
        it in time; a publish is never lost silently.
        """
        if self.defaults or "extra_headers" in options:
            options = self._with_defaults(options)
        if options.get("content_type") is not None:
            self._publish_raw(payload, options)
            return
        serializer = options.pop("serializer", None) or "json"
        content_type, content_encoding, body = serialization.dumps(payload, serializer)
        self.publish_encoded(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            **options,
        )

    def _publish_raw(self, body: Any, options: dict[str, Any]) -> None:
        """A body with an explicit ``content_type`` is sent as given (kombu's and
        so nameko's rule): a ``str`` encoded with ``content_encoding`` (UTF-8 if
        none), ``bytes`` as they are (``binary`` if no encoding is named)."""
        options.pop("serializer", None)
        content_type = options.pop("content_type")
        content_encoding = options.pop("content_encoding", None)
        if isinstance(body, str):
            content_encoding = content_encoding or "utf-8"
            body = body.encode(content_encoding)
        elif isinstance(body, bytes | bytearray | memoryview):
            content_encoding = content_encoding or "binary"
            body = bytes(body)
        else:
            raise TypeError(
                f"a body published with content_type={content_type!r} must be str "
                f"or bytes, not {type(body).__name__}; leave content_type out to "
                "serialize it"
            )
        self.publish_encoded(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            **options,
        )

    def _with_defaults(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.defaults, **options}
        headers = {
            **(self.defaults.get("headers") or {}),
            **(options.get("headers") or {}),
            **(merged.pop("extra_headers", None) or {}),
        }
        if headers:
            merged["headers"] = headers
        if self.defaults.get("declare") and options.get("declare"):
            merged["declare"] = [*self.defaults["declare"], *options["declare"]]
        return merged

    def publish_encoded(
        self,
        body: bytes | str,
        *,
        content_type: str | None,
        content_encoding: str | None,
        exchange: str | kombu.Exchange = "",
        routing_key: str = "",
        mandatory: bool = False,
        delivery_mode: int = PERSISTENT,
        priority: int = 0,
        expiration: float | None = None,
        headers: dict[str, Any] | None = None,
        declare: Iterable[Any] = (),
        redeclare: Iterable[Any] = (),
        retry: bool = True,
        retry_policy: dict[str, Any] | None = None,
        timeout: float | None = None,
        compression: str | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        use_confirms: bool | None = None,
        **properties: Any,
    ) -> None:
        """Publish an already serialized body (e.g. when dead-lettering as received).

        With ``on_failure``, return once the message is written, without waiting
        for its confirm; should the broker refuse it, return it (``mandatory``) or
        the connection fail before it confirms, ``on_failure(error)`` is called.
        RPC requests use it: their reply is a better confirm than the confirm.

        ``declare`` is declared once per connection; ``redeclare`` before every
        publish (a queue with ``x-expires`` must be used to stay alive, and
        publishing to it does not count).

        ``use_confirms=False`` returns as soon as the message is written, as
        nameko's does: nothing reports a refused or unroutable message then, so a
        ``mandatory`` one warns (``UserWarning``) and is sent as not mandatory.
        """
        confirmed = self.use_confirms and use_confirms is not False
        if mandatory and not confirmed:
            warnings.warn(
                "mandatory delivery needs publisher confirms: without them an "
                "unroutable message is dropped and nothing raises",
                UserWarning,
                stacklevel=2,
            )
            mandatory = False
        if not confirmed and on_failure is None:
            on_failure = _ignore_failure
        if compression:
            body, compressed_type = kombu.compression.compress(body, compression)
            headers = {**(headers or {}), "compression": compressed_type}
        # None is the default exchange, as in kombu (nameko's tests pass it).
        exchange_name = (
            exchange.name if isinstance(exchange, kombu.Exchange) else exchange or ""
        )
        message_properties = {
            "content_type": content_type,
            "content_encoding": content_encoding,
            "delivery_mode": delivery_mode,
            "priority": priority,
            "application_headers": headers or {},
        }
        if expiration is not None:
            # kombu's convention, which nameko inherits: seconds, sent as ms.
            message_properties["expiration"] = str(int(float(expiration) * 1000))
        message_properties.update(
            {k: v for k, v in properties.items() if v is not None}
        )
        policy = {**DEFAULT_RETRY_POLICY, **(retry_policy or {})}
        attempts = 1 + (int(policy["max_retries"]) if retry else 0)
        interval = float(policy["interval_start"])
        for attempt in range(1, attempts + 1):
            generation = self.connection.generation
            try:
                self._publish_once(
                    body,
                    message_properties,
                    exchange_name,
                    routing_key,
                    mandatory,
                    declare,
                    timeout,
                    on_failure,
                    redeclare,
                )
            except Exception as exc:
                if not is_connection_error(exc, self.connection.connection):
                    raise
                self.connection.reset(generation)
                if attempt == attempts:
                    raise
                log.warning(
                    "publish failed (%s); retrying in %.1fs",
                    exc,
                    interval,
                    extra={
                        "exchange": exchange_name,
                        "routing_key": routing_key,
                        "attempt": attempt,
                    },
                )
                concurrency.sleep(interval)
                interval = min(
                    interval + float(policy["interval_step"]),
                    float(policy["interval_max"]),
                )
            else:
                for observer in publish_observers:
                    observer(self, exchange_name)
                return

    def _publish_once(
        self,
        body: bytes | str,
        message_properties: dict[str, Any],
        exchange: str,
        routing_key: str,
        mandatory: bool,
        declare: Iterable[Any],
        timeout: float | None,
        on_failure: Callable[[BaseException], None] | None = None,
        redeclare: Iterable[Any] = (),
    ) -> None:
        self.connection.ensure_connected()
        self._declare(declare)
        for entity in redeclare:
            self._declared.discard(_entity_key(entity))
        self._declare(redeclare)
        if self._emulated:
            with self._publish_lock:
                channels.publish_emulated(
                    self._channel,
                    body,
                    message_properties,
                    exchange,
                    routing_key,
                    mandatory,
                )
            return
        confirm = _Confirm(
            message_properties.get("correlation_id"), mandatory, on_failure
        )
        with self._publish_lock:
            channel = self._channel
            if self.use_confirms:
                tag = self._next_tag
                self._next_tag += 1
                self._pending[tag] = confirm
            # Not channel.basic_publish: py-amqp's reads the connection there (to
            # catch connection.blocked), which would race the green thread that
            # is draining it and corrupt its read buffer. Blocked notifications
            # still arrive through the normal drain. The frames are built here, not
            # by py-amqp's general encoder (see amqp.frames).
            try:
                frames.send_publish(
                    channel, exchange, routing_key, mandatory, message_properties, body
                )
            except Exception as exc:
                if self.use_confirms and not is_connection_error(
                    exc, self.connection.connection
                ):
                    # Refused before a byte was written (py-amqp encodes the
                    # properties first: a header it cannot encode): the broker
                    # never counted it, so neither do we, or every later confirm
                    # would be matched to the message before it.
                    del self._pending[tag]
                    self._next_tag -= 1
                raise
        if not self.use_confirms or on_failure is not None:
            return
        deadline = concurrency.Deadline(
            timeout if timeout is not None else self.confirm_timeout
        )
        try:
            settled = self.connection.wait_for(confirm, deadline)
        except ConnectionLost:
            # Without a reader thread, this thread may have read the broker
            # closing the channel over this very message (``_on_channel_close``).
            if isinstance(confirm.error, amqp.exceptions.ChannelError):
                self.connection.reset(self.connection.generation)
                raise confirm.error from None
            raise
        if not settled:
            self._pending.pop(tag, None)
            raise PublishConfirmFailed(
                f"the broker did not confirm a message to {exchange!r}/{routing_key!r} "
                f"within {deadline.timeout}s"
            )
        if confirm.error is not None:
            raise confirm.error

    def _declare(self, entities: Iterable[Any]) -> None:
        for entity in entities:
            key = _entity_key(entity)
            if key in self._declared:
                continue
            if self.connection.has_reader:
                # The reader thread owns every read: declare without waiting for
                # the broker's reply (a refusal closes the channel, which surfaces
                # as a failed publish).
                entity.bind(self._channel).declare(nowait=True)
            else:
                with self.connection.drain_lock:
                    entity.bind(self._channel).declare()
            self._declared.add(key)

    def close(self) -> None:
        self.connection.close()


def _ignore_failure(error: BaseException) -> None:
    """``on_failure`` of a publish whose caller asked for no confirm."""


def _entity_key(entity: Any) -> Any:
    if isinstance(entity, kombu.Queue):
        return (
            "queue",
            entity.name,
            entity.routing_key,
            entity.exchange.name if entity.exchange else None,
        )
    return ("exchange", entity.name)


# -- nameko's module-level helpers -------------------------------------------------------


@contextlib.contextmanager
def get_connection(
    amqp_uri: str,
    ssl: Any = None,
    login_method: str | None = None,
    transport_options: dict[str, Any] | None = None,
) -> Iterator[kombu.Connection]:
    """A pooled kombu connection to ``amqp_uri`` (nameko's ``get_connection``).

    For code that publishes or inspects the broker with kombu directly; services
    publish through ``Publisher`` instead.
    """
    connection = kombu.Connection(
        amqp_uri,
        transport_options=dict(transport_options or DEFAULT_TRANSPORT_OPTIONS),
        ssl=ssl,
        login_method=login_method,
    )
    with kombu.pools.connections[connection].acquire(block=True) as acquired:
        yield acquired


@contextlib.contextmanager
def get_producer(
    amqp_uri: str,
    confirms: bool = True,
    ssl: Any = None,
    login_method: str | None = None,
    transport_options: dict[str, Any] | None = None,
) -> Iterator[kombu.Producer]:
    """A pooled kombu producer on ``amqp_uri``, in confirm mode unless ``confirms``
    is false (nameko's ``get_producer``): ``producer.publish`` then returns once the
    broker has taken the message."""
    options = dict(transport_options or DEFAULT_TRANSPORT_OPTIONS)
    options["confirm_publish"] = confirms
    connection = kombu.Connection(
        amqp_uri, transport_options=options, ssl=ssl, login_method=login_method
    )
    with kombu.pools.producers[connection].acquire(block=True) as producer:
        yield producer
