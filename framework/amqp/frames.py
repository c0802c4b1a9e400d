"""Messages whose properties py-amqp cannot parse.

py-amqp parses a message's header table recursively, so a header nested a
thousand deep (which RabbitMQ accepts and routes) raises ``RecursionError`` in the
middle of reading frames, before any callback of ours runs. Its frame reader is
then left expecting the header frame it choked on, the body frame that follows
raises ``UnexpectedFrame``, the connection drops, the broker redelivers the
message, and the consumer meets it again: a loop no handler can break.

``FrameGuard`` sits in front of the connection's frame handler. When a content
header frame fails to parse, it hands the handler a stand-in header instead (the
same body size, no properties but a marker naming the error), so the frame
stream stays in step and the message reaches the consumer, body intact, which
dead-letters it (``MARKER_HEADER``). Other frames pass straight through.
"""

from __future__ import annotations

import logging
from struct import pack, unpack_from
from typing import Any

import amqp
import amqp.basic_message
import amqp.exceptions
import amqp.serialization
import amqp.spec

from framework.amqp.connection import CONNECTION_ERRORS

log = logging.getLogger(__name__)

#: Set (to the parse error's type name) on a message whose header could not be
#: parsed; it carries nothing else of its original properties.
MARKER_HEADER = "x-framework-unparsable-properties"

_CONTENT_HEADER = 2
_HEADER_PREFIX = ">HxxQ"  # class id, (weight), body size: py-amqp's own layout


class UnparsableProperties(Exception):
    """A delivered message's properties could not be parsed (see ``FrameGuard``)."""


class FrameGuard:
    def __init__(self, amqp_connection: Any) -> None:
        self._inner = amqp_connection.on_inbound_frame
        self.replaced = 0
        amqp_connection.on_inbound_frame = self.on_frame

    @classmethod
    def install(cls, amqp_connection: Any) -> FrameGuard:
        return cls(amqp_connection)

    def on_frame(self, frame: Any) -> Any:
        try:
            return self._inner(frame)
        except Exception as exc:
            frame_type, channel, buf = frame
            if frame_type != _CONTENT_HEADER or isinstance(exc, CONNECTION_ERRORS):
                raise
            stand_in = _stand_in_header(buf, type(exc).__name__)
            try:
                result = self._inner((frame_type, channel, stand_in))
            except Exception:
                # The error came from further on (the handler's state moved on
                # already): not ours to mend.
                raise exc from None
            self.replaced += 1
            log.error(
                "a message's properties could not be parsed; passing it on without them",
                extra={"channel": channel, "error_type": type(exc).__name__},
            )
            return result


def _stand_in_header(buf: Any, error: str) -> bytes:
    class_id, body_size = unpack_from(_HEADER_PREFIX, buf, 0)
    properties = amqp.basic_message.Message(
        application_headers={MARKER_HEADER: error}
    )._serialize_properties()
    return pack(_HEADER_PREFIX, class_id, body_size) + properties


#: The frame size RabbitMQ negotiates by default; a message's properties (its
#: headers included) must fit in one frame of it, or the broker closes the
#: connection (FRAME_ERROR).
DEFAULT_FRAME_MAX = 131072
# Frame header and end, the content header's class/weight/body size, and slack.
_HEADER_FRAME_OVERHEAD = 8 + 12 + 64
DROPPED_HEADERS_HEADER = "x-dropped-headers"


def properties_size(properties: dict[str, Any]) -> int:
    """Bytes ``properties`` take in a content header frame (raises if they cannot
    be encoded at all, e.g. a table too deep for py-amqp's recursive encoder)."""
    return len(amqp.basic_message.Message(**properties)._serialize_properties())


def fit_headers(
    headers: dict[str, Any],
    properties: dict[str, Any],
    protected: tuple[str, ...] = (),
    frame_max: int = DEFAULT_FRAME_MAX,
) -> dict[str, Any]:
    """``headers``, less what keeps them from being published with ``properties``.

    A message republished as received (dead-lettered, redelivered) gains headers
    of ours; one whose headers nearly filled a frame, or cannot be encoded again,
    would then fail to publish, and be retried forever, taking the publishing
    connection down each time. Such a message keeps its ``protected`` headers and
    as many others as fit, smallest first; the names of the dropped ones go in
    ``x-dropped-headers``.
    """
    limit = frame_max - _HEADER_FRAME_OVERHEAD
    try:
        if properties_size({**properties, "application_headers": headers}) <= limit:
            return headers
    except Exception:  # noqa: BLE001 - unencodable: handled below
        pass
    kept = {key: headers[key] for key in protected if key in headers}
    base: float = properties_size({**properties, "application_headers": kept}) + 1024
    sizes: dict[str, float] = {}
    for key, value in headers.items():
        if key in kept:
            continue
        try:
            sizes[key] = properties_size({"application_headers": {key: value}})
        except Exception:  # noqa: BLE001
            sizes[key] = float("inf")
    dropped: list[str] = []
    total = base
    for key in sorted(sizes, key=sizes.__getitem__):
        if total + sizes[key] <= limit:
            kept[key] = headers[key]
            total += sizes[key]
        else:
            dropped.append(str(key)[:100])
    kept[DROPPED_HEADERS_HEADER] = dropped[:20]
    log.warning(
        "headers dropped to republish a message",
        extra={"dropped_headers": dropped[:20], "count": len(dropped)},
    )
    return kept


