from __future__ import annotations

import socket
from functools import partial
from unittest.mock import Mock

import kombu
import pytest
import requests

from framework import concurrency
from framework.containers import WorkerContext
from framework.extensions import DependencyProvider, Entrypoint
from framework.testing.services import dummy, entrypoint_hook, once
from framework.testing.utils import (
    ANY_PARTIAL,
    AnyInstanceOf,
    ConstantDependency,
    DummyProvider,
    ResourcePipeline,
    assert_stops_raising,
    find_free_port,
    get_container,
    get_extension,
    get_rabbit_connections,
    reset_rabbit_connections,
    unpack_mock_call,
    wait_for_call,
    wait_for_worker_idle,
)


class Settings(DependencyProvider):
    pass


class Catalogue:
    name = "catalogue"

    settings = Settings()
    answer = ConstantDependency(42)

    @dummy
    def lookup(self):
        return self.answer

    @once
    def warm_up(self):
        pass


class Basket:
    name = "basket"


# -- finding things -----------------------------------------------------------------


def test_get_extension_finds_by_class_and_attributes(container_factory):
    container = container_factory(Catalogue)

    lookup = get_extension(container, Entrypoint, method_name="lookup")
    assert lookup.method_name == "lookup"
    assert get_extension(container, Settings).attr_name == "settings"
    assert get_extension(container, ConstantDependency, attr_name="answer").value == 42


def test_get_extension_returns_none_when_nothing_matches(container_factory):
    container = container_factory(Catalogue)

    assert get_extension(container, Entrypoint, method_name="nonexistent") is None
    assert get_extension(container, Settings, no_such_attribute=1) is None


def test_get_container_finds_the_container_of_a_service_class(runner_factory):
    runner = runner_factory({}, Catalogue, Basket)

    assert get_container(runner, Catalogue).service_cls is Catalogue
    assert get_container(runner, Basket).service_cls is Basket
    assert get_container(runner, object) is None


def test_dummy_provider_injects_its_value(container_factory):
    container = container_factory(Catalogue)
    container.start()

    with entrypoint_hook(container, "lookup") as lookup:
        assert lookup() == 42


# -- waiting --------------------------------------------------------------------------


def test_wait_for_call_yields_the_mock_once_it_was_called():
    mock = Mock()
    concurrency.spawn_after(0.01, mock.method, "arg")

    with wait_for_call(5, mock.method) as method:
        method.assert_called_once_with("arg")


def test_wait_for_call_times_out_if_the_mock_is_never_called():
    mock = Mock()
    with pytest.raises(concurrency.Timeout):
        with wait_for_call(0.01, mock.method):
            pass  # pragma: no cover


def test_assert_stops_raising_returns_once_the_function_succeeds():
    attempts = []

    def ready():
        attempts.append(1)
        assert len(attempts) >= 3, "not ready yet"
        return "ready"

    assert (
        assert_stops_raising(ready, AssertionError, timeout=5, interval=0.001)
        == "ready"
    )
    assert len(attempts) == 3


def test_assert_stops_raising_times_out_chained_to_the_last_error():
    def never():
        raise ValueError("still broken")

    with pytest.raises(concurrency.Timeout) as exc_info:
        assert_stops_raising(never, ValueError, timeout=0.02, interval=0.001)
    assert isinstance(exc_info.value.__cause__, ValueError)


def test_assert_stops_raising_lets_other_exceptions_through():
    def wrong():
        raise KeyError("not the awaited kind")

    with pytest.raises(KeyError):
        assert_stops_raising(wrong, ValueError, timeout=5)


def test_wait_for_worker_idle_is_deprecated_but_waits_for_running_workers(
    container_factory,
):
    gate = concurrency.Event()
    finished = []

    class Slow:
        name = "slow"

        @dummy
        def work(self):
            gate.wait()
            finished.append(True)

    container = container_factory(Slow)
    container.start()
    container.spawn_worker(get_extension(container, Entrypoint), (), {})
    concurrency.spawn(gate.send)

    with pytest.warns(DeprecationWarning):
        wait_for_worker_idle(container, timeout=5)
    assert finished == [True]


# -- matching -------------------------------------------------------------------------


def test_any_instance_of_equals_instances_of_its_class_only():
    assert "text" == AnyInstanceOf(str)
    assert 99 != AnyInstanceOf(str)
    assert Basket() == AnyInstanceOf(object)
    assert Basket == AnyInstanceOf(type)
    # not a class: equal to nothing, rather than a TypeError
    assert Basket() != AnyInstanceOf(Basket())
    assert repr(AnyInstanceOf(str)) == "<AnyInstanceOf-str>"


