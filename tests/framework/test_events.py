"""Events against the real broker: handler types, delivery, and the wire format."""

from __future__ import annotations

import json
import socket

import pytest

from framework import concurrency
from framework.containers import ServiceContainer
from framework.events import (
    BROADCAST,
    SERVICE_POOL,
    SINGLETON,
    EventDispatcher,
    EventHandler,
    EventHandlerConfigurationError,
    event_handler,
)
from framework.rpc import rpc
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

handled: list[tuple[str, object]] = []


class Orders:
    name = "orders"
    dispatch = EventDispatcher()

    @rpc
    def create(self, order_id):
        self.dispatch("order_created", {"id": order_id})
        return order_id


def make_handler(service_name: str, handler_type: str = SERVICE_POOL, **options):
    class Handler:
        name = service_name

        @event_handler("orders", "order_created", handler_type=handler_type, **options)
        def on_created(self, payload):
            handled.append((service_name, payload["id"]))

    return Handler


class HostBroadcast(EventHandler):
    """A broadcast identifier that survives restarts, so delivery can be reliable."""

    @property
    def broadcast_identifier(self) -> str:
        return self.container.config["INSTANCE_ID"]


@pytest.fixture(autouse=True)
def clear():
    handled.clear()


def test_service_pool_event_reaches_one_instance_of_each_service(
    rabbit_config, runner_factory
):
    first = runner_factory(
        rabbit_config, Orders, make_handler("billing"), make_handler("shipping")
    )
    second = runner_factory(
        rabbit_config, make_handler("billing"), make_handler("shipping")
    )
    first.start()
    second.start()
    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        for order_id in range(10):
            cluster.orders.create(order_id)
    wait_for(lambda: len(handled) >= 20)
    concurrency.sleep(0.2)
    assert sorted(i for s, i in handled if s == "billing") == list(range(10))
    assert sorted(i for s, i in handled if s == "shipping") == list(range(10))


def test_singleton_event_reaches_one_handler_in_the_cluster(
    rabbit_config, runner_factory
):
    runner_factory(
        rabbit_config, make_handler("a", SINGLETON), make_handler("b", SINGLETON)
    ).start()
    dispatch = event_dispatcher(rabbit_config)
    for order_id in range(6):
        dispatch("orders", "order_created", {"id": order_id})
    wait_for(lambda: len(handled) >= 6)
    concurrency.sleep(0.2)
    assert sorted(i for _, i in handled) == list(range(6))
    dispatch.close()


def test_broadcast_event_reaches_every_instance(rabbit_config, runner_factory):
    handler = make_handler("watcher", BROADCAST, reliable_delivery=False)
    runner_factory(rabbit_config, handler).start()
    runner_factory(rabbit_config, handler).start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("orders", "order_created", {"id": 1})
    wait_for(lambda: len(handled) >= 2)
    assert handled == [("watcher", 1), ("watcher", 1)]
    dispatch.close()


def test_default_broadcast_identifier_refuses_reliable_delivery():
    with pytest.raises(EventHandlerConfigurationError):
        ServiceContainer(make_handler("x", BROADCAST), {})


def test_reliable_broadcast_with_a_stable_identifier(
    rabbit_config, runner_factory, rabbit_manager
):
    class Watcher:
        name = "stable_watcher"

        @HostBroadcast.decorator("orders", "order_created", handler_type=BROADCAST)
        def on_created(self, payload):
            handled.append(("stable", payload["id"]))

    runner_factory(
        {**rabbit_config, "INSTANCE_ID": socket.gethostname()}, Watcher
    ).start()
    name = f"evt-orders-order_created--stable_watcher.on_created-{socket.gethostname()}"
    queue = rabbit_manager.get_queue(rabbit_config["vhost"], name)
    assert queue["durable"] and not queue["auto_delete"] and not queue["exclusive"]


def test_event_queues_are_named_and_flagged_as_nameko_does(
    rabbit_config, runner_factory, rabbit_manager
):
    runner_factory(
        rabbit_config,
        Orders,
        make_handler("pool"),
        make_handler("single", SINGLETON),
        make_handler("everyone", BROADCAST, reliable_delivery=False),
        make_handler("unreliable", SERVICE_POOL, reliable_delivery=False),
    ).start()
    vhost = rabbit_config["vhost"]
    exchange = rabbit_manager.get_exchange(vhost, "orders.events")
    assert (exchange["type"], exchange["durable"], exchange["auto_delete"]) == (
        "topic",
        True,
        False,
    )

    queues = {q["name"]: q for q in rabbit_manager.get_queues(vhost)}
    pool = queues["evt-orders-order_created--pool.on_created"]
    assert (
        pool["durable"],
        pool["auto_delete"],
        pool["exclusive"],
        pool["arguments"],
    ) == (True, False, False, {})
    single = queues["evt-orders-order_created"]
    assert (single["durable"], single["auto_delete"], single["exclusive"]) == (
        True,
        False,
        False,
    )
    unreliable = queues["evt-orders-order_created--unreliable.on_created"]
    assert (unreliable["durable"], unreliable["auto_delete"]) == (True, True)
    (broadcast,) = [
        n
        for n in queues
        if n.startswith("evt-orders-order_created--everyone.on_created-")
    ]
    assert (queues[broadcast]["auto_delete"], queues[broadcast]["exclusive"]) == (
        True,
        True,
    )
    for name in (pool["name"], single["name"], broadcast):
        bindings = [
            b
            for b in rabbit_manager.get_queue_bindings(vhost, name)
            if b["source"] == "orders.events"
        ]
        assert [b["routing_key"] for b in bindings] == ["order_created"]


