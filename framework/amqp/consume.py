"""The consumer loop: one connection per container, owned by one green thread.

Only the loop's thread reads the connection (eventlet forbids two readers on a
socket), so every synchronous AMQP method (declare, qos, consume) runs there
too. Writes (acks, cancels) may come from any green thread: py-amqp serializes
frame writes with its own lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import kombu
import kombu.exceptions
import kombu.serialization

from framework import concurrency, serialization
from framework.amqp import channels
from framework.amqp.connection import (
    close_quietly,
    connect_with_retry,
    heartbeat_interval,
    is_connection_error,
    make_connection,
    read_frames,
    tune_transport,
)
from framework.amqp.frames import (
    MARKER_HEADER,
    FrameGuard,
    UnparsableProperties,
    send_ack,
    speed_up_deliveries,
)
from framework.amqp.heartbeat import HeartbeatGuard
from framework.utils import sanitize_url

log = logging.getLogger(__name__)

#: Called once per message delivered: ``observer(loop, queue_name)``.
#: ``framework.metrics`` counts messages here; observers must be cheap and not raise.
consume_observers: list[Callable[[ConsumeLoop, str], None]] = []

#: What a body that cannot be decoded raises; kept for callers that name them.
#: The loop itself catches every ``Exception`` from decoding: a JSON body nested
#: a thousand deep raises ``RecursionError``, a custom codec anything at all.
DECODE_ERRORS = (
    kombu.exceptions.ContentDisallowed,
    kombu.exceptions.DecodeError,
    ValueError,
    TypeError,
    UnicodeDecodeError,
    RecursionError,
)

#: ``on_failed(delivery, exc)``: the subscriber's ``handle_message`` raised.
FailureHandler = Callable[["Delivery", BaseException], None]


def _no_handler(delivery: Delivery, exc: BaseException) -> None:
    raise exc


class Subscriber(Protocol):
    """What the loop needs from an entrypoint that consumes a queue."""

    queue: kombu.Queue
    no_ack: bool
    prefetch_count: int

    def handle_message(self, body: Any, message: Delivery) -> None: ...


class Delivery:
    """One received message; kombu ``Message``-like for handler code."""

    __slots__ = (
        "body",
        "properties",
        "delivery_info",
        "delivery_tag",
        "loop",
        "generation",
        "settled",
        "subscriber",
    )

    def __init__(
        self, raw: Any, loop: ConsumeLoop, generation: int, subscriber: Any
    ) -> None:
        received = channels.parts(raw)
        self.body = received.body
        self.properties = received.properties
        self.delivery_info = received.delivery_info
        self.delivery_tag = received.delivery_tag
        self.loop = loop
        self.generation = generation
        self.settled = False
        self.subscriber = subscriber

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.get("application_headers") or {}

    @property
    def content_type(self) -> str | None:
        return self.properties.get("content_type")

    @property
    def content_encoding(self) -> str | None:
        return self.properties.get("content_encoding")

    def decode(self, accept: list[str] | None) -> Any:
        return serialization.loads(
            self.body, self.content_type, self.content_encoding, accept
        )

    @property
    def payload(self) -> Any:
        """The decoded body, as kombu's ``Message.payload``: only in the content
        types its consuming loop accepts (never pickle unless configured)."""
        return self.decode(self.loop.accept)

    def ack(self) -> None:
        self.loop.settle(self, "ack")

    def requeue(self) -> None:
        self.loop.settle(self, "requeue")

    def reject(self) -> None:
        self.loop.settle(self, "reject")

    def requeue_later(self, delay: float = 1.0) -> None:
        """Requeue after ``delay`` seconds: for failures that would otherwise loop hot."""
        concurrency.spawn_after(delay, self._requeue_quietly)

    def _requeue_quietly(self) -> None:
        # On a timer's green thread: an error would only be printed to stderr.
        try:
            self.requeue()
        except Exception as exc:
            log.error(
                "could not requeue a delivery",
                extra={"loop": self.loop.name, "error_type": type(exc).__name__},
            )


class ConsumeLoop:
    """Consumes every registered queue on one connection, reconnecting forever."""

    def __init__(
        self,
        config: dict[str, Any],
        accept: list[str],
        *,
        name: str,
        spawn: Callable[[Callable[[], Any], str], Any],
        on_undecodable: Callable[[Delivery, BaseException], None],
        on_failed: FailureHandler | None = None,
    ) -> None:
        self.config = config
        # kombu checks content types, while config speaks serializer names.
        self.accept = kombu.serialization.prepare_accept_content(accept)
        self.name = name
        self._spawn = spawn
        self._on_undecodable = on_undecodable
        self._on_failed = on_failed
        self._subscribers: dict[Any, str | None] = {}  # subscriber -> consumer tag
        self._pending_ops: list[Callable[[], None]] = []
        self._connection: kombu.Connection | None = None
        self._channel: Any = None
        self.generation = 0
        self._thread: Any = None
        self._stopping = False
        self._amqp = True
        self.ready = concurrency.Event()
        self.connected = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start consuming; returns once consumers are registered with the broker."""
        if self._thread is None:
            self._thread = self._spawn(self._run, f"{self.name}.consume_loop")
        self.ready.wait()

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            concurrency.kill(self._thread)
            self._thread = None
        self.connected = False
        close_quietly(self._connection)
        self._connection = None

    @property
    def emulated(self) -> bool:
        """Consuming from kombu's in-memory broker (no TTLs, no dead-lettering)."""
        return not self._amqp

    # -- subscribers -------------------------------------------------------------------

    def add(self, subscriber: Any) -> None:
        self._subscribers[subscriber] = None
        if self._channel is not None:
            self._pending_ops.append(lambda: self._consume(subscriber))

    def remove(self, subscriber: Any) -> None:
        """Stop deliveries to ``subscriber``; in-flight ones are requeued."""
        tag = self._subscribers.pop(subscriber, None)
        channel = self._channel
        if tag is not None and channel is not None and self.connected:
            try:
                channels.cancel(channel, tag, amqp=self._amqp)
            except Exception as exc:
                if not is_connection_error(exc, self._connection):
                    raise

    # -- settling ---------------------------------------------------------------------

    def settle(self, delivery: Delivery, how: str) -> None:
        if delivery.settled or delivery.subscriber.no_ack:
            return
        delivery.settled = True
        if delivery.generation != self.generation or not self.connected:
            # The channel it came on is gone; the broker has already requeued it.
            log.debug(
                "not settling a delivery from a closed connection",
                extra={"loop": self.name},
            )
            return
        try:
            if how == "ack":
                send_ack(self._channel, delivery.delivery_tag)
            else:
                self._channel.basic_reject(
                    delivery.delivery_tag, requeue=(how == "requeue")
                )
        except Exception as exc:
            if not is_connection_error(exc, self._connection):
                raise
            log.warning(
                "could not %s a delivery: %s", how, exc, extra={"loop": self.name}
            )

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        heartbeat = heartbeat_interval(self.config)
        tick = min(1.0, heartbeat / 4) if heartbeat else 1.0
        while not self._stopping:
            connection = make_connection(self.config, heartbeat=heartbeat)
            self._connection = connection
            guard: HeartbeatGuard | None = None
            try:
                connect_with_retry(
                    connection, self.config, purpose=f"{self.name} consumer"
                )
                self._amqp = channels.is_amqp(connection)
                if self._amqp:
                    guard = HeartbeatGuard.install(connection.connection, heartbeat)
                    tune_transport(connection.connection)
                    FrameGuard.install(connection.connection)
                self._channel = connection.channel()
                if self._amqp:
                    speed_up_deliveries(self._channel)
                self.generation += 1
                self.connected = True
                # Every queue and binding exists before the first consume, and
                # reply queues are consumed first: a request already waiting is
                # delivered at once, and its worker may call another service,
                # whose reply must find our reply queue bound (else the broker
                # drops it and the call waits forever).
                subscribers = sorted(self._subscribers, key=lambda s: not s.no_ack)
                for subscriber in subscribers:
                    subscriber.queue.bind(self._channel).declare()
                for subscriber in subscribers:
                    self._consume(subscriber, declared=True)
                if not self.ready.ready():
                    self.ready.send(None)
                log.info(
                    "consuming",
                    extra={
                        "loop": self.name,
                        "queues": [s.queue.name for s in self._subscribers],
                    },
                )
                next_heartbeat_check = 0.0
                amqp_connection = connection.connection if self._amqp else None
                while not self._stopping:
                    if amqp_connection is not None:
                        read_frames(amqp_connection, tick)
                    else:
                        try:
                            connection.drain_events(timeout=tick)
                        except TimeoutError:
                            pass
                    # py-amqp asks for a check at least twice per interval; doing
                    # it after every message only cost time under load.
                    if heartbeat and time.monotonic() >= next_heartbeat_check:
                        connection.heartbeat_check(rate=2)
                        next_heartbeat_check = time.monotonic() + tick
                    while self._pending_ops:
                        self._pending_ops.pop(0)()
            except Exception as exc:
                if not is_connection_error(exc, connection):
                    # Not a lost connection but a refusal, e.g. PRECONDITION_FAILED
                    # for a queue that exists with other arguments: fatal. start()
                    # is waiting on `ready`; fail it too, or it waits forever on a
                    # dead loop. (Errors of single messages never get here: see
                    # _on_message.)
                    if not self.ready.ready():
                        self.ready.send_exception(exc)
                    raise
                if self._stopping:
                    break
                log.warning(
                    "lost connection to broker at %s (%s); reconnecting",
                    sanitize_url(connection.as_uri()),
                    exc,
                    extra={"loop": self.name},
                )
            finally:
                self.connected = False
                self._channel = None
                if guard is not None:
                    guard.close()
                close_quietly(connection)

    def _consume(self, subscriber: Any, declared: bool = False) -> None:
        if subscriber not in self._subscribers:
            return
        channel = self._channel
        if not declared:
            subscriber.queue.bind(channel).declare()
        channels.qos(channel, subscriber.prefetch_count)
        generation = self.generation

        def on_message(raw: Any) -> None:
            self._on_message(subscriber, raw, generation)

        tag = channels.consume(
            channel, subscriber.queue.name, on_message, subscriber.no_ack
        )
        self._subscribers[subscriber] = tag

    def _on_message(self, subscriber: Any, raw: Any, generation: int) -> None:
        """Decode one message and hand it to its subscriber; never raises.

        This runs inside ``drain_events``: anything escaping it would end the
        loop (and the service), or pass for a lost connection, reconnect, and
        meet the same message again. So whatever one message does, it ends
        acked, dead-lettered or rejected here, and the loop carries on.
        """
        for observer in consume_observers:
            observer(self, subscriber.queue.name)
        delivery = Delivery(raw, self, generation, subscriber)
        if subscriber not in self._subscribers:
            # Delivered before our cancel reached the broker: give it back.
            delivery.requeue()
            return
        unparsable = delivery.headers.get(MARKER_HEADER)
        if unparsable is not None:
            # Its properties were lost to a parse error (see amqp.frames).
            exc = UnparsableProperties(str(unparsable)[:100])
            self._guarded(self._on_undecodable, delivery, exc)
            return
        try:
            body = delivery.decode(self.accept)
        except Exception as exc:
            self._guarded(self._on_undecodable, delivery, exc)
            return
        try:
            subscriber.handle_message(body, delivery)
        except Exception as exc:
            # Without a handler of its own, _guarded's last resort rejects it.
            self._guarded(self._on_failed or _no_handler, delivery, exc)

    def _guarded(
        self,
        handler: Callable[[Delivery, BaseException], None],
        delivery: Delivery,
        exc: BaseException,
    ) -> None:
        try:
            handler(delivery, exc)
        except Exception as failure:
            # The last resort: the message is dropped rather than left unacked
            # (holding a prefetch slot) or looping. Type names only: an
            # unexpected error's text may quote the message.
            log.error(
                "could not dispose of a bad message; rejecting it",
                extra={
                    "loop": self.name,
                    "queue": delivery.subscriber.queue.name,
                    "error_type": type(exc).__name__,
                    "handler_error_type": type(failure).__name__,
                },
            )
            delivery.reject()
