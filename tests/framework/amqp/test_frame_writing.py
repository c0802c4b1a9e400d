"""publish_frames / ack_frame: the same bytes py-amqp's frame writer sends; one
publish through them on the real broker."""

from __future__ import annotations

import datetime
import decimal
import enum
from typing import Any

import amqp
import amqp.method_framing
import kombu
import pytest
from amqp import spec

from framework.amqp.frames import (
    ack_frame,
    encode_properties,
    encode_table,
    publish_frames,
)
from framework.amqp.publish import Publisher

FRAME_MAX = 131072


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(str):
    pass


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: Any) -> None:
        self.written += bytes(data)


class _Connection:
    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0


def py_amqp_bytes(
    channel_id: int,
    method: tuple[int, int],
    argsig: str,
    args: tuple,
    content: Any = None,
    frame_max: int = FRAME_MAX,
) -> bytes:
    transport = _Transport()
    write = amqp.method_framing.frame_writer(_Connection(frame_max), transport)
    write(1, channel_id, method, amqp.serialization.dumps(argsig, args), content)
    return transport.written


PROPERTY_SETS = [
    {},
    # a request of ours
    {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 1,
        "priority": 0,
        "application_headers": {
            "nameko.call_id_stack": ["standalone_rpc_proxy.call.0c5a"],
            "nameko.auth": "tøken",
        },
        "correlation_id": "6a0e1a8e-7b7a-4c67-9d7e-3d7f1c2b9a10",
        "reply_to": "a6f1b1a2-1111-2222-3333-444455556666",
    },
    # a reply of ours: an empty header table
    {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 0,
        "application_headers": {},
        "correlation_id": "abc",
    },
    # everything py-amqp knows, some of it the slow way (timestamp, empty string)
    {
        "content_type": "text/plain",
        "content_encoding": "",
        "application_headers": {"x": 1, "y": 2.5, "z": None, "n": {"deep": [1, "a"]}},
        "delivery_mode": 2,
        "priority": 9,
        "correlation_id": b"bytes-id",
        "reply_to": "r",
        "expiration": "60000",
        "message_id": "m",
        "timestamp": 1700000000,
        "type": "t",
        "user_id": "guest",
        "app_id": "app",
        "cluster_id": "c",
    },
    {"priority": True, "reply_to": "\udc80"},  # odd values: py-amqp's encoding
    # header values of every type a table holds, and some left to py-amqp
    {
        "application_headers": {
            "s": "tøken\udc80",
            "b": b"raw",
            "t": True,
            "f": False,
            "i": -2147483647,
            "big": 2147483648,
            "neg": -(2**40),
            "d": 1.5,
            "n": None,
            "l": ["a", 1, [2.5, None], {"x": "y"}],
            "tuple": ("a", "b"),
            "nested": {"deeper": {"deepest": ["z"]}},
            b"bytes-key": 1,
        }
    },
    {"application_headers": {"when": datetime.datetime(2026, 12, 1, 3, 0)}},
    {"application_headers": {"amount": decimal.Decimal("1.25"), "s": "x"}},
    {"application_headers": {"level": _Level.HIGH, "name": _Name("n")}},
]


@pytest.mark.parametrize("properties", PROPERTY_SETS)
def test_properties_are_encoded_as_py_amqp_does(properties):
    expected = amqp.Message(**properties)._serialize_properties()
    assert encode_properties(properties) == expected


@pytest.mark.parametrize("properties", PROPERTY_SETS[:3])
@pytest.mark.parametrize(
    "body",
    [b"", '{"args": ["ping"], "kwargs": {}}', "é" * 70000, b"x" * 300000],
    ids=["empty", "tiny", "two-frames-of-text", "three-frames"],
)
@pytest.mark.parametrize("mandatory", [True, False])
def test_a_publish_is_the_bytes_py_amqp_writes(properties, body, mandatory):
    args = (0, "nameko-rpc", "bench_target.echo", mandatory, False)
    expected = py_amqp_bytes(
        7, spec.Basic.Publish, "Bssbb", args, amqp.Message(body, **properties)
    )
    written = publish_frames(
        7, "nameko-rpc", "bench_target.echo", mandatory, properties, body, FRAME_MAX
    )
    assert written == expected


def test_a_text_body_without_an_encoding_is_sent_as_utf8_and_says_so():
    body = "ünïcode"
    expected = py_amqp_bytes(
        1,
        spec.Basic.Publish,
        "Bssbb",
        (0, "", "q", False, False),
        amqp.Message(body, content_type="text/plain"),
    )
    properties = {"content_type": "text/plain"}
    assert publish_frames(1, "", "q", False, properties, body, FRAME_MAX) == expected
    assert properties == {"content_type": "text/plain"}  # the caller's dict untouched


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("tag", [1, 2**40 + 3])
def test_an_ack_is_the_bytes_py_amqp_writes(tag, multiple):
    expected = py_amqp_bytes(3, spec.Basic.Ack, "Lb", (tag, multiple))
    assert ack_frame(3, tag, multiple) == expected


def test_a_routing_key_past_255_bytes_is_refused_as_py_amqp_refuses_it():
    with pytest.raises(Exception) as ours:
        publish_frames(1, "", "k" * 256, False, {}, b"", FRAME_MAX)
    with pytest.raises(Exception) as theirs:
        py_amqp_bytes(1, spec.Basic.Publish, "Bssbb", (0, "", "k" * 256, False, False))
    assert type(ours.value) is type(theirs.value)


@pytest.fixture
def publisher(rabbit_config):
    instance = Publisher(rabbit_config)
    yield instance
    instance.close()


def test_a_publish_through_the_direct_frames_arrives_whole(
    publisher, rabbit_config, get_message_from_queue
):
    queue = kombu.Queue("direct-frames", durable=True)
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        queue.bind(connection.default_channel).declare()
    body = {"text": "é" * 150_000}  # three body frames
    publisher.publish(
        body,
        routing_key="direct-frames",
        headers={"nameko.call_id_stack": ["a.b.1"]},
        correlation_id="c1",
        reply_to="r1",
        priority=3,
        mandatory=True,
    )
    # The publisher's writes are coalesced (tests run monkey patched), which is
    # what sends them through amqp.frames rather than py-amqp's writer.
    assert publisher.connection.connection.connection.transport.coalesced
    message = get_message_from_queue("direct-frames")
    assert message.payload == body
    assert message.headers == {"nameko.call_id_stack": ["a.b.1"]}
    assert message.properties["correlation_id"] == "c1"
    assert message.properties["reply_to"] == "r1"
    assert message.properties["priority"] == 3


def test_plain_headers_are_encoded_without_py_amqps_encoder(monkeypatch):
    plain = PROPERTY_SETS[5]["application_headers"]
    expected = amqp.serialization.dumps("F", [plain])

    def refuse(*args: Any) -> bytes:
        raise AssertionError("py-amqp's table encoder was used")

    monkeypatch.setattr(amqp.serialization, "dumps", refuse)
    assert encode_table(plain) == expected
