"""The confirm-mode publisher shared by many green threads (real broker)."""

from __future__ import annotations

import kombu
import pytest

from framework import concurrency
from framework.amqp.publish import Publisher
from framework.exceptions import UndeliverableMessage


@pytest.fixture
def publisher(rabbit_config):
    instance = Publisher(rabbit_config)
    yield instance
    instance.close()


def test_every_concurrent_publish_is_confirmed(publisher):
    # 20 green threads share one channel; confirms arrive batched and out of
    # turn. This lost confirm frames when a hidden read in py-amqp's
    # basic_publish raced the thread draining the connection. Unroutable
    # messages are confirmed fastest, which is what exposed the race.
    def publish_many(worker: int) -> int:
        for n in range(1000):
            publisher.publish(
                {"w": worker, "n": n}, routing_key="nowhere", timeout=5, retry=False
            )
        return worker

    threads = [concurrency.spawn(publish_many, w) for w in range(20)]
    assert sorted(t.wait() for t in threads) == list(range(20))
    assert publisher._pending == {}


def test_unroutable_mandatory_publish_raises(publisher):
    with pytest.raises(UndeliverableMessage):
        publisher.publish(
            {"x": 1}, routing_key="nobody-listens", mandatory=True, retry=False
        )
    publisher.publish(
        {"x": 1}, routing_key="nobody-listens", retry=False
    )  # not mandatory: dropped


def test_messages_keep_nameko_properties(
    publisher, rabbit_config, get_message_from_queue
):
    queue = kombu.Queue("props", durable=True)
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        queue.bind(connection.default_channel).declare()
    publisher.publish(
        {"ü": 1},
        routing_key="props",
        headers={"nameko.language": "en"},
        correlation_id="c1",
    )
    message = get_message_from_queue("props")
    assert (
        message.content_type == "application/json"
        and message.content_encoding == "utf-8"
    )
    assert message.properties["delivery_mode"] == 2
    assert message.properties["correlation_id"] == "c1"
    assert message.headers == {"nameko.language": "en"}
    assert message.payload == {"ü": 1}


@pytest.mark.integration
def test_nameko_helpers_give_a_confirming_producer_and_a_connection(rabbit_config):
    from framework.amqp import UndeliverableMessage as exported
    from framework.amqp.publish import get_connection, get_producer

    assert exported is UndeliverableMessage
    uri = rabbit_config["AMQP_URI"]
    with get_connection(uri) as connection:
        kombu.Queue("helpers", channel=connection.default_channel).declare()
    with get_producer(uri) as producer:
        assert producer.connection.transport_options["confirm_publish"] is True
        producer.publish({"n": 1}, routing_key="helpers", serializer="json")
    with get_connection(uri) as connection:
        message = kombu.Queue("helpers", channel=connection.default_channel).get()
        assert message is not None and message.payload == {"n": 1}


@pytest.mark.integration
def test_nameko_style_constructor_options_are_defaults_and_headers_merge(rabbit_config):
    uri = rabbit_config["AMQP_URI"]
    with kombu.Connection(uri) as connection:
        kombu.Queue("styled", channel=connection.default_channel).declare()
    publisher = Publisher(
        uri, priority=3, serializer="pickle", headers={"a": 1, "b": 1}
    )
    try:
        publisher.publish(
            {"n": 1}, routing_key="styled", headers={"b": 2}, extra_headers={"c": 3}
        )
        publisher.publish({"n": 2}, routing_key="styled", priority=7)
    finally:
        publisher.close()
    with kombu.Connection(uri) as connection:
        queue = kombu.Queue("styled", channel=connection.default_channel)
        first, second = queue.get(accept=["pickle"]), queue.get(accept=["pickle"])
    assert (
        first.payload == {"n": 1}
        and first.content_type == "application/x-python-serialize"
    )
    assert first.headers == {"a": 1, "b": 2, "c": 3}
    assert first.properties["priority"] == 3
    assert second.properties["priority"] == 7
