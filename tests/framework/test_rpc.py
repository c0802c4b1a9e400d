"""RPC against the real broker: behaviour, timeouts, and nameko's wire format."""

from __future__ import annotations

import json
import logging
import uuid
from unittest.mock import patch

import kombu
import pytest

from framework import concurrency
from framework.exceptions import (
    ContainerBeingKilled,
    IncorrectSignature,
    MalformedRequest,
    MethodNotFound,
    ProxyUsedAcrossThreads,
    RemoteError,
    RpcTimeout,
    UnknownService,
    UnserializableValueError,
    deserialize_to_instance,
)
from framework.logs import JsonFormatter, TextFormatter
from framework.rpc import ClusterRpc, Rpc, RpcConsumer, RpcProxy, ServiceRpc, rpc
from framework.standalone.rpc import ClusterRpcProxy, ServiceRpcProxy
from framework.testing.services import (
    entrypoint_hook,
    get_extension,
    restrict_entrypoints,
)
from tests.helpers import wait_for


@deserialize_to_instance
class OutOfStock(Exception):
    pass


release = concurrency.Event()
PASSWORD = "correct horse battery staple"
DRIVER_ERROR = "INSERT failed, parameters: {!r}, {!r}"


class Greeter:
    name = "greeter"

    @rpc
    def hello(self, name, punctuation="!"):
        return f"Hello, {name}{punctuation}"

    @rpc
    def echo(self, *args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    @rpc(expected_exceptions=OutOfStock)
    def buy(self):
        raise OutOfStock("none left")

    @rpc
    def fail(self):
        raise ValueError("bad name")

    @rpc(expected_exceptions=ValueError)
    def refuse(self):
        raise ValueError("bad name")

    @rpc(sensitive_arguments="password")
    def store(self, email, password):
        # As a driver's error would: the statement's parameters in its message.
        raise ValueError(DRIVER_ERROR.format(email, password))

    @rpc
    def unserializable(self):
        return object()

    @rpc
    def sleep(self, seconds):
        concurrency.sleep(seconds)
        return seconds

    @rpc
    def too_deep(self):
        # json's encoder raises RecursionError (not an encode error) on this
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        return nested


class Gateway:
    name = "gateway"
    greeter = RpcProxy("greeter")
    impatient = ServiceRpc("greeter", timeout=0.3)
    cluster = ClusterRpc()

    @rpc
    def relay(self, name):
        return self.greeter.hello(name)

    @rpc
    def relay_cluster(self, name):
        return self.cluster.greeter.hello(name)

    @rpc
    def relay_sleep(self, seconds):
        return self.greeter.sleep(seconds)

    @rpc
    def relay_slow(self, seconds):
        return self.impatient.sleep(seconds)

    @rpc
    def relay_with_timeout(self, seconds, timeout):
        return self.greeter.sleep.with_timeout(timeout)(seconds)

    @rpc
    def relay_async(self, names):
        replies = [self.greeter.hello.call_async(name) for name in names]
        return [reply.result() for reply in replies]


@pytest.fixture
def services(rabbit_config, runner_factory):
    runner = runner_factory(rabbit_config, Greeter, Gateway)
    runner.start()
    return runner


@pytest.fixture
def proxy(rabbit_config, services):
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        yield cluster


def test_standalone_proxy_calls_a_service(proxy):
    assert proxy.greeter.hello("Matt") == "Hello, Matt!"
    assert proxy["greeter"].hello("Matt", punctuation="?") == "Hello, Matt?"


def test_unicode_and_nested_payloads_round_trip(proxy):
    payload = {"ключ": ["ü", {"n": 1, "f": 1.5, "none": None, "list": [True, False]}]}
    assert proxy.greeter.echo("日本", payload, k=payload) == {
        "args": ["日本", payload],
        "kwargs": {"k": payload},
    }


def test_call_async_returns_replies_in_any_order(proxy):
    replies = [proxy.greeter.hello.call_async(str(i)) for i in range(20)]
    assert [r.result() for r in reversed(replies)] == [
        f"Hello, {i}!" for i in reversed(range(20))
    ]


def test_service_to_service_calls(proxy):
    assert proxy.gateway.relay("Ann") == "Hello, Ann!"
    assert proxy.gateway.relay_cluster("Bo") == "Hello, Bo!"
    assert proxy.gateway.relay_async(["a", "b", "c"]) == [
        "Hello, a!",
        "Hello, b!",
        "Hello, c!",
    ]


def test_expected_plain_exception_arrives_as_remote_error_with_its_message(proxy):
    with pytest.raises(RemoteError) as info:
        proxy.greeter.refuse()
    assert info.value.exc_type == "ValueError"
    assert info.value.value == "bad name"


def test_unexpected_exception_arrives_as_its_type_and_call_id_only(proxy, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RemoteError) as info:
        proxy.greeter.fail()
    assert info.value.exc_type == "ValueError"
    assert "bad name" not in str(info.value)
    (error_record,) = [
        r for r in caplog.records if r.getMessage() == "error handling worker"
    ]
    assert error_record.call_id.startswith("greeter.fail.")
    assert error_record.call_id in info.value.value


def test_a_password_in_a_failing_call_reaches_no_caller_and_no_log_line(proxy, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RemoteError) as info:
        proxy.greeter.store("ann@example.com", PASSWORD)

    assert PASSWORD not in repr(info.value.__dict__) + str(info.value)
    wait_for(lambda: any(r.getMessage() == "worker finished" for r in caplog.records))
    for formatter in (JsonFormatter(), TextFormatter()):
        for record in caplog.records:
            if record.exc_info:
                record.exc_text = None  # each formatter renders the traceback anew
            line = formatter.format(record)
            assert PASSWORD not in line and "INSERT failed" not in line, line


def test_registered_exception_is_rebuilt_as_instance(proxy):
    with pytest.raises(OutOfStock, match="none left"):
        proxy.greeter.buy()


def test_unknown_method_and_bad_signature_are_rebuilt(proxy):
    with pytest.raises(MethodNotFound, match="nope"):
        proxy.greeter.nope()
    with pytest.raises(IncorrectSignature):
        proxy.greeter.hello()


def test_unknown_service_fails_fast(proxy):
    with pytest.raises(UnknownService, match="Unknown service `nobody`"):
        proxy.nobody.anything()


def test_unserializable_result_becomes_an_error_reply(proxy):
    # As in nameko, the error is not registered: it arrives as a RemoteError.
    with pytest.raises(RemoteError) as info:
        proxy.greeter.unserializable()
    assert info.value.exc_type == UnserializableValueError.__name__
    assert info.value.value == "Unserializable value: `<object>`"
    assert proxy.greeter.hello("still serving") == "Hello, still serving!"


def test_standalone_timeout_raises_and_late_reply_is_dropped(
    rabbit_config, services, caplog
):
    caplog.set_level(logging.DEBUG, logger="framework.standalone.rpc")

    def dropped(correlation_id):
        return any(
            r.getMessage() == "dropping a reply nobody waits for"
            and r.correlation_id == correlation_id
            for r in caplog.records
        )

    with ClusterRpcProxy(rabbit_config, timeout=0.2) as cluster:
        late = cluster.greeter.sleep.call_async(0.6)
        with pytest.raises(RpcTimeout):
            late.result()
        # Replies are read by whoever waits: keep calling until the late one
        # has come in, and was dropped rather than handed to its old waiter.
        wait_for(
            lambda: (
                cluster.greeter.hello("after") == "Hello, after!"
                and dropped(late.correlation_id)
            )
        )
        assert not late.reply_event.ready()
        with pytest.raises(RpcTimeout):
            late.result()


def test_call_async_timeouts_run_from_the_call_not_from_each_result(rabbit_config):
    # A service that is down: its queue exists, nobody consumes it.
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        exchange = kombu.Exchange("nameko-rpc", type="topic", durable=True)
        queue = kombu.Queue("rpc-down", exchange, routing_key="down.*", durable=True)
        queue(connection.channel()).declare()
    with ClusterRpcProxy(rabbit_config, timeout=1) as cluster:
        pending = [cluster.down.method.call_async(i) for i in range(20)]
        # Restarting the timeout at each result() would take 20 s.
        with concurrency.Timeout(8):
            for reply in pending:
                with pytest.raises(RpcTimeout):
                    reply.result()


def test_a_standalone_proxy_used_from_another_os_thread_fails_fast(
    rabbit_config, services
):
    outcome: list[BaseException | str] = []

    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        assert cluster.greeter.hello("owner") == "Hello, owner!"
        pending = cluster.greeter.hello.call_async("waited elsewhere")

        def other_thread():
            for attempt in (
                lambda: cluster.greeter.hello("other"),
                pending.result,
            ):
                try:
                    outcome.append(repr(attempt()))
                except BaseException as exc:
                    outcome.append(exc)

        thread = concurrency.start_os_thread(other_thread, name="second-caller")
        thread.join(10)
        assert not thread.is_alive()
        assert [type(item) for item in outcome] == [ProxyUsedAcrossThreads] * 2
        assert "give each thread its own proxy" in str(outcome[0])
        assert pending.result() == "Hello, waited elsewhere!"
        assert cluster.greeter.hello("owner") == "Hello, owner!"


def test_per_call_timeout_overrides_the_proxy_default(rabbit_config, services):
    with ServiceRpcProxy("greeter", rabbit_config) as greeter:
        with pytest.raises(RpcTimeout):
            greeter.sleep.with_timeout(0.2)(0.6)
        assert greeter.sleep.with_timeout(5)(0.1) == 0.1


def test_in_service_rpc_times_out_per_proxy_and_per_call(proxy):
    with pytest.raises(RpcTimeout):
        proxy.gateway.relay_slow(1)
    with pytest.raises(RpcTimeout):
        proxy.gateway.relay_with_timeout(1, 0.2)
    assert proxy.gateway.relay_with_timeout(0.05, 5) == 0.05


def test_rpc_timeout_default_comes_from_config(rabbit_config, runner_factory):
    config = {**rabbit_config, "RPC_TIMEOUT": 0.2}
    runner_factory(config, Greeter, Gateway).start()
    with ClusterRpcProxy(config) as cluster:
        with pytest.raises(RpcTimeout):
            cluster.greeter.sleep(1)
        # the in-service proxy of gateway inherits the configured default too
        with pytest.raises(RpcTimeout):
            cluster.gateway.relay_sleep.with_timeout(5)(1)


def test_entrypoint_hook_reaches_rpc_methods(rabbit_config, container_factory):
    container = container_factory(Greeter, rabbit_config)
    container.start()
    with entrypoint_hook(container, "hello") as hello:
        assert hello("hook") == "Hello, hook!"


# -- wire format ------------------------------------------------------------------------


def test_rpc_entities_are_declared_exactly_as_nameko_declares_them(
    rabbit_config, services, rabbit_manager
):
    vhost = rabbit_config["vhost"]
    exchange = rabbit_manager.get_exchange(vhost, "nameko-rpc")
    assert (exchange["type"], exchange["durable"], exchange["auto_delete"]) == (
        "topic",
        True,
        False,
    )
    queue = rabbit_manager.get_queue(vhost, "rpc-greeter")
    assert (
        queue["durable"] is True
        and queue["auto_delete"] is False
        and queue["exclusive"] is False
    )
    assert queue["arguments"] == {}
    bindings = [
        b
        for b in rabbit_manager.get_queue_bindings(vhost, "rpc-greeter")
        if b["source"] == "nameko-rpc"
    ]
    assert [b["routing_key"] for b in bindings] == ["greeter.*"]
    reply_queues = [
        q
        for q in rabbit_manager.get_queues(vhost)
        if q["name"].startswith("rpc.reply-gateway-")
    ]
    assert len(reply_queues) == 1
    assert reply_queues[0]["arguments"] == {"x-expires": 300000}
    reply_key = reply_queues[0]["name"].removeprefix("rpc.reply-gateway-")
    reply_bindings = [
        b
        for b in rabbit_manager.get_queue_bindings(vhost, reply_queues[0]["name"])
        if b["source"] == "nameko-rpc"
    ]
    assert [b["routing_key"] for b in reply_bindings] == [reply_key]
    uuid.UUID(reply_key)


def test_request_and_reply_messages_match_nameko_on_the_wire(
    rabbit_config, services, spy
):
    wire = spy("nameko-rpc")
    with ClusterRpcProxy(
        rabbit_config, context_data={"language": "fr"}, timeout=5
    ) as cluster:
        assert cluster.greeter.hello("Matt") == "Hello, Matt!"
    request, reply = wire.get(), wire.get()
    if request.delivery_info["routing_key"] != "greeter.hello":
        request, reply = reply, request

    assert request.delivery_info["routing_key"] == "greeter.hello"
    props = request.properties
    assert (
        request.content_type == "application/json"
        and request.content_encoding == "utf-8"
    )
    # Transient by default (nameko sends 2; both are plain AMQP to a peer).
    assert props["delivery_mode"] == 1 and props.get("priority", 0) == 0
    uuid.UUID(props["reply_to"])
    uuid.UUID(props["correlation_id"])
    assert json.loads(request.body) == {"args": ["Matt"], "kwargs": {}}
    headers = request.headers
    assert headers["nameko.language"] == "fr"
    (call_id,) = headers["nameko.call_id_stack"]
    assert call_id.startswith("standalone_rpc_proxy.call.")

    assert reply.delivery_info["routing_key"] == props["reply_to"]
    assert reply.properties["correlation_id"] == props["correlation_id"]
    assert reply.content_type == "application/json"
    assert reply.properties["delivery_mode"] == 1
    assert json.loads(reply.body) == {"result": "Hello, Matt!", "error": None}
    assert not any(key.startswith("nameko.") for key in reply.headers)


def test_rpc_messages_are_persistent_when_configured(
    rabbit_config, runner_factory, spy
):
    config = {
        **rabbit_config,
        "RPC_PERSISTENT_REQUESTS": True,
        "RPC_PERSISTENT_REPLIES": "true",
    }
    runner_factory(config, Greeter).start()
    wire = spy("nameko-rpc")
    with ClusterRpcProxy(config, timeout=5) as cluster:
        assert cluster.greeter.hello("Matt") == "Hello, Matt!"
    messages = [wire.get(), wire.get()]

    assert [m.properties["delivery_mode"] for m in messages] == [2, 2]


def test_error_replies_use_nameko_error_format(rabbit_config, services, spy):
    wire = spy("nameko-rpc", routing_key="#")
    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        with pytest.raises(RemoteError):
            cluster.greeter.fail()
        with pytest.raises(MethodNotFound):
            cluster.greeter.helo()
    bodies = [json.loads(wire.get().body) for _ in range(4)]
    errors = [b["error"] for b in bodies if "error" in b and b["error"]]
    (unexpected,) = [e for e in errors if e["exc_type"] == "ValueError"]
    assert unexpected["exc_path"] == "builtins.ValueError"
    assert unexpected["value"].startswith("unexpected ValueError (correlation id ")
    assert unexpected["exc_args"] == [unexpected["value"]]
    assert {
        "exc_type": "MethodNotFound",
        "exc_path": "nameko.exceptions.MethodNotFound",
        "exc_args": ["helo"],
        "value": "helo",
    } in errors


def test_in_service_calls_carry_the_call_id_stack(rabbit_config, services, spy):
    wire = spy("nameko-rpc", routing_key="greeter.*")
    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        cluster.gateway.relay("x")
    request = wire.get()
    stack = request.headers["nameko.call_id_stack"]
    assert len(stack) == 2
    assert stack[0].startswith("standalone_rpc_proxy.call.")
    assert stack[1].startswith("gateway.relay.")


def test_malformed_request_gets_an_error_reply_and_the_service_keeps_serving(
    rabbit_config, services
):
    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        client = cluster.greeter._client
        reply_event = client._reply_listener.get_reply_event("bad-1")
        client._publish(
            {"no": "args"},
            exchange=client.exchange,
            routing_key="greeter.hello",
            mandatory=True,
            reply_to=client._reply_listener.routing_key,
            correlation_id="bad-1",
        )
        from framework.rpc import RpcReply

        with pytest.raises(MalformedRequest):
            RpcReply(reply_event, "bad-1", 5, client._reply_listener.forget).result()
        assert cluster.greeter.hello("ok") == "Hello, ok!"


def test_graceful_stop_finishes_in_flight_calls_and_acks_them(
    rabbit_config, runner_factory, rabbit_manager
):
    runner = runner_factory(rabbit_config, Greeter)
    runner.start()
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        replies = [cluster.greeter.sleep.call_async(0.5) for _ in range(3)]
        wait_for(lambda: runner.containers[0].active_workers == 3)
        runner.stop()
        assert [r.result() for r in replies] == [0.5, 0.5, 0.5]
    # Every request was acked before the connection closed: none is left to be
    # redelivered (nameko would leave them unacked and process them twice).
    # Exact counts from the broker itself (the management API's are sampled).
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        _, messages, consumers = connection.channel().queue_declare(
            "rpc-greeter", passive=True
        )
    assert (messages, consumers) == (0, 0)


def test_a_cluster_proxy_can_take_another_timeout(proxy):
    with pytest.raises(RpcTimeout):
        proxy.with_timeout(0.2).greeter.sleep(0.6)
    assert proxy.with_timeout(5).greeter.hello("x") == "Hello, x!"


def test_a_request_waiting_at_start_up_can_call_other_services(
    rabbit_config, runner_factory
):
    # The waiting request is delivered as soon as consuming starts; its worker
    # calls greeter, whose reply needs the gateway's reply queue already bound.
    # Which queue was declared first varied from start to start: try several.
    runner_factory(rabbit_config, Greeter).start()
    with ClusterRpcProxy(rabbit_config, timeout=20) as cluster:
        for attempt in range(5):
            gateway = runner_factory(rabbit_config, Gateway)
            gateway.start()
            gateway.stop()
            waiting = [
                cluster.gateway.relay.call_async(f"{attempt}-{i}") for i in range(3)
            ]
            gateway = runner_factory(rabbit_config, Gateway)
            gateway.start()
            assert [reply.result() for reply in waiting] == [
                f"Hello, {attempt}-{i}!" for i in range(3)
            ]
            gateway.stop()


def test_a_result_too_deep_to_serialise_is_an_error_reply_not_a_requeue(proxy):
    with pytest.raises(RemoteError) as info:
        proxy.greeter.too_deep()
    assert info.value.exc_type == UnserializableValueError.__name__
    assert proxy.greeter.hello("still serving") == "Hello, still serving!"


def test_a_standalone_proxy_refuses_calls_after_its_with_block(rabbit_config, services):
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert cluster.greeter.hello("x") == "Hello, x!"
    with pytest.raises(RuntimeError, match="stopped"):
        cluster.greeter.hello("y")


def test_error_replies_are_worker_related_so_a_graceful_stop_waits_for_them(
    rabbit_config, container_factory
):
    container = container_factory(Greeter, rabbit_config)
    container.start()
    with (
        patch.object(
            container, "spawn_worker_related", wraps=container.spawn_worker_related
        ) as related,
        ClusterRpcProxy(rabbit_config, timeout=10) as cluster,
        pytest.raises(MethodNotFound),
    ):
        cluster.greeter.no_such_method()
    assert any(
        call.args[0].__name__ == "handle_result" for call in related.call_args_list
    )


class TwoMethods:
    name = "twomethods"

    @rpc
    def hello(self):
        return "hello"

    @rpc
    def other(self):
        return "other"


def test_a_request_reaching_a_stopping_container_goes_to_another_replica(
    rabbit_config, container_factory, caplog
):
    # nameko's test_rpc_consumer_sharing: while a container stops, a method whose
    # entrypoint already stopped must not answer MethodNotFound (a rolling restart
    # would show callers errors); the request goes back to the queue.
    stopping = container_factory(TwoMethods, rabbit_config)
    stopping.start()
    other = get_extension(stopping, Rpc, method_name="other")
    release = concurrency.Event()
    original_stop = other.stop

    def slow_stop():
        release.wait()
        original_stop()

    other.stop = slow_stop
    caplog.set_level(logging.INFO, logger="framework.rpc")
    concurrency.spawn(stopping.stop)
    consumer = other.rpc_consumer
    wait_for(lambda: "hello" in consumer._retired)
    try:
        with ClusterRpcProxy(rabbit_config, timeout=20) as cluster:
            reply = cluster.twomethods.hello.call_async()
            wait_for(lambda: "goes back to the queue" in caplog.text)
            replacement = container_factory(TwoMethods, rabbit_config)
            replacement.start()
            assert reply.result() == "hello"
    finally:
        release.send(None)


def test_standalone_reply_queues_take_the_ttl_patched_into_framework_rpc():
    with patch("framework.rpc.RPC_REPLY_QUEUE_TTL", new=100):
        proxy = ClusterRpcProxy({"AMQP_URI": "memory://"})
    assert proxy.reply_listener.queue.queue_arguments == {"x-expires": 100}


def test_rpc_consumer_names_the_provider_of_a_routing_key_or_method_not_found(
    rabbit_config, container_factory
):
    container = container_factory(Greeter, rabbit_config)
    consumer = get_extension(container, RpcConsumer)
    container.start()

    provider = consumer.get_provider_for_method("greeter.hello")

    assert (provider.method_name, type(provider)) == ("hello", Rpc)
    with pytest.raises(MethodNotFound):
        consumer.get_provider_for_method("greeter.no_such_method")
    with pytest.raises(MethodNotFound):
        consumer.get_provider_for_method("other_service.hello")


def test_an_rpc_consumer_without_entrypoints_leaves_the_queue_consumer_on_stop(
    rabbit_config, container_factory
):
    container = container_factory(Greeter, rabbit_config)
    restrict_entrypoints(container)  # no @rpc entrypoint registers
    consumer = get_extension(container, RpcConsumer)

    with patch.object(consumer, "queue_consumer") as queue_consumer:
        consumer.stop()

    queue_consumer.unregister_provider.assert_called_once_with(consumer)


def test_a_request_reaching_a_container_being_killed_goes_back_to_the_queue(
    rabbit_config, container_factory
):
    container = container_factory(Greeter, rabbit_config)
    container.start()
    consumer = get_extension(container, RpcConsumer)

    def call():
        with ServiceRpcProxy("greeter", rabbit_config, timeout=20) as greeter:
            return greeter.hello("again")

    with (
        patch.object(container, "spawn_worker", side_effect=ContainerBeingKilled),
        patch.object(
            consumer, "requeue_message", wraps=consumer.requeue_message
        ) as requeued,
    ):
        caller = concurrency.spawn(call)
        wait_for(lambda: requeued.called)
        assert not caller.dead  # given back, not answered with an error

    # the container runs workers again: the request comes back and is answered
    assert caller.wait() == "Hello, again!"