def test_event_messages_match_nameko_on_the_wire(rabbit_config, runner_factory, spy):
    runner_factory(rabbit_config, Orders).start()
    wire = spy("orders.events")
    with ClusterRpcProxy(
        rabbit_config, context_data={"language": "en"}, timeout=5
    ) as cluster:
        cluster.orders.create(7)
    message = wire.get()
    assert message.delivery_info["routing_key"] == "order_created"
    assert json.loads(message.body) == {"id": 7}
    assert message.content_type == "application/json"
    assert message.properties["delivery_mode"] == 2
    assert message.headers["nameko.language"] == "en"
    stack = message.headers["nameko.call_id_stack"]
    assert stack[0].startswith("standalone_rpc_proxy.call.") and stack[1].startswith(
        "orders.create."
    )


def test_standalone_dispatcher_sends_context_headers(
    rabbit_config, runner_factory, spy
):
    wire = spy("orders.events")
    dispatch = event_dispatcher(rabbit_config, context_data={"user_id": "u1"})
    dispatch("orders", "order_created", {"id": 1})
    message = wire.get()
    assert message.headers["nameko.user_id"] == "u1"
    (call_id,) = message.headers["nameko.call_id_stack"]
    assert call_id.startswith("standalone_event_dispatcher.dispatch.")
    dispatch.close()


def test_standalone_dispatcher_ignores_an_exchange_or_routing_key_it_is_given(
    rabbit_config, spy
):
    # the dispatch names where an event goes, as in nameko
    wire = spy("orders.events")
    dispatch = event_dispatcher(
        rabbit_config, exchange="elsewhere", routing_key="other", priority=3
    )
    try:
        dispatch("orders", "order_created", {"id": 1})
    finally:
        dispatch.close()
    message = wire.get()
    assert message.delivery_info["routing_key"] == "order_created"
    assert message.properties["priority"] == 3


def test_handler_gets_context_data_from_the_event(rabbit_config, runner_factory):
    seen: list[dict] = []

    class Auditor:
        name = "auditor"

        @event_handler("orders", "order_created")
        def on_created(self, payload):
            pass

    from framework.testing.services import entrypoint_waiter

    runner = runner_factory(rabbit_config, Auditor)
    runner.start()
    container = runner.containers[0]
    dispatch = event_dispatcher(rabbit_config, context_data={"language": "de"})
    with entrypoint_waiter(container, "on_created", timeout=5) as result:
        dispatch("orders", "order_created", {"id": 3})
    seen.append(result.worker_ctx.data)
    assert seen[0]["language"] == "de"
    assert result.worker_ctx.call_id_stack[0].startswith(
        "standalone_event_dispatcher.dispatch."
    )
    dispatch.close()


def test_events_wait_in_reliable_queues_while_the_handler_is_down(
    rabbit_config, runner_factory
):
    runner = runner_factory(rabbit_config, make_handler("late"))
    runner.start()
    runner.stop()
    dispatch = event_dispatcher(rabbit_config)
    for order_id in range(3):
        dispatch("orders", "order_created", {"id": order_id})
    runner_factory(rabbit_config, make_handler("late")).start()
    wait_for(lambda: len(handled) >= 3)
    assert sorted(i for _, i in handled) == [0, 1, 2]
    dispatch.close()


class RecordingHandler(EventHandler):
    """An event handler subclass that keeps the messages it handles."""

    messages: list[object] = []

    def handle_message(self, body: object, message: object) -> None:
        RecordingHandler.messages.append(message)
        super().handle_message(body, message)  # type: ignore[arg-type]


class PayloadReader:
    name = "payload_reader"

    @RecordingHandler.decorator("source", "happened")
    def on_happened(self, payload: dict[str, object]) -> None:
        pass


def test_a_handled_message_s_payload_is_its_decoded_body(
    container_factory, rabbit_config
):
    from framework.testing.services import entrypoint_waiter

    RecordingHandler.messages.clear()
    container = container_factory(PayloadReader, rabbit_config)
    container.start()

    with entrypoint_waiter(container, "on_happened", timeout=5):
        event_dispatcher(rabbit_config)("source", "happened", {"custom": "data"})

    (message,) = RecordingHandler.messages
    assert message.payload == {"custom": "data"}  # type: ignore[attr-defined]
