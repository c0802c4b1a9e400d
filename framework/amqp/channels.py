"""What differs between a real AMQP channel and kombu's in-memory one.

Services talk to RabbitMQ through py-amqp. For unit tests and the one-process dev
mode they can run on kombu's ``memory://`` transport instead, whose channels
emulate a broker inside the process: no publisher confirms, no heartbeats, no
``mandatory`` returns, and messages shaped differently. Everything that depends on
which one we hold goes through this module.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import kombu

from framework.exceptions import UndeliverableMessage

# Properties kombu's virtual messages carry for their own bookkeeping.
_VIRTUAL_ONLY = ("body_encoding", "delivery_info", "delivery_tag")


def is_amqp(connection: kombu.Connection) -> bool:
    """A real broker connection (py-amqp), as opposed to an emulated one."""
    return connection.transport.driver_type == "amqp"


@dataclass(slots=True)
class Parts:
    """A received message, the same shape whichever transport brought it."""

    body: Any
    properties: dict[str, Any]  # py-amqp's names, headers in application_headers
    delivery_info: dict[str, Any]
    delivery_tag: Any


def parts(raw: Any) -> Parts:
    if isinstance(raw, kombu.message.Message):  # an in-memory delivery
        properties = {k: v for k, v in raw.properties.items() if k not in _VIRTUAL_ONLY}
        properties["content_type"] = raw.content_type
        properties["content_encoding"] = raw.content_encoding
        properties["application_headers"] = raw.headers or {}
        return Parts(raw.body, properties, dict(raw.delivery_info), raw.delivery_tag)
    return Parts(
        raw.body, raw.properties, raw.delivery_info, raw.delivery_info["delivery_tag"]
    )


def consume(channel: Any, queue: str, callback: Any, no_ack: bool) -> str:
    tag = uuid.uuid4().hex
    channel.basic_consume(
        queue=queue, no_ack=no_ack, callback=callback, consumer_tag=tag
    )
    return tag


def cancel(channel: Any, tag: str, amqp: bool) -> None:
    if amqp:
        # nowait: a synchronous cancel would read the connection from this green
        # thread while the consumer loop is reading it.
        channel.basic_cancel(tag, nowait=True)
    else:
        channel.basic_cancel(tag)


def qos(channel: Any, prefetch_count: int) -> None:
    channel.basic_qos(0, prefetch_count, False)


def publish_emulated(
    channel: Any,
    body: Any,
    properties: dict[str, Any],
    exchange: str,
    routing_key: str,
    mandatory: bool,
) -> None:
    """Publish on an in-memory channel (delivered at once: nothing to confirm)."""
    props = dict(properties)
    headers = props.pop("application_headers", None) or {}
    content_type = props.pop("content_type", None)
    content_encoding = props.pop("content_encoding", None)
    priority = props.pop("priority", 0)
    if mandatory and not _routable(channel, exchange, routing_key):
        raise UndeliverableMessage(
            f"no queue is bound to {exchange!r} for {routing_key!r}"
        )
    message = channel.prepare_message(
        body, priority, content_type, content_encoding, headers, props
    )
    channel.basic_publish(message, exchange, routing_key)


def _routable(channel: Any, exchange: str, routing_key: str) -> bool:
    if not exchange:
        return channel._has_queue(routing_key)
    try:
        table = channel.get_table(exchange)
    except KeyError:
        return False
    return bool(channel.typeof(exchange).lookup(table, exchange, routing_key, None))
