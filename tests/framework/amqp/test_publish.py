"""The confirm-mode publisher shared by many green threads (real broker)."""

from __future__ import annotations

import amqp.exceptions
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


@pytest.fixture
def named_queue(rabbit_config):
    """A queue bound to the default exchange under its name, emptied by the test."""

    def declare(name: str) -> kombu.Queue:
        with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
            kombu.Queue(name, channel=connection.default_channel).declare()
        return kombu.Queue(name)

    return declare


def get_message(rabbit_config, queue_name: str, **options):
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        queue = kombu.Queue(queue_name, channel=connection.default_channel)
        return queue.get(no_ack=True, **options)


@pytest.mark.integration
def test_a_message_the_broker_refuses_raises_its_error_and_the_next_publish_goes(
    publisher, rabbit_config, named_queue
):
    named_queue("refused")

    # The broker closes the channel over a user_id that is not the connection's:
    # that publish raises the broker's own error, once, without retrying it.
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        publisher.publish({"n": 1}, routing_key="refused", user_id="somebody-else")
    with pytest.raises(amqp.exceptions.NotFound):
        publisher.publish({"n": 2}, exchange="no-such-exchange", routing_key="x")
    publisher.publish(
        {"n": 3}, routing_key="refused", user_id=rabbit_config["username"]
    )

    message = get_message(rabbit_config, "refused")
    assert message.payload == {"n": 3}
    assert get_message(rabbit_config, "refused") is None


@pytest.mark.integration
def test_a_body_with_a_content_type_is_sent_as_given(
    publisher, rabbit_config, named_queue
):
    named_queue("raw")
    gif = b"GIF89a\x01\x00\x01\x00\x00\xff\x00,"

    publisher.publish(gif, routing_key="raw", content_type="image/gif")
    publisher.publish(
        "é".encode("utf-16"),
        routing_key="raw",
        content_type="text/plain",
        content_encoding="utf-16",
    )
    publisher.publish("é", routing_key="raw", content_type="text/plain")

    first, second, third = (get_message(rabbit_config, "raw") for _ in range(3))
    assert (first.body, first.content_encoding) == (gif, "binary")
    assert (second.payload, second.content_encoding) == ("é", "utf-16")
    assert (third.payload, third.content_encoding) == ("é", "utf-8")
    with pytest.raises(TypeError, match="leave content_type out"):
        publisher.publish({"n": 1}, routing_key="raw", content_type="image/gif")


@pytest.mark.integration
def test_mandatory_without_confirms_warns_and_drops_an_unroutable_message(publisher):
    with pytest.warns(UserWarning, match="mandatory delivery needs publisher"):
        publisher.publish(
            {"x": 1}, routing_key="nobody-listens", mandatory=True, use_confirms=False
        )
    # the channel's confirms still match: the next mandatory publish raises
    with pytest.raises(UndeliverableMessage):
        publisher.publish({"x": 2}, routing_key="nobody-listens", mandatory=True)


@pytest.mark.integration
def test_publish_defaults_read_and_set_as_attributes(rabbit_config, named_queue):
    named_queue("declared-by-constructor")
    publisher = Publisher(
        rabbit_config["AMQP_URI"],
        declare=[kombu.Queue("declared-by-constructor")],
    )
    try:
        assert publisher.mandatory is False
        assert publisher.retry_policy["max_retries"] >= 1
        publisher.mandatory = True
        with pytest.raises(UndeliverableMessage):
            publisher.publish({"x": 1}, routing_key="nobody-listens")

        # declare lists add up: the constructor's and the call's
        publisher.publish(
            {"x": 2},
            routing_key="declared-by-call",
            declare=[kombu.Queue("declared-by-call", auto_delete=False)],
        )
    finally:
        publisher.close()
    assert get_message(rabbit_config, "declared-by-call").payload == {"x": 2}
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        connection.default_channel.queue_delete("declared-by-call")


@pytest.mark.integration
def test_exchange_none_is_the_default_exchange(publisher, rabbit_config, named_queue):
    named_queue("by-name")

    publisher.publish({"n": 1}, exchange=None, routing_key="by-name")

    assert get_message(rabbit_config, "by-name").payload == {"n": 1}
