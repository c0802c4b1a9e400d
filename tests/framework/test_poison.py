"""Poison messages against a running service (real broker).

Every shape of bad message we could think of goes to a service's RPC queue and to
its ``@consume`` queue; each must end acked (answered), dead-lettered or rejected,
and the service must keep answering. Today's bugs this guards against: a JSON body
nested a thousand deep killed the consume loop (``RecursionError``), a malformed
``nameko.call_id_stack`` left a message unacked for good while the pool was full,
and a bug in routing passed for a lost connection and looped forever.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from typing import Any

import amqp
import kombu
import pytest

from framework import concurrency, deadletters
from framework.amqp.consume import consume_observers
from framework.logs import JsonFormatter
from framework.messaging import Consumer, consume
from framework.rpc import rpc
from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

exchange = kombu.Exchange("poison", type="topic", durable=True)
queue = kombu.Queue("poison-queue", exchange=exchange, routing_key="p.*", durable=True)
taken: list[Any] = []
gates: list[concurrency.Event] = [concurrency.Event()]


class Target:
    name = "target"

    @rpc
    def echo(self, value):
        return value

    @rpc
    def hold(self):
        gates[-1].wait()
        return "released"

    @consume(queue)
    def take(self, body):
        taken.append(body)


def deep_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Undecodable bodies: dead-lettered at once, on either queue.
UNDECODABLE: list[tuple[str, bytes, dict[str, Any]]] = [
    ("nested 1,000 deep", deep_list(1000), {}),
    ("nested 100,000 deep", deep_list(100_000), {}),
    (
        "nested deep, kombu's typed JSON path",
        b'{"__type__": "x", "v": ' + deep_list(100_000) + b"}",
        {},
    ),
    ("truncated JSON", b'{"args": ["a@example.com", "pw', {}),
    ("empty body", b"", {}),
    ("not UTF-8", b"\xff\xfe\xfa", {}),
    ("an integer of 100,000 digits", b"1" * 100_000, {}),
    ("pickle", b"\x80\x04K\x01.", {"content_type": "application/x-python-serialize"}),
    ("unknown content type", b"hello", {"content_type": "text/x-unknown"}),
    ("unknown encoding", b'{"a": "\xff"}', {"content_encoding": "nope"}),
    # Properties a republished copy must not take over as they are.
    ("expiring", b"{", {"expiration": "600000"}),
    ("another user's", b"{", {"user_id": "guest", "priority": 250}),
]

# Decodable, but not what the entrypoint expects: answered with an error.
MALFORMED_REQUESTS: list[tuple[str, bytes, str]] = [
    ("a list", b"[1, 2]", "target.echo"),
    ("a string", b'"hello"', "target.echo"),
    ("null", b"null", "target.echo"),
    ("args not a list", b'{"args": 5, "kwargs": {}}', "target.echo"),
    ("kwargs not a mapping", b'{"args": [], "kwargs": []}', "target.echo"),
    ("wrong arity", b'{"args": [1, 2, 3], "kwargs": {}}', "target.echo"),
    ("unknown method", b'{"args": [], "kwargs": {}}', "target.nope"),
]

# Well-formed calls with odd headers: served (the bad context is ignored).
ODD_HEADERS: list[dict[str, Any]] = [
    {"nameko.call_id_stack": 5},
    {"nameko.call_id_stack": [1, None, {"a": 1}, "x" * 100_000]},
    {"nameko.call_id_stack": {"a": "b"}},
    {"nameko.call_id_stack": ["caller.method.1"] * 5_000},
    {"nameko.call_id_stack": "x" * 100_000},
    {"nameko.language": "x" * 100_000},
    {"nameko.language": {"nested": {"deeper": [1, 2, {"x": None}]}}},
    {"nameko.user_id": b"\x00\xff"},
    {"x-redelivery-count": "abc"},
    {"x-redelivery-count": -(2**40)},
]


@pytest.fixture(autouse=True)
def reset():
    taken.clear()
    gates.append(concurrency.Event())
    yield
    if not gates[-1].ready():
        gates[-1].send(None)


@pytest.fixture
def raw_channel(rabbit_config):
    connection = kombu.Connection(rabbit_config["AMQP_URI"])
    channel = connection.channel()
    yield channel
    connection.close()


def send(channel, body, routing_key, exchange_name="nameko-rpc", **properties):
    properties.setdefault("content_type", "application/json")
    properties.setdefault("content_encoding", "utf-8")
    channel.basic_publish(
        amqp.Message(body, **properties),
        exchange=exchange_name,
        routing_key=routing_key,
    )


@pytest.fixture
def deliveries():
    """How many messages each queue delivered to the service so far."""
    counts: Counter[str] = Counter()

    def observe(loop, queue_name):
        counts[queue_name] += 1

    consume_observers.append(observe)
    yield counts
    consume_observers.remove(observe)


def left_in(channel, queue_name: str) -> int:
    """Messages in a queue; once the service stopped, unacked ones count too (the
    broker requeues them), so 0 means every message was settled for good."""
    _, count, _ = channel.queue_declare(queue_name, passive=True)
    return count


def call_reply_queue(channel) -> str:
    name, _, _ = channel.queue_declare("", exclusive=True)
    channel.queue_bind(name, "nameko-rpc", routing_key=name)
    return name


def test_every_poison_shape_ends_settled_and_the_service_keeps_answering(
    rabbit_config, runner_factory, raw_channel, caplog, capfd
):
    runner = runner_factory(rabbit_config, Target)
    runner.start()
    reply_to = call_reply_queue(raw_channel)
    with caplog.at_level(logging.INFO):
        for _, body, properties in UNDECODABLE:
            send(raw_channel, body, "target.echo", reply_to=reply_to, **properties)
            send(raw_channel, body, "p.bad", exchange_name="poison", **properties)
        for _, body, routing_key in MALFORMED_REQUESTS:
            send(raw_channel, body, routing_key, reply_to=reply_to, correlation_id="m")
        good = json.dumps({"args": ["fine"], "kwargs": {}}).encode()
        for headers in ODD_HEADERS:
            send(
                raw_channel,
                good,
                "target.echo",
                reply_to=reply_to,
                correlation_id="odd",
                application_headers=headers,
            )
            send(
                raw_channel,
                b'{"odd": true}',
                "p.odd",
                exchange_name="poison",
                application_headers=headers,
            )

        with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
            assert cluster.target.echo("still here") == "still here"
        wait_for(lambda: len(taken) == len(ODD_HEADERS))
        assert taken == [{"odd": True}] * len(ODD_HEADERS)

        for source in ("rpc-target", "poison-queue"):
            wait_for(
                lambda s=source: (
                    len(deadletters.peek(rabbit_config, s)) == len(UNDECODABLE)
                ),
                20,
            )
            dead = deadletters.peek(rabbit_config, source)
            assert all(d.reason.startswith("undecodable (") for d in dead)

        # Every malformed request and every odd-headered call got its answer.
        replies = []
        wait_for(
            lambda: (
                replies.extend(_drain(raw_channel, reply_to))
                or len(replies) >= len(MALFORMED_REQUESTS) + len(ODD_HEADERS)
            ),
            20,
        )
    assert len(replies) == len(MALFORMED_REQUESTS) + len(ODD_HEADERS)
    by_correlation: dict[str, list[Any]] = {"m": [], "odd": []}
    for reply in replies:
        by_correlation[reply.properties["correlation_id"]].append(
            json.loads(reply.body)
        )
    assert all(r["error"] is not None for r in by_correlation["m"])
    assert by_correlation["odd"] == [{"result": "fine", "error": None}] * len(
        ODD_HEADERS
    )
    # Nothing went to stderr outside the log format (eventlet prints the
    # tracebacks of green threads that die), and no body reached a log line.
    assert "Traceback" not in capfd.readouterr().err
    formatter = JsonFormatter()
    for record in caplog.records:
        assert "a@example.com" not in formatter.format(record)
    # A dead letter never expires (the "expiring" one came with an expiration).
    letters = _drain(raw_channel, "poison-queue.dead-letter")
    assert len(letters) == len(UNDECODABLE)
    assert not [m for m in letters if "expiration" in m.properties]
    runner.stop()
    assert (
        left_in(raw_channel, "rpc-target") == left_in(raw_channel, "poison-queue") == 0
    )


def _drain(channel, queue_name: str) -> list[Any]:
    got = []
    while (message := channel.basic_get(queue_name, no_ack=True)) is not None:
        got.append(message)
    return got


def nested_table(depth: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for _ in range(depth):
        table = {"a": table}
    return table


def test_headers_too_deep_for_the_amqp_library_are_dead_lettered(
    rabbit_config, runner_factory, raw_channel
):
    """RabbitMQ routes a header nested 1,200 deep; py-amqp's recursive parser
    cannot read it. It used to drop the connection on every redelivery."""
    runner = runner_factory(rabbit_config, Target)
    runner.start()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # for py-amqp's recursive encoder, in the sender
    try:
        headers = {"deep": nested_table(1200)}
        send(
            raw_channel,
            b'{"args": [], "kwargs": {}}',
            "target.echo",
            application_headers=headers,
        )
        send(
            raw_channel,
            b'{"deep": 1}',
            "p.deep",
            exchange_name="poison",
            application_headers=headers,
        )
    finally:
        sys.setrecursionlimit(limit)
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert cluster.target.echo("after") == "after"
    for source in ("rpc-target", "poison-queue"):
        wait_for(lambda s=source: len(deadletters.peek(rabbit_config, s)) == 1, 20)
        (letter,) = deadletters.peek(rabbit_config, source)
        assert letter.reason == "undecodable (UnparsableProperties)"
    assert taken == []
    runner.stop()
    assert (
        left_in(raw_channel, "rpc-target") == left_in(raw_channel, "poison-queue") == 0
    )


def test_headers_filling_a_frame_do_not_keep_the_dead_letter_from_being_published(
    rabbit_config, runner_factory, raw_channel, caplog
):
    """Dead-lettering adds headers; with the original ones nearly filling a frame
    the copy did not fit, the broker closed the publishing connection (every
    reply and event of the service with it), and the message came back every
    ten seconds to do it again."""
    runner_factory(rabbit_config, Target).start()
    big = "x" * (131072 - 8 - 60)
    with caplog.at_level(logging.INFO):
        send(
            raw_channel,
            b"{broken",
            "p.big",
            exchange_name="poison",
            application_headers={"big": big, "small": 1},
        )
        wait_for(lambda: len(deadletters.peek(rabbit_config, "poison-queue")) == 1)
    (letter,) = deadletters.peek(rabbit_config, "poison-queue")
    assert letter.body == b"{broken"
    assert letter.headers["x-dropped-headers"] == ["big"]
    assert letter.headers["small"] == 1
    assert not [r for r in caplog.records if r.message.startswith("publish failed")]


def test_a_malformed_call_id_stack_while_the_pool_is_full_is_served(
    rabbit_config, runner_factory, raw_channel, deliveries, capfd
):
    # One worker, but messages are prefetched beyond it: the second waits for a
    # free worker on a thread of its own.
    config = {**rabbit_config, "max_workers": 1, "PREFETCH_COUNT": 5}
    runner = runner_factory(config, Target)
    runner.start()
    reply_to = call_reply_queue(raw_channel)
    hold = json.dumps({"args": [], "kwargs": {}}).encode()
    send(raw_channel, hold, "target.hold", reply_to=reply_to, correlation_id="hold")
    send(
        raw_channel,
        json.dumps({"args": ["queued"], "kwargs": {}}).encode(),
        "target.echo",
        reply_to=reply_to,
        correlation_id="queued",
        application_headers={"nameko.call_id_stack": 5},
    )
    wait_for(lambda: deliveries["rpc-target"] == 2)
    gates[-1].send(None)
    replies: list[Any] = []
    wait_for(lambda: replies.extend(_drain(raw_channel, reply_to)) or len(replies) == 2)
    assert sorted(json.loads(r.body)["result"] for r in replies) == [
        "queued",
        "released",
    ]
    runner.stop()
    assert left_in(raw_channel, "rpc-target") == 0
    assert "Traceback" not in capfd.readouterr().err


class BrokenRouting(Consumer):
    """An entrypoint whose routing has a bug (as a custom one might)."""

    def handle_message(self, body, message):
        if "bug" in body:
            getattr(body, body["bug"])  # the bug: AttributeError naming the value
        super().handle_message(body, message)


class Buggy:
    name = "buggy"

    @BrokenRouting.decorator(queue)
    def take(self, body):
        taken.append(body)


def test_a_bug_while_routing_is_not_a_lost_connection(
    rabbit_config, runner_factory, caplog
):
    config = {**rabbit_config, "MAX_REDELIVERIES": 1, "REDELIVERY_DELAY": 0.05}
    runner_factory(config, Buggy).start()
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        producer = connection.Producer()
        producer.publish({"bug": "secret-text"}, exchange=exchange, routing_key="p.x")
        producer.publish({"ok": 1}, exchange=exchange, routing_key="p.y")
    with caplog.at_level(logging.INFO):
        wait_for(lambda: len(deadletters.peek(rabbit_config, "poison-queue")) == 1, 20)
    assert taken == [{"ok": 1}]
    (letter,) = deadletters.peek(rabbit_config, "poison-queue")
    assert letter.reason == (
        "failed 2 times: AttributeError while routing to the entrypoint"
    )
    errors = [r for r in caplog.records if r.message == "error handling a message"]
    assert len(errors) == 2 and {r.error_type for r in errors} == {"AttributeError"}
    assert not any("lost connection" in r.message for r in caplog.records)
    assert "secret-text" not in caplog.text


def test_a_graceful_stop_serves_the_message_waiting_for_a_free_worker(
    rabbit_config, runner_factory, raw_channel, deliveries
):
    config = {**rabbit_config, "max_workers": 1, "PREFETCH_COUNT": 5}
    runner = runner_factory(config, Target)
    runner.start()
    reply_to = call_reply_queue(raw_channel)
    request = json.dumps({"args": [], "kwargs": {}}).encode()
    send(raw_channel, request, "target.hold", reply_to=reply_to, correlation_id="1")
    send(
        raw_channel,
        json.dumps({"args": ["waited"], "kwargs": {}}).encode(),
        "target.echo",
        reply_to=reply_to,
        correlation_id="2",
    )
    # Both delivered: the second waits for the one worker, on a thread of its own.
    wait_for(lambda: deliveries["rpc-target"] == 2)
    stopper = concurrency.spawn(runner.stop)
    for _ in range(20):
        concurrency.sleep(0)
    gates[-1].send(None)
    with concurrency.Timeout(20):
        stopper.wait()
    replies: list[Any] = []
    wait_for(lambda: replies.extend(_drain(raw_channel, reply_to)) or len(replies) == 2)
    assert sorted(json.loads(r.body)["result"] for r in replies) == [
        "released",
        "waited",
    ]
