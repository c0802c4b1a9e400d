"""ServiceContainer: the worker lifecycle, pools, stop and kill (no broker)."""

from __future__ import annotations

import logging

import pytest

from framework import concurrency
from framework.containers import WorkerContext, get_service_name
from framework.exceptions import ConfigurationError, ContainerBeingKilled
from framework.extensions import DependencyProvider, Entrypoint
from framework.testing.services import entrypoint_hook

entrypoint = Entrypoint.decorator
calls: list[str] = []


class Recorder(DependencyProvider):
    def get_dependency(self, worker_ctx):
        calls.append("get_dependency")
        return "injected"

    def worker_setup(self, worker_ctx):
        calls.append("worker_setup")

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        calls.append(f"worker_result:{result}:{exc_info and exc_info[0].__name__}")

    def worker_teardown(self, worker_ctx):
        calls.append("worker_teardown")


class BrokenTeardown(DependencyProvider):
    def worker_teardown(self, worker_ctx):
        raise RuntimeError("teardown is broken")


class BrokenSetup(DependencyProvider):
    fail = True

    def worker_setup(self, worker_ctx):
        if BrokenSetup.fail:
            raise RuntimeError("setup is broken")


class Service:
    name = "service"
    dep = Recorder()

    @entrypoint
    def method(self, value):
        calls.append(f"method:{self.dep}")
        return value * 2

    @entrypoint
    def fails(self):
        raise ValueError("nope")


@pytest.fixture(autouse=True)
def clear_calls():
    calls.clear()


def run_worker(container, method_name, *args, handle_result=None, context_data=None):
    done = concurrency.Event()
    entrypoint = next(e for e in container.entrypoints if e.method_name == method_name)

    def on_result(worker_ctx, result, exc_info):
        if handle_result:
            result, exc_info = handle_result(worker_ctx, result, exc_info)
        done.send((result, exc_info))
        return result, exc_info

    ctx = container.spawn_worker(
        entrypoint, args, {}, context_data=context_data, handle_result=on_result
    )
    with concurrency.Timeout(5):
        return ctx, done.wait()


def test_worker_lifecycle_runs_hooks_in_order(container_factory):
    container = container_factory(Service, {})
    container.start()
    _, (result, exc_info) = run_worker(container, "method", 21)
    with concurrency.Timeout(5):
        while "worker_teardown" not in calls:
            concurrency.sleep(0.01)
    assert result == 42 and exc_info is None
    assert calls == [
        "get_dependency",
        "worker_setup",
        "method:injected",
        "worker_result:42:None",
        "worker_teardown",
    ]


def test_method_errors_reach_handle_result_and_dependencies(container_factory):
    container = container_factory(Service, {})
    container.start()
    _, (result, exc_info) = run_worker(container, "fails")
    assert result is None and exc_info[0] is ValueError


def test_a_broken_dependency_hook_fails_the_worker_not_the_service(
    container_factory, caplog
):
    class Fragile:
        name = "fragile"
        setup_dep = BrokenSetup()
        teardown_dep = BrokenTeardown()

        @entrypoint
        def method(self):
            return "ok"

    container = container_factory(Fragile, {})
    container.start()
    BrokenSetup.fail = True
    with caplog.at_level(logging.ERROR):
        _, (result, exc_info) = run_worker(container, "method")
    assert exc_info[0] is RuntimeError and "setup is broken" in str(exc_info[1])
    assert "teardown is broken" in caplog.text
    BrokenSetup.fail = False
    _, (result, exc_info) = run_worker(container, "method")
    assert result == "ok" and exc_info is None
    assert not container._died.ready()


def test_worker_context_builds_call_id_stack_and_caps_it(container_factory):
    container = container_factory(Service, {"parent_calls_tracked": 2})
    parent = ["a.x.1", "b.y.2", "c.z.3"]
    entrypoint = next(e for e in container.entrypoints if e.method_name == "method")
    ctx = WorkerContext(
        container, None, entrypoint, data={"call_id_stack": parent, "language": "fr"}
    )
    assert ctx.call_id.startswith("service.method.")
    assert ctx.call_id_stack == ["b.y.2", "c.z.3", ctx.call_id]
    assert ctx.origin_call_id == "a.x.1"
    assert ctx.immediate_parent_call_id == "c.z.3"
    assert ctx.context_data == {"language": "fr", "call_id_stack": ctx.call_id_stack}
    assert ctx.data == {"language": "fr"}


def test_the_event_id_being_handled_is_not_passed_on(container_factory):
    # A handler reads the id of the event it handles to deduplicate; a message it
    # sends is another message, and a downstream handler deduplicating on the
    # inherited id would drop it.
    container = container_factory(Service, {})
    entrypoint = next(e for e in container.entrypoints if e.method_name == "method")
    ctx = WorkerContext(
        container, None, entrypoint, data={"event_id": "e-1", "language": "fr"}
    )
    assert ctx.data["event_id"] == "e-1"
    assert ctx.context_data == {"language": "fr", "call_id_stack": ctx.call_id_stack}


def test_max_workers_bounds_concurrent_workers(container_factory):
    release = concurrency.Event()
    running: list[int] = []
    peak: list[int] = [0]

    class Busy:
        name = "busy"

        @entrypoint
        def work(self, n):
            running.append(n)
            peak[0] = max(peak[0], len(running))
            release.wait()
            running.remove(n)

    container = container_factory(Busy, {"max_workers": 3})
    container.start()
    ep = next(iter(container.entrypoints))
    spawner = concurrency.spawn(
        lambda: [container.spawn_worker(ep, (i,), {}) for i in range(6)]
    )
    with concurrency.Timeout(5):
        while len(running) < 3:
            concurrency.sleep(0.01)
    concurrency.sleep(0.05)
    assert len(running) == 3
    release.send(None)
    with concurrency.Timeout(5):
        spawner.wait()
        while container.active_workers:
            concurrency.sleep(0.01)
    assert peak[0] == 3


