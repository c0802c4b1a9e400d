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
