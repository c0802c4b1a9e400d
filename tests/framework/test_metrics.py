"""``framework.metrics``: worker and message metrics, read back in the text format.

The registry is per process and other tests run workers too, so every test gives
its service a unique name and reads only its own series, as differences where a
series may already exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from framework import concurrency, metrics
from framework.containers import ServiceContainer
from framework.extensions import Entrypoint
from framework.rpc import rpc
from framework.runners import ServiceRunner
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_hook
from tests.helpers import wait_for

CLIENT_TIMEOUT = 10.0

entrypoint = Entrypoint.decorator


class Refused(Exception):
    pass


def make_service(**attrs: Any) -> type:
    """A service class with a name of its own, and the methods in ``attrs``."""
    name = f"metrics_{uuid.uuid4().hex[:10]}"
    return type("Service", (), {"name": name, **attrs})


def worker_service() -> type:
    def succeed(self: Any) -> str:
        return "done"

    def refuse(self: Any) -> None:
        raise Refused("no")

    def crash(self: Any) -> None:
        raise RuntimeError("boom")

    def block(self: Any, event: Any) -> None:
        event.wait()

    return make_service(
        succeed=entrypoint(succeed),
        refuse=entrypoint(expected_exceptions=Refused)(refuse),
        crash=entrypoint(crash),
        block=entrypoint(block),
    )


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in exposition ``text``, if any."""
    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == name and entry.labels == labels:
                return entry.value
    return None


def scrape(name: str, **labels: str) -> float | None:
    return sample(metrics.render().decode(), name, **labels)


@pytest.fixture
def enabled_metrics() -> Iterator[None]:
    was_enabled = metrics.is_enabled()
    metrics.enable()
    yield
    if not was_enabled:
        metrics.disable()


@pytest.fixture
def container() -> Iterator[Callable[[type], ServiceContainer]]:
    started: list[ServiceContainer] = []

    def start(
        service_cls: type, config: dict[str, Any] | None = None
    ) -> ServiceContainer:
        instance = ServiceContainer(service_cls, config or {})
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.kill()


def call(container: ServiceContainer, method: str, *args: Any) -> Any:
    with entrypoint_hook(container, method) as hook:
        return hook(*args)


def test_finished_workers_are_counted_by_outcome_and_timed(
    enabled_metrics: None, container: Callable[[type], ServiceContainer]
) -> None:
    service = worker_service()
    running = container(service)

    call(running, "succeed")
    call(running, "succeed")
    with pytest.raises(Refused):
        call(running, "refuse")
    with pytest.raises(RuntimeError):
        call(running, "crash")
    wait_for(lambda: running.active_workers == 0, timeout=5)

    name = service.name
    assert (
        scrape(
            "framework_workers_total",
            service=name,
            entrypoint="succeed",
            outcome="success",
        )
        == 2
    )
    assert (
        scrape(
            "framework_workers_total",
            service=name,
            entrypoint="refuse",
            outcome="expected_error",
        )
        == 1
    )
    assert (
        scrape(
            "framework_workers_total", service=name, entrypoint="crash", outcome="error"
        )
        == 1
    )
    assert (
        scrape(
            "framework_worker_duration_seconds_count",
            service=name,
            entrypoint="succeed",
        )
        == 2
    )
    assert (
        scrape(
            "framework_worker_duration_seconds_bucket",
            service=name,
            entrypoint="succeed",
            le="+Inf",
        )
        == 2
    )
    assert (
        scrape(
            "framework_worker_duration_seconds_sum", service=name, entrypoint="succeed"
        )
        > 0
    )


def test_in_flight_gauge_follows_running_workers_including_killed_ones(
    enabled_metrics: None, container: Callable[[type], ServiceContainer]
) -> None:
    service = worker_service()
    running = container(service)
    (block,) = [ep for ep in running.entrypoints if ep.method_name == "block"]
    release = concurrency.Event()

    def in_flight() -> float | None:
        return scrape(
            "framework_workers_in_flight", service=service.name, entrypoint="block"
        )

    running.spawn_worker(block, (release,), {})
    running.spawn_worker(block, (concurrency.Event(),), {})  # never released
    wait_for(lambda: in_flight() == 2, timeout=5)

    release.send(None)
    wait_for(lambda: in_flight() == 1, timeout=5)
    running.kill()

    assert in_flight() == 0
    assert (
        scrape(
            "framework_workers_total",
            service=service.name,
            entrypoint="block",
            outcome="success",
        )
        == 1
    )
    assert (
        scrape(
            "framework_workers_total",
            service=service.name,
            entrypoint="block",
            outcome="killed",
        )
        == 1
    )