def test_any_instance_of_matches_mock_call_arguments():
    callback = Mock()
    callback(partial(print, 1), 3.5)
    callback.assert_called_once_with(ANY_PARTIAL, AnyInstanceOf(float))


# -- ports ----------------------------------------------------------------------------


def test_find_free_port_returns_a_port_that_can_be_listened_on():
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


# -- ResourcePipeline ----------------------------------------------------------------------


class Counters:
    def __init__(self) -> None:
        self.created: list[int] = []
        self.destroyed: list[int] = []

    def create(self) -> int:
        self.created.append(len(self.created))
        return self.created[-1]

    def destroy(self, item: int) -> None:
        self.destroyed.append(item)


def test_resource_pipeline_prepares_resources_ahead_up_to_its_size():
    counters = Counters()
    with ResourcePipeline(counters.create, counters.destroy, size=2).run() as pipeline:

        def two_ready():
            assert counters.created == [0, 1]

        assert_stops_raising(two_ready, AssertionError, timeout=5, interval=0.001)
        assert pipeline.ready.qsize() == 2  # nameko's tests read the public queue
        assert pipeline.get() == 0
        assert pipeline.get() == 1


def test_resource_pipeline_destroys_discarded_and_unused_resources():
    counters = Counters()
    with ResourcePipeline(counters.create, counters.destroy, size=2).run() as pipeline:
        first = pipeline.get()
        pipeline.discard(first)

        def destroyed_first():
            assert counters.destroyed == [first]

        assert_stops_raising(destroyed_first, AssertionError, timeout=5, interval=0.001)

    # on shutdown, the ones made ahead and never handed out are destroyed too
    assert sorted(counters.destroyed) == sorted(counters.created)


def test_resource_pipeline_get_raises_the_error_of_a_failed_create():
    def create():
        raise ConnectionRefusedError("backend down")

    with ResourcePipeline(create, lambda item: None).run() as pipeline:
        with pytest.raises(ConnectionRefusedError, match="backend down"):
            pipeline.get()


@pytest.mark.parametrize("expected", [ValueError, RuntimeError])
def test_resource_pipeline_needs_room_for_a_resource(expected):
    # RuntimeError is what nameko raised, ValueError what a bad argument is
    with pytest.raises(expected, match="at least one ready resource"):
        ResourcePipeline(lambda: 1, lambda item: None, size=0)


# -- RabbitMQ connections --------------------------------------------------------------


@pytest.mark.integration
def test_rabbit_connections_of_a_vhost_are_listed_and_reset(
    rabbit_config, rabbit_manager
):
    vhost = rabbit_config["vhost"]
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        connection.connect()

        def listed():
            assert len(get_rabbit_connections(vhost, rabbit_manager)) == 1

        assert_stops_raising(listed, AssertionError, timeout=10)

        reset_rabbit_connections(vhost, rabbit_manager)

        # The broker closes the connection and waits for the client to confirm;
        # the client learns of it on its next use.
        with pytest.raises(connection.connection_errors):
            connection.default_channel.queue_declare("probe", auto_delete=True)

        def gone():
            assert get_rabbit_connections(vhost, rabbit_manager) == []

        assert_stops_raising(gone, AssertionError, timeout=10)


def test_get_rabbit_connections_copes_with_no_connections_at_all():
    manager = Mock()
    manager.get_connections.return_value = None
    assert get_rabbit_connections("vhost", manager) == []


def test_reset_rabbit_connections_ignores_connections_that_closed_meanwhile():
    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    manager = Mock()
    manager.get_connections.return_value = [
        {"vhost": "vhost", "name": "gone"},
        {"vhost": "vhost", "name": "broken"},
        {"vhost": "elsewhere", "name": "unrelated"},
    ]
    manager.delete_connection.side_effect = [http_error(404), http_error(500)]

    with pytest.raises(requests.HTTPError):
        reset_rabbit_connections("vhost", manager)
    assert [call.args for call in manager.delete_connection.call_args_list] == [
        ("gone",),
        ("broken",),
    ]


# -- nameko's names -----------------------------------------------------------------


def test_unpack_mock_call_gives_args_and_kwargs():
    recorder = Mock()
    recorder(1, 2, key="value")

    args, kwargs = unpack_mock_call(recorder.call_args)

    assert args == (1, 2)
    assert kwargs == {"key": "value"}
    assert unpack_mock_call(recorder.call_args).kwargs == {"key": "value"}


def test_dummy_provider_is_an_entrypoint_named_after_its_method(container_factory):
    container = container_factory(Basket)

    worker_ctx = WorkerContext(container, Basket(), DummyProvider("checkout"))

    assert isinstance(worker_ctx.entrypoint, Entrypoint)
    assert worker_ctx.entrypoint.method_name == "checkout"
    assert worker_ctx.call_id.startswith("basket.checkout.")
