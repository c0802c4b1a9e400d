"""@consume, the Publisher dependency, dead letters and poison messages (real broker)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from unittest.mock import Mock

import kombu
import pytest

from framework import deadletters
from framework.events import event_handler
from framework.logs import JsonFormatter
from framework.messaging import (
    Publisher,
    consume,
    decode_from_headers,
    redelivery_count,
    redelivery_delay,
)
from framework.rpc import rpc
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

exchange = kombu.Exchange("jobs", type="topic", durable=True)
queue = kombu.Queue("jobs-queue", exchange=exchange, routing_key="job.*", durable=True)
received: list = []
attempts: list = []


class Producer:
    name = "producer"
    publish = Publisher(exchange=exchange)

    @rpc
    def submit(self, job):
        self.publish(job, routing_key="job.new")


class Worker:
    name = "worker"

    @consume(queue)
    def handle(self, body):
        received.append(body)


class Poisoned:
    name = "poisoned"

    @event_handler("source", "boom", requeue_on_error=True)
    def on_boom(self, payload):
        attempts.append(payload)
        raise RuntimeError("always fails")


@pytest.fixture(autouse=True)
def clear():
    received.clear()
    attempts.clear()


def publish_raw(
    amqp_uri: str, body: bytes, content_type: str, exchange_name: str, routing_key: str
) -> None:
    with kombu.Connection(amqp_uri) as connection:
        producer = connection.Producer()
        producer.publish(
            body,
            exchange=exchange_name,
            routing_key=routing_key,
            content_type=content_type,
            content_encoding="utf-8",
        )


def test_publisher_and_consumer_carry_messages_with_context(
    rabbit_config, runner_factory, spy
):
    runner_factory(rabbit_config, Producer, Worker).start()
    wire = spy("jobs")
    with ClusterRpcProxy(
        rabbit_config, context_data={"language": "nl"}, timeout=5
    ) as cluster:
        cluster.producer.submit({"n": 1})
    wait_for(lambda: received == [{"n": 1}])
    message = wire.get()
    assert json.loads(message.body) == {"n": 1}
    assert message.headers["nameko.language"] == "nl"
    assert message.headers["nameko.call_id_stack"][-1].startswith("producer.submit.")


def test_undecodable_message_is_dead_lettered_and_the_consumer_keeps_serving(
    rabbit_config, runner_factory
):
    runner_factory(rabbit_config, Worker).start()
    publish_raw(
        rabbit_config["AMQP_URI"], b"{not json", "application/json", "jobs", "job.bad"
    )
    publish_raw(
        rabbit_config["AMQP_URI"],
        b'{"ok": true}',
        "application/json",
        "jobs",
        "job.good",
    )
    wait_for(lambda: received == [{"ok": True}])
    wait_for(lambda: len(deadletters.peek(rabbit_config, "jobs-queue")) == 1)
    (letter,) = deadletters.peek(rabbit_config, "jobs-queue")
    assert letter.body == b"{not json"
    assert letter.reason.startswith("undecodable")
    assert (
        letter.original_exchange == "jobs" and letter.original_routing_key == "job.bad"
    )


def test_content_type_not_accepted_is_dead_lettered(rabbit_config, runner_factory):
    runner_factory(rabbit_config, Worker).start()
    publish_raw(
        rabbit_config["AMQP_URI"],
        b"\x80\x04K\x01.",
        "application/x-python-serialize",
        "jobs",
        "job.pickle",
    )
    wait_for(lambda: len(deadletters.peek(rabbit_config, "jobs-queue")) == 1)
    (letter,) = deadletters.peek(rabbit_config, "jobs-queue")
    assert "untrusted content" in letter.reason or "disallowed" in letter.reason.lower()
    assert received == []


def test_without_a_dead_letter_exchange_bad_messages_are_rejected_and_only_their_metadata_logged(
    rabbit_config, runner_factory, caplog
):
    config = {**rabbit_config, "DEAD_LETTER_EXCHANGE": None}
    runner = runner_factory(config, Worker)
    runner.start()
    # A create_user-like body cut short: undecodable, with a password inside.
    broken = b'{"email": "ann@example.com", "password": "hunter2-secret'
    with caplog.at_level(logging.DEBUG):
        publish_raw(
            rabbit_config["AMQP_URI"], broken, "application/json", "jobs", "job.bad"
        )
        publish_raw(
            rabbit_config["AMQP_URI"],
            b'{"after": 1}',
            "application/json",
            "jobs",
            "job.good",
        )
        wait_for(lambda: received == [{"after": 1}])
        wait_for(lambda: "rejecting a message" in caplog.text)
    (rejected,) = [r for r in caplog.records if r.message.startswith("rejecting")]
    assert rejected.levelno == logging.ERROR
    assert (rejected.queue, rejected.routing_key, rejected.size) == (
        "jobs-queue",
        "job.bad",
        len(broken),
    )
    assert rejected.content_type == "application/json"
    assert rejected.reason == "undecodable (JSONDecodeError)"
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        assert "hunter2" not in line and "ann@example.com" not in line, line
    # Rejected for good: once the service stopped, the broker has nothing to give
    # back (an unacked message would be requeued).
    runner.stop()
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        _, waiting, _ = connection.channel().queue_declare("jobs-queue", passive=True)
    assert waiting == 0


def test_poison_message_is_redelivered_with_growing_delays_then_dead_lettered(
    rabbit_config, runner_factory, rabbit_manager
):
    config = {**rabbit_config, "MAX_REDELIVERIES": 3, "REDELIVERY_DELAY": 0.1}
    runner_factory(config, Poisoned).start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("source", "boom", {"id": "poison"})
    source_queue = "evt-source-boom--poisoned.on_boom"
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    assert attempts == [{"id": "poison"}] * 4  # the first delivery and 3 redeliveries
    (letter,) = deadletters.peek(rabbit_config, source_queue)
    # The type, not the text: an unexpected error's message may quote anything.
    assert letter.reason == "failed 4 times: RuntimeError"
    # Each redelivery waited in a queue whose TTL doubles, which dead-letters
    # back to the source queue; none holds anything now.
    parking = {
        q["name"]: q
        for q in rabbit_manager.get_queues(rabbit_config["vhost"])
        if ".redelivery-" in q["name"]
    }
    assert sorted(parking) == [
        f"{source_queue}.redelivery-{ms}ms" for ms in (100, 200, 400)
    ]
    for name, queue_info in parking.items():
        arguments = queue_info["arguments"]
        assert name.endswith(f"-{arguments['x-message-ttl']}ms")
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == source_queue
    deaths = {d["queue"]: d["count"] for d in letter.headers["x-death"]}
    assert set(deaths) == set(parking)
    dispatch.close()


def test_the_default_redelivery_delays_span_about_a_minute():
    delays = [redelivery_delay({}, n) for n in range(1, 6)]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert sum(delays) >= 60
    capped = {"REDELIVERY_DELAY": 10, "REDELIVERY_MAX_DELAY": 15}
    assert [redelivery_delay(capped, n) for n in (1, 2, 3)] == [10, 15, 15]


def test_a_forged_redelivery_count_cannot_buy_extra_redeliveries():
    assert redelivery_count({"x-redelivery-count": -(10**9)}) == 0
    assert redelivery_count({"x-redelivery-count": "abc"}) == 0
    assert redelivery_count({"x-redelivery-count": 2}) == 2
    assert redelivery_count({}) == 0


def test_dead_letters_can_be_replayed_to_their_original_destination(
    rabbit_config, runner_factory
):
    config = {**rabbit_config, "MAX_REDELIVERIES": 0}
    runner = runner_factory(config, Poisoned)
    runner.start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("source", "boom", {"id": 1})
    source_queue = "evt-source-boom--poisoned.on_boom"
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    assert len(attempts) == 1
    assert deadletters.replay(rabbit_config, source_queue) == 1
    wait_for(
        lambda: len(attempts) == 2
    )  # the replayed message reached the handler again
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    dispatch.close()


def test_dead_letters_cli_lists_and_replays(rabbit_config, runner_factory):
    config = {**rabbit_config, "MAX_REDELIVERIES": 0}
    runner_factory(config, Poisoned).start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("source", "boom", {"id": "cli"})
    source_queue = "evt-source-boom--poisoned.on_boom"
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    cli = [sys.executable, "-m", "framework.cli.main"]
    listing = subprocess.run(
        [
            *cli,
            "dead-letters",
            "list",
            source_queue,
            "--broker",
            rabbit_config["AMQP_URI"],
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode == 0, listing.stderr
    assert "source.events boom" in listing.stdout and '"cli"' in listing.stdout
    replayed = subprocess.run(
        [
            *cli,
            "dead-letters",
            "replay",
            source_queue,
            "--broker",
            rabbit_config["AMQP_URI"],
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "replayed 1 message(s)" in replayed.stdout
    wait_for(lambda: len(attempts) == 2)
    dispatch.close()


def test_replaying_an_event_reaches_only_the_handler_that_failed_it(
    rabbit_config, runner_factory
):
    class Bystander:
        name = "bystander"

        @event_handler("source", "boom")
        def on_boom(self, payload):
            received.append(payload)

    config = {**rabbit_config, "MAX_REDELIVERIES": 0}
    runner_factory(config, Poisoned, Bystander).start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("source", "boom", {"id": "once"})
    source_queue = "evt-source-boom--poisoned.on_boom"
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    wait_for(lambda: received == [{"id": "once"}])
    assert deadletters.replay(rabbit_config, source_queue) == 1
    wait_for(lambda: len(attempts) == 2)
    wait_for(lambda: len(deadletters.peek(rabbit_config, source_queue)) == 1)
    assert received == [{"id": "once"}]  # the bystander did not get it twice
    dispatch.close()


def test_a_message_that_cannot_be_dead_lettered_is_rejected_after_a_few_tries(
    memory_config, runner_factory, monkeypatch, caplog
):
    """Rather than come back forever (in-memory broker; the publish is made to fail)."""
    from framework.amqp import publish

    monkeypatch.setattr("framework.messaging.MAX_DEAD_LETTER_ATTEMPTS", 2)
    real_publish = publish.Publisher.publish_encoded
    refused: list[str] = []

    def refuse_dead_letters(self, body, **options):
        exchange = options.get("exchange")
        if getattr(exchange, "name", exchange) == "framework-dlx":
            refused.append(body)
            raise RuntimeError("refused")
        return real_publish(self, body, **options)

    monkeypatch.setattr(publish.Publisher, "publish_encoded", refuse_dead_letters)
    runner_factory(memory_config, Worker).start()
    with (
        caplog.at_level(logging.ERROR),
        kombu.Connection(memory_config["AMQP_URI"]) as connection,
    ):
        connection.Producer().publish(
            b"{bad",
            exchange=exchange,
            routing_key="job.x",
            content_type="application/json",
        )
        wait_for(lambda: "rejecting it" in caplog.text)
        connection.Producer().publish({"n": 2}, exchange=exchange, routing_key="job.y")
        wait_for(lambda: received == [{"n": 2}])
    assert len(refused) == 2


def test_context_headers_keep_plain_values_and_drop_the_rest():
    headers = {
        "nameko.language": "nl",
        "nameko.user_id": 7,
        "nameko.call_id_stack": ["a.b.1", "c.d.2"],
        "nameko.nested": {"a": {"b": 1}},
        "nameko.huge": "x" * 100_000,
        "nameko.long_list": ["a"] * 10_000,
        "nameko.mixed": [1, None, ["x"]],
        "x-death": [{"count": 1}],
    }
    assert decode_from_headers(headers) == {
        "language": "nl",
        "user_id": 7,
        "call_id_stack": ["a.b.1", "c.d.2"],
    }


def test_context_headers_are_bounded_in_total():
    headers = {f"nameko.k{i}": "v" * 4000 for i in range(100)}
    context = decode_from_headers(headers)
    assert 0 < len(context) < 100
    assert sum(len(v) for v in context.values()) <= 32768


def test_a_message_that_cannot_be_redelivered_is_dead_lettered_after_a_few_tries(
    memory_config, runner_factory, monkeypatch
):
    """Rather than come back forever (in-memory broker; redeliveries are made to
    fail, as when a parking queue cannot be declared)."""
    from framework.amqp import publish

    monkeypatch.setattr("framework.messaging.MAX_DEAD_LETTER_ATTEMPTS", 2)
    real_publish = publish.Publisher.publish_encoded
    refused: list[bytes] = []

    def refuse_redeliveries(self, body, **options):
        if (
            "x-redelivery-count" in (options.get("headers") or {})
            and "x-dead-letter-reason" not in options["headers"]
        ):
            refused.append(body)
            raise RuntimeError("refused")
        return real_publish(self, body, **options)

    monkeypatch.setattr(publish.Publisher, "publish_encoded", refuse_redeliveries)
    runner_factory(memory_config, Poisoned).start()
    dispatch = event_dispatcher(memory_config)
    dispatch("source", "boom", {"id": "stuck"})
    dispatch.close()
    source_queue = "evt-source-boom--poisoned.on_boom"
    letters: list = []
    wait_for(
        lambda: letters.extend(deadletters.peek(memory_config, source_queue)) or letters
    )
    (letter,) = letters
    assert letter.reason == "could not be redelivered: RuntimeError"
    assert len(refused) == 2 and len(attempts) == 2


@pytest.mark.integration
def test_publisher_and_dispatcher_exchanges_are_declared_at_setup(
    rabbit_config, container_factory
):
    from framework.events import EventDispatcher

    class Announcer:
        name = "announcer"
        publish = Publisher(exchange=kombu.Exchange("announcements", type="fanout"))
        dispatch = EventDispatcher()

        @rpc
        def noop(self):
            pass

    container = container_factory(Announcer, rabbit_config)
    container.start()
    # nothing published yet: a passive declare fails on a missing exchange
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        channel = connection.channel()
        for name in ("announcements", "announcer.events"):
            channel.exchange_declare(name, "", passive=True)


def lonely_publisher(rabbit_config: dict) -> tuple[Mock, Publisher]:
    """A Publisher bound to a mock container and set up on its own, as nameko's
    tests do: its shared ContainerPublisher is bound but never set up. The
    container is returned too: the provider holds it only weakly."""
    container = Mock(
        config=rabbit_config,
        service_name="lonely",
        shared_extensions={},
        serializer="json",
    )
    sink = kombu.Queue(
        "lonely-sink", exchange=kombu.Exchange("lonely"), routing_key="note"
    )
    provider = Publisher(queue=sink).bind(container, "publish")
    provider.setup()
    return container, provider


@pytest.mark.integration
def test_a_publisher_bound_and_set_up_on_its_own_publishes(
    rabbit_config, get_message_from_queue
):
    # nameko's tests bind a provider to a mock container and set up only it: its
    # shared ContainerPublisher is bound but never set up.
    _container, provider = lonely_publisher(rabbit_config)
    try:
        provider.get_dependency(Mock(context_data={}))("hello", routing_key="note")
    finally:
        provider.container_publisher.stop()

    assert get_message_from_queue("lonely-sink").payload == "hello"


@pytest.mark.integration
def test_a_context_value_of_none_is_left_out_of_the_headers_with_a_warning(
    rabbit_config, get_message_from_queue
):
    _container, provider = lonely_publisher(rabbit_config)
    worker_ctx = Mock(context_data={"language": "en", "customheader": None})
    try:
        with pytest.warns(UserWarning, match="customheader"):
            publish = provider.get_dependency(worker_ctx)
        publish("hello", routing_key="note")
    finally:
        provider.container_publisher.stop()

    assert get_message_from_queue("lonely-sink").headers == {"nameko.language": "en"}