# -- writing the frames of a publish and an ack ------------------------------------------
#
# py-amqp encodes every outgoing method through its general argument and property
# encoders (a format string walked value by value, a BytesIO per message), then
# packs the frames into a shared buffer. For the two methods every RPC sends, a
# publish and an ack, that was a sixth of a service's and a client's CPU in the
# profiles (bench/README.md, "Where the time goes"). These build the same bytes
# directly; tests check them against py-amqp's output.

_FRAME_HEADER = ">BHI"
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC_CLASS = 60
_PUBLISH_PREFIX = pack(">HHH", _BASIC_CLASS, 40, 0)  # basic.publish, ticket 0
_ACK_FRAME = ">BHIHHQB"  # a whole basic.ack frame but its end octet
_ACK_SIZE = 4 + 8 + 1

#: Each property's flag bit and type, in py-amqp's order (AMQP 0-9-1 basic class).
_PROPERTIES = tuple(
    (name, 1 << (15 - index), kind)
    for index, (name, kind) in enumerate(amqp.basic_message.Message.PROPERTIES)
)


def _shortstr(value: Any) -> bytes:
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return pack("B", len(raw)) + raw  # struct.error past 255 bytes, as py-amqp


def encode_properties(properties: dict[str, Any]) -> bytes:
    """A content header's property flags and list, as py-amqp would encode them."""
    flags = 0
    parts = [b""]
    for name, bit, kind in _PROPERTIES:
        value = properties.get(name)
        if value is None:
            continue
        if kind == "s" and isinstance(value, str | bytes) and value:
            parts.append(_shortstr(value))
        elif kind == "o" and type(value) is int:
            parts.append(pack("B", value))
        elif kind == "F" and isinstance(value, dict):
            parts.append(encode_table(value))
        else:  # anything unusual: py-amqp's own encoding, whatever it does
            return amqp.basic_message.Message(**properties)._serialize_properties()
        flags |= bit
    parts[0] = pack(">H", flags)
    return b"".join(parts)


class _Unusual(Exception):
    """A header value of a type left to py-amqp's encoder."""


def encode_table(table: dict[str, Any]) -> bytes:
    """A header table, as py-amqp encodes it (its own encoder for any value not
    of a plain JSON-like type: a subclass, a ``Decimal``, a ``datetime``...)."""
    if not table:
        return b"\x00\x00\x00\x00"  # what every reply carries
    try:
        return _table(table)
    except _Unusual:
        return bytes(amqp.serialization.dumps("F", [table]))


def _table(table: dict[Any, Any]) -> bytes:
    parts: list[bytes] = []
    for key, value in table.items():
        if type(key) is str:
            key = key.encode("utf-8", "surrogatepass")
        elif type(key) is not bytes:
            raise _Unusual
        parts += (pack("B", len(key)), key)
        _item(value, parts)
    data = b"".join(parts)
    return pack(">I", len(data)) + data


def _item(value: Any, parts: list[bytes]) -> None:
    kind = type(value)
    if kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        parts += (pack(">cI", b"S", len(raw)), raw)
    elif kind is bytes:
        parts += (pack(">cI", b"S", len(value)), value)
    elif value is None:
        parts.append(b"V")
    elif kind is bool:
        parts.append(b"t\x01" if value else b"t\x00")
    elif kind is int:
        if -2147483647 <= value <= 2147483647:
            parts.append(pack(">ci", b"I", value))
        else:
            parts.append(pack(">cq", b"L", value))
    elif kind is float:
        parts.append(pack(">cd", b"d", value))
    elif kind is dict:
        parts += (b"F", _table(value))
    elif kind is list or kind is tuple:
        items: list[bytes] = []
        for item in value:
            _item(item, items)
        data = b"".join(items)
        parts += (b"A", pack(">I", len(data)), data)
    else:
        raise _Unusual


