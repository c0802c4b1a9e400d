"""The private internals of py-amqp, kombu and eventlet the framework relies on.

pyproject.toml pins each of these libraries below its next minor release; before
raising a pin, these tests say whether what we patch or call is still there and
still behaves as we assume. Each names the framework code that depends on it.
No broker needed.
"""

from __future__ import annotations

import inspect
import socket
import sys
from struct import pack

import amqp
import amqp.basic_message
import amqp.method_framing
import amqp.transport
import eventlet.debug
import eventlet.event
import eventlet.websocket
import eventlet.wsgi
import kombu
import pytest
from amqp import spec
from amqp.serialization import dumps

from framework.amqp import channels
from framework.amqp.connection import read_ahead
from framework.amqp.frames import MARKER_HEADER, FrameGuard


@pytest.fixture
def tcp_transport():
    """A py-amqp TCP transport on one end of a socket pair, set up as after connect."""
    ours, theirs = socket.socketpair()
    transport = amqp.transport.TCPTransport("127.0.0.1:1")
    transport.sock = ours
    transport._setup_transport()
    yield transport, theirs
    ours.close()
    theirs.close()


def test_tcp_transport_writes_through_its_write_attribute(tcp_transport):
    """connection.CoalescingWriter and heartbeat.HeartbeatGuard replace
    ``transport._write``; every frame must go through it."""
    transport, peer = tcp_transport
    written: list[bytes] = []
    transport._write = lambda data: written.append(bytes(data))
    transport.write(b"frame")
    assert written == [b"frame"]


def test_tcp_transport_reads_through_quick_recv_and_keeps_the_surplus(tcp_transport):
    """connection.read_ahead asks ``_quick_recv`` for more than needed and relies
    on py-amqp keeping the surplus in its read buffer."""
    transport, peer = tcp_transport
    sizes: list[int] = []
    recv = transport._quick_recv

    def recording(n):
        sizes.append(n)
        return recv(n)

    transport._quick_recv = recording

    class Connection:
        pass

    holder = Connection()
    holder.transport = transport
    read_ahead(holder)
    peer.sendall(b"abcdefgh")
    assert transport._read(3) == b"abc"
    assert transport._read(5) == b"defgh"
    assert sizes == [8192]  # one system call for both reads
    assert transport.sock is not None  # heartbeat.HeartbeatGuard writes to it


def _deliver_frame() -> bytes:
    args = dumps("sLbss", ["ctag", 7, False, "ex", "rk"])
    return pack(">HH", *spec.Basic.Deliver) + args


def _nested(depth: int) -> dict:
    table: dict = {}
    for _ in range(depth):
        table = {"a": table}
    return table


def test_a_stand_in_header_puts_the_frame_reader_back_in_step():
    """frames.FrameGuard: py-amqp's frame handler, after failing to parse a
    content header, still expects one, and the connection's ``on_inbound_frame``
    can be replaced."""
    assert isinstance(amqp.Connection.on_inbound_frame, property)
    assert amqp.Connection.on_inbound_frame.fset is not None
    delivered = []

    class Connection:
        bytes_recv = 0

    connection = Connection()
    connection.on_inbound_frame = amqp.method_framing.frame_handler(
        connection, lambda channel, sig, args, msg: delivered.append(msg)
    )
    FrameGuard.install(connection)
    body = b'{"x": 1}'
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        properties = amqp.basic_message.Message(
            application_headers={"deep": _nested(5000)}
        )._serialize_properties()
    finally:
        sys.setrecursionlimit(limit)
    header = pack(">HxxQ", 60, len(body)) + properties
    connection.on_inbound_frame((1, 1, _deliver_frame()))
    connection.on_inbound_frame((2, 1, header))
    connection.on_inbound_frame((3, 1, body))
    (message,) = delivered
    assert message.body == body
    assert message.properties["application_headers"] == {
        MARKER_HEADER: "RecursionError"
    }


def test_publish_sends_basic_publish_through_send_method():
    """publish.Publisher calls ``channel.send_method`` itself (py-amqp's
    ``basic_publish`` reads the socket, racing our reader thread)."""
    parameters = list(inspect.signature(amqp.Channel.send_method).parameters)
    assert parameters[:5] == ["self", "sig", "format", "args", "content"]
    assert spec.Basic.Publish == (60, 40)


def test_kombu_memory_channel_internals_route_and_publish():
    """channels.publish_emulated and channels._routable use kombu's virtual
    channel internals: ``_has_queue``, ``get_table``, ``typeof().lookup`` and
    ``prepare_message``."""
    with kombu.Connection("memory://") as connection:
        channel = connection.channel()
        exchange = kombu.Exchange("internals", type="topic")
        queue = kombu.Queue("internals-q", exchange, routing_key="a.*")
        queue.bind(channel).declare()
        assert channels._routable(channel, "internals", "a.b")
        assert not channels._routable(channel, "internals", "b.b")
        assert channels._routable(channel, "", "internals-q")
        channels.publish_emulated(
            channel,
            '{"n": 1}',
            {"content_type": "application/json", "application_headers": {"h": 1}},
            "internals",
            "a.b",
            mandatory=True,
        )
        message = channel.basic_get("internals-q")
        parts = channels.parts(message)
        assert parts.body in ('{"n": 1}', b'{"n": 1}')
        assert parts.properties["application_headers"] == {"h": 1}
        assert connection.transport.driver_type == "memory"


def test_eventlet_internals():
    """concurrency: ``Event.reset`` (connection.Waiter), the websocket's
    ``_send_closing_frame``, wsgi's ``eventlet.set_idle`` environ key and
    ``HttpProtocol`` hooks (the guarded HTTP server), blocking detection."""
    event = eventlet.event.Event()
    event.send(1)
    event.reset()
    assert not event.ready()
    closing = inspect.signature(eventlet.websocket.WebSocket._send_closing_frame)
    assert "ignore_send_errors" in closing.parameters
    assert "eventlet.set_idle" in inspect.getsource(eventlet.wsgi)
    protocol = eventlet.wsgi.HttpProtocol
    assert callable(protocol._read_request_line)
    assert callable(protocol.parse_request) and callable(protocol.get_environ)
    assert "self.conn_state = conn_state" in inspect.getsource(protocol.__init__)
    assert callable(eventlet.debug.hub_blocking_detection)