def test_graceful_stop_waits_for_in_flight_workers(container_factory):
    release = concurrency.Event()
    finished: list[str] = []

    class Slow:
        name = "slow"

        @entrypoint
        def work(self):
            release.wait()
            finished.append("done")

    container = container_factory(Slow, {})
    container.start()
    container.spawn_worker(next(iter(container.entrypoints)), (), {})
    stopper = concurrency.spawn(container.stop)
    concurrency.sleep(0.05)
    assert not stopper.dead, "stop returned while a worker was still running"
    release.send(None)
    with concurrency.Timeout(5):
        stopper.wait()
    assert finished == ["done"]


def test_graceful_stop_kills_workers_after_the_drain_deadline(container_factory):
    class Stuck:
        name = "stuck"

        @entrypoint
        def work(self):
            concurrency.Event().wait()

    container = container_factory(Stuck, {"DRAIN_TIMEOUT": 0.2})
    container.start()
    container.spawn_worker(next(iter(container.entrypoints)), (), {})
    with concurrency.Timeout(5):
        container.stop()
    assert container.active_workers == 0


def test_spawning_after_kill_raises_container_being_killed(container_factory):
    container = container_factory(Service, {})
    container.start()
    container.kill()
    with pytest.raises(ContainerBeingKilled):
        container.spawn_worker(next(iter(container.entrypoints)), (1,), {})


def test_an_error_in_a_managed_thread_kills_the_container(container_factory):
    container = container_factory(Service, {})
    container.start()

    def broken():
        raise RuntimeError("machinery broke")

    container.spawn_managed_thread(broken, identifier="broken")
    with pytest.raises(RuntimeError, match="machinery broke"), concurrency.Timeout(5):
        container.wait()


def test_service_class_must_have_a_string_name():
    class NoName:
        pass

    class BadName:
        name = 3

    with pytest.raises(ConfigurationError, match="must define a `name`"):
        get_service_name(NoName)
    with pytest.raises(ConfigurationError):
        get_service_name(BadName)


def test_entrypoint_hook_calls_through_the_container(container_factory):
    container = container_factory(Service, {})
    container.start()
    with entrypoint_hook(container, "method") as hook:
        assert hook(5) == 10


@pytest.mark.parametrize(
    "stack",
    [5, 3.5, {"a": "b"}, [1, None, {"a": 1}], b"bytes", ["x" * 100_000], [""]],
)
def test_a_malformed_call_id_stack_is_ignored_not_fatal(container_factory, stack):
    container = container_factory(Service, {})
    entrypoint = next(e for e in container.entrypoints if e.method_name == "method")
    ctx = WorkerContext(container, None, entrypoint, data={"call_id_stack": stack})
    assert ctx.call_id_stack == [ctx.call_id]
    assert ctx.origin_call_id is None


def test_an_oversized_call_id_stack_keeps_only_its_latest_ids(container_factory):
    container = container_factory(Service, {"parent_calls_tracked": 3})
    entrypoint = next(e for e in container.entrypoints if e.method_name == "method")
    parent = [f"caller.m.{i}" for i in range(100_000)] + [7, "ok.m.1"]
    ctx = WorkerContext(container, None, entrypoint, data={"call_id_stack": parent})
    assert ctx.call_id_stack == [
        "caller.m.99998",
        "caller.m.99999",
        "ok.m.1",
        ctx.call_id,
    ]
    assert len(ctx._parent_call_id_stack) <= 256


def test_graceful_stop_waits_for_worker_related_threads_before_stopping_dependencies(
    container_factory,
):
    events: list[str] = []

    class Publisher(DependencyProvider):
        def stop(self):
            events.append("dependencies stopped")

    class WithPublisher:
        name = "with_publisher"
        publisher = Publisher()

        @entrypoint
        def work(self):
            pass

    container = container_factory(WithPublisher, {})
    container.start()
    release = concurrency.Event()

    def error_reply():  # e.g. an error reply waiting for its publisher confirm
        release.wait()
        events.append("reply sent")

    container.spawn_worker_related(error_reply)
    stopper = concurrency.spawn(container.stop)
    for _ in range(20):  # let stop() run as far as it can
        concurrency.sleep(0)
    assert events == [] and not stopper.dead
    release.send(None)
    with concurrency.Timeout(5):
        stopper.wait()
    assert events == ["reply sent", "dependencies stopped"]


def test_a_failing_worker_related_thread_is_logged_by_type_not_printed(
    container_factory, caplog, capfd
):
    container = container_factory(Service, {})
    container.start()

    def broken():
        raise ValueError("secret detail")

    with caplog.at_level(logging.ERROR), concurrency.Timeout(5):
        container.spawn_worker_related(broken).wait()
    # Errors only: an earlier test's logging setup may let the INFO of the
    # container's start through before the ERROR level is set here.
    (record,) = [
        r
        for r in caplog.records
        if r.name == "framework.containers" and r.levelno >= logging.ERROR
    ]
    assert record.error_type == "ValueError"
    assert "secret detail" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    with concurrency.Timeout(5):
        container.stop()


def test_kill_kills_worker_related_threads(container_factory):
    container = container_factory(Service, {})
    container.start()
    thread = container.spawn_worker_related(concurrency.Event().wait)
    container.kill()
    assert thread.dead and not container.busy