def publish_frames(
    channel_id: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    body: bytes | str,
    frame_max: int,
) -> bytes:
    """The method, content header and body frames of a ``basic.publish``."""
    if isinstance(body, str):
        encoding = properties.get("content_encoding")
        if encoding is None:  # py-amqp sends the encoding it used
            encoding = "utf-8"
            properties = {**properties, "content_encoding": encoding}
        body = body.encode(encoding)
    method = b"".join(
        (
            _PUBLISH_PREFIX,
            _shortstr(exchange),
            _shortstr(routing_key),
            b"\x01" if mandatory else b"\x00",  # mandatory; immediate off
        )
    )
    header = pack(">HHQ", _BASIC_CLASS, 0, len(body)) + encode_properties(properties)
    parts = [
        pack(_FRAME_HEADER, _METHOD, channel_id, len(method)),
        method,
        _FRAME_END,
        pack(_FRAME_HEADER, _HEADER, channel_id, len(header)),
        header,
        _FRAME_END,
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += (pack(_FRAME_HEADER, _BODY, channel_id, len(piece)), piece, _FRAME_END)
    return b"".join(parts)


def ack_frame(channel_id: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """A ``basic.ack`` method frame."""
    return (
        pack(
            _ACK_FRAME,
            _METHOD,
            channel_id,
            _ACK_SIZE,
            _BASIC_CLASS,
            80,
            delivery_tag,
            1 if multiple else 0,
        )
        + _FRAME_END
    )


def send_publish(
    channel: Any,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    body: bytes | str,
) -> None:
    """``basic.publish`` on a py-amqp channel, without reading the connection.

    Through ``publish_frames`` when the connection's writes are coalesced (then a
    write only appends to a buffer and cannot interleave with another green
    thread's frames); through py-amqp's own writer otherwise.
    """
    connection = channel.connection
    if connection is None:
        raise amqp.exceptions.RecoverableConnectionError("connection already closed")
    transport = connection.transport
    if getattr(transport, "coalesced", False):
        transport.write(
            publish_frames(
                channel.channel_id,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
                connection.frame_max,
            )
        )
        connection.bytes_sent += 1  # as py-amqp's writer counts, for heartbeats
        return
    channel.send_method(
        amqp.spec.Basic.Publish,
        "Bssbb",
        (0, exchange, routing_key, mandatory, False),
        amqp.Message(body, **properties),
    )


def send_ack(channel: Any, delivery_tag: int) -> None:
    """``basic.ack`` of one delivery (see ``send_publish`` for the fast path)."""
    connection = channel.connection
    # Not every channel is py-amqp's: the in-memory transport's has no transport.
    transport: Any = getattr(connection, "transport", None)
    if getattr(transport, "coalesced", False):
        transport.write(ack_frame(channel.channel_id, delivery_tag))
        connection.bytes_sent += 1
        return
    channel.basic_ack(delivery_tag)


# -- deliveries ----------------------------------------------------------------------

_DELIVER = amqp.spec.Basic.Deliver


def parse_deliver(payload: bytes) -> tuple[str, int, bool, str, str]:
    """A ``basic.deliver`` method frame's arguments, as py-amqp's ``loads('sLbss')``
    reads them: consumer tag, delivery tag, redelivered, exchange, routing key."""
    size = payload[4]
    offset = 5 + size
    consumer_tag = payload[5:offset].decode("utf-8", "surrogatepass")
    delivery_tag, flags = unpack_from(">QB", payload, offset)
    offset += 9
    size = payload[offset]
    exchange = payload[offset + 1 : offset + 1 + size].decode("utf-8", "surrogatepass")
    offset += 1 + size
    size = payload[offset]
    routing_key = payload[offset + 1 : offset + 1 + size].decode(
        "utf-8", "surrogatepass"
    )
    return consumer_tag, delivery_tag, bool(flags & 1), exchange, routing_key


def speed_up_deliveries(channel: Any) -> None:
    """Hand ``channel``'s deliveries to its consumers without py-amqp's generic
    method dispatch (a listener list and a format-string argument parser per
    message); every other method, and a delivery someone waits for with
    ``channel.wait``, still goes through it."""
    generic = channel.dispatch_method

    def dispatch_method(method_sig: Any, payload: bytes, content: Any) -> Any:
        if (
            method_sig != _DELIVER
            or content is None
            or channel.is_closing
            or _DELIVER in channel._pending
        ):
            return generic(method_sig, payload, content)
        listener = channel._callbacks.get(_DELIVER)
        if listener is None:
            return generic(method_sig, payload, content)
        if channel.auto_decode and hasattr(content, "content_encoding"):
            try:  # as py-amqp's dispatch does
                content.body = content.body.decode(content.content_encoding)
            except Exception:  # noqa: BLE001, S110 - py-amqp keeps the bytes too
                pass
        listener(*parse_deliver(payload), content)
        return None

    channel.dispatch_method = dispatch_method
