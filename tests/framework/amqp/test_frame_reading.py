"""read_frames: every frame that has arrived, handed to py-amqp's frame handler
(a socket pair stands in for the broker)."""

from __future__ import annotations

import socket
from struct import pack
from typing import Any

import amqp.exceptions
import amqp.transport
import pytest
from amqp import spec
from amqp.serialization import dumps, loads

from framework import concurrency
from framework.amqp.connection import read_frames
from framework.amqp.frames import ack_frame, parse_deliver, speed_up_deliveries


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


class _Connection:
    """What read_frames uses of a py-amqp connection."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.frames: list[tuple[int, int, bytes]] = []

    def on_inbound_frame(self, received: tuple[int, int, bytes]) -> None:
        self.frames.append(received)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    transport = amqp.transport.TCPTransport("127.0.0.1:1")
    transport.sock = ours
    transport._setup_transport()
    transport.connected = True
    yield _Connection(transport), theirs
    ours.close()
    theirs.close()


def test_every_whole_frame_that_arrived_is_handled_in_order(pair):
    connection, broker = pair
    frames = [frame(1, 1, b"method"), frame(2, 1, b"header"), frame(3, 1, b"body")]
    broker.sendall(b"".join(frames) + frames[0][:5])  # and the start of a fourth
    assert read_frames(connection, timeout=1) is True
    assert connection.frames == [(1, 1, b"method"), (2, 1, b"header"), (3, 1, b"body")]
    # The partial frame waits in py-amqp's buffer, where its own reads find it.
    assert connection.transport._read_buffer == frames[0][:5]
    broker.sendall(frames[0][5:])
    assert read_frames(connection, timeout=1) is True
    assert connection.frames[-1] == (1, 1, b"method")
    assert connection.transport._read_buffer == b""


def test_a_frame_py_amqp_buffered_is_handled_without_waiting(pair):
    connection, _ = pair
    connection.transport._read_buffer = frame(8, 0, b"")  # a heartbeat
    assert read_frames(connection, timeout=None) is True
    assert connection.frames == [(8, 0, b"")]


def test_a_frame_bigger_than_one_read_is_put_together(pair):
    connection, broker = pair
    payload = bytes(range(256)) * 1000  # 256 KB: several reads
    # From another green thread: more than the socket buffer holds.
    sender = concurrency.spawn(broker.sendall, frame(3, 2, payload))
    assert read_frames(connection, timeout=5) is True
    sender.wait()
    assert connection.frames == [(3, 2, payload)]


def test_nothing_arriving_is_a_timeout_not_an_error(pair):
    connection, broker = pair
    broker.sendall(frame(1, 1, b"method")[:3])
    assert read_frames(connection, timeout=0.05) is False
    assert connection.frames == []
    assert connection.transport._read_buffer == frame(1, 1, b"method")[:3]


def test_a_closed_connection_raises_and_is_marked_down(pair):
    connection, broker = pair
    broker.close()
    with pytest.raises(OSError):
        read_frames(connection, timeout=1)
    assert connection.transport.connected is False


def test_a_frame_without_its_end_octet_is_refused(pair):
    connection, broker = pair
    broker.sendall(frame(1, 1, b"method")[:-1] + b"\x00")
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        read_frames(connection, timeout=1)


class _Channel:
    def __init__(self) -> None:
        self.is_closing = False
        self._pending: dict[Any, Any] = {}
        self.acked: list[tuple[int, bool]] = []
        self.events = {
            "basic_ack": [lambda tag, multiple: self.acked.append((tag, multiple))]
        }


def test_a_publisher_confirm_goes_straight_to_the_channels_ack_listeners(pair):
    connection, broker = pair
    channel = connection.channels = {5: _Channel()}  # type: ignore[attr-defined]
    connection.bytes_recv = 0  # type: ignore[attr-defined]
    broker.sendall(ack_frame(5, 42, True) + ack_frame(5, 43, False))
    assert read_frames(connection, timeout=1) is True
    assert channel[5].acked == [(42, True), (43, False)]
    assert connection.frames == []  # not through py-amqp's frame handler


def test_a_confirm_someone_waits_for_is_left_to_py_amqp(pair):
    connection, broker = pair
    waited = _Channel()
    waited._pending[spec.Basic.Ack] = object()
    closing = _Channel()
    closing.is_closing = True
    connection.channels = {1: waited, 2: closing}  # type: ignore[attr-defined]
    broker.sendall(ack_frame(1, 7) + ack_frame(2, 8) + ack_frame(3, 9))
    assert read_frames(connection, timeout=1) is True
    assert [frame[1] for frame in connection.frames] == [1, 2, 3]
    assert waited.acked == closing.acked == []


@pytest.mark.parametrize(
    "args",
    [
        ["ctag", 7, False, "nameko-rpc", "rpc-reply"],
        ["amq.ctag-ü", 2**40, True, "", "bench_target.echo"],
        ["", 1, False, "x" * 255, "\udc80"],
    ],
)
def test_a_delivery_is_parsed_as_py_amqp_parses_it(args):
    payload = pack(">HH", *spec.Basic.Deliver) + dumps("sLbss", args)
    assert list(parse_deliver(payload)) == loads("sLbss", payload, 4)[0]


class _Delivered:
    def __init__(self, body: bytes, **properties: Any) -> None:
        self.body = body
        self.properties = properties

    def __getattr__(self, name: str) -> Any:
        try:
            return self.properties[name]
        except KeyError:
            raise AttributeError(name) from None


class _ConsumingChannel:
    def __init__(self) -> None:
        self.is_closing = False
        self.auto_decode = True
        self._pending: dict[Any, Any] = {}
        self.delivered: list[tuple] = []
        self.generic: list[tuple] = []
        self._callbacks = {spec.Basic.Deliver: self.on_deliver}

    def on_deliver(self, *args: Any) -> None:
        self.delivered.append(args)

    def dispatch_method(self, *args: Any) -> None:
        self.generic.append(args)


def test_deliveries_reach_the_consumer_without_py_amqps_dispatch():
    channel = _ConsumingChannel()
    speed_up_deliveries(channel)
    payload = pack(">HH", *spec.Basic.Deliver) + dumps(
        "sLbss", ["ctag", 9, True, "ex", "rk"]
    )
    message = _Delivered("é".encode(), content_encoding="utf-8")
    channel.dispatch_method(spec.Basic.Deliver, payload, message)
    assert channel.delivered == [("ctag", 9, True, "ex", "rk", message)]
    assert message.body == "é"  # decoded as py-amqp's dispatch decodes it
    binary = _Delivered(b"\xff")  # no encoding: kept as bytes
    channel.dispatch_method(spec.Basic.Deliver, payload, binary)
    assert binary.body == b"\xff"
    assert channel.generic == []


def test_other_methods_and_awaited_deliveries_go_through_py_amqp():
    channel = _ConsumingChannel()
    generic = channel.generic
    speed_up_deliveries(channel)
    channel.dispatch_method(spec.Basic.CancelOk, b"", None)
    channel._pending[spec.Basic.Deliver] = object()
    payload = pack(">HH", *spec.Basic.Deliver) + dumps("sLbss", ["c", 1, False, "", ""])
    channel.dispatch_method(spec.Basic.Deliver, payload, _Delivered(b""))
    assert [call[0] for call in generic] == [spec.Basic.CancelOk, spec.Basic.Deliver]
    assert channel.delivered == []