@pytest.fixture
def disabled_metrics() -> Iterator[None]:
    was_enabled = metrics.is_enabled()
    metrics.disable()
    yield
    if was_enabled:
        metrics.enable()


def test_nothing_is_recorded_while_metrics_are_disabled(
    disabled_metrics: None, container: Callable[[type], ServiceContainer]
) -> None:
    service = worker_service()
    running = container(service)

    call(running, "succeed")

    assert (
        scrape(
            "framework_workers_total",
            service=service.name,
            entrypoint="succeed",
            outcome="success",
        )
        is None
    )


def test_published_and_consumed_messages_are_counted_by_service(
    enabled_metrics: None,
    rabbit_config: dict[str, Any],
    container: Callable[..., ServiceContainer],
) -> None:
    def hello(self: Any, name: str) -> str:
        return f"hello {name}"

    service = make_service(hello=rpc(hello))
    running = container(service, rabbit_config)

    with ClusterRpcProxy(rabbit_config, timeout=CLIENT_TIMEOUT) as proxy:
        for name in ("a", "b", "c"):
            assert getattr(proxy, service.name).hello(name) == f"hello {name}"
    # A reply can reach the caller before the broker's confirm reaches the
    # service, and a publish counts once confirmed: let the workers finish.
    wait_for(lambda: running.active_workers == 0, timeout=5)

    name = service.name
    assert (
        scrape("framework_messages_consumed_total", service=name, queue=f"rpc-{name}")
        == 3
    )
    # The three replies, published through the rpc exchange.
    assert (
        scrape(
            "framework_messages_published_total", service=name, exchange="nameko-rpc"
        )
        == 3
    )


def test_metrics_are_served_by_the_health_server_after_workers_ran(
    rabbit_config: dict[str, Any], runner_factory: Callable[..., ServiceRunner]
) -> None:
    def hello(self: Any, name: str) -> str:
        return f"hello {name}"

    def fail(self: Any) -> None:
        raise RuntimeError("nope")

    service = make_service(hello=rpc(hello), fail=rpc(fail))
    config = {**rabbit_config, "HEALTH_SERVER_ADDRESS": "127.0.0.1:0"}
    runner = runner_factory(config, service)
    runner.start()
    with ClusterRpcProxy(rabbit_config, timeout=CLIENT_TIMEOUT) as proxy:
        target = getattr(proxy, service.name)
        target.hello("x")
        target.hello("y")
        with pytest.raises(Exception, match="unexpected RuntimeError"):
            target.fail()
    (running,) = runner.containers
    wait_for(lambda: running.active_workers == 0, timeout=5)

    response = requests.get(
        f"http://127.0.0.1:{runner.health_server.port}/metrics", timeout=CLIENT_TIMEOUT
    )

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    name = service.name
    assert (
        sample(
            text,
            "framework_workers_total",
            service=name,
            entrypoint="hello",
            outcome="success",
        )
        == 2
    )
    assert (
        sample(
            text,
            "framework_workers_total",
            service=name,
            entrypoint="fail",
            outcome="error",
        )
        == 1
    )
    assert (
        sample(
            text,
            "framework_worker_duration_seconds_count",
            service=name,
            entrypoint="hello",
        )
        == 2
    )
    assert (
        sample(text, "framework_workers_in_flight", service=name, entrypoint="hello")
        == 0
    )
    assert (
        sample(
            text, "framework_messages_consumed_total", service=name, queue=f"rpc-{name}"
        )
        == 3
    )
    assert (
        sample(
            text,
            "framework_messages_published_total",
            service=name,
            exchange="nameko-rpc",
        )
        == 3
    )
    assert sample(text, "process_cpu_seconds_total") is not None
