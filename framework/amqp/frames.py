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

import amqp.basic_message

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
