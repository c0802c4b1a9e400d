from __future__ import annotations

import sys
from unittest.mock import MagicMock

import pytest

from framework import concurrency
from framework.exceptions import ExtensionNotFound
from framework.extensions import (
    ENTRYPOINT_EXTENSIONS_ATTR,
    DependencyProvider,
    Entrypoint,
)
from framework.testing.services import (
    EntrypointWaiterTimeout,
    MockDependencyProvider,
    Once,
    dummy,
    entrypoint_hook,
    entrypoint_waiter,
    once,
    replace_dependencies,
    restrict_entrypoints,
    worker_factory,
)
from framework.testing.utils import get_extension


class Journal(DependencyProvider):
    """Records each worker's lifecycle in a list shared by the test."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries

    def get_dependency(self, worker_ctx):
        return self.entries.append

    def worker_setup(self, worker_ctx):
        self.entries.append(f"setup {worker_ctx.entrypoint.method_name}")

    def worker_teardown(self, worker_ctx):
        self.entries.append(f"teardown {worker_ctx.entrypoint.method_name}")


class Language(DependencyProvider):
    def get_dependency(self, worker_ctx):
        return worker_ctx.data.get("language")


class BrokenAtSetup(DependencyProvider):
    def setup(self):
        raise RuntimeError("this provider cannot start here")


class ServiceError(Exception):
    pass


def make_service(entries: list[str] | None = None, gate=None) -> type:
    """A small service whose methods exercise the helpers."""
    journal_entries = entries if entries is not None else []

    class Greeter:
        name = "greeter"

        journal = Journal(journal_entries)
        language = Language()

        @dummy
        def greet(self, who):
            self.journal(f"greet {who}")
            return f"hello {who}"

        @dummy
        def greet_in_language(self):
            return {"en": "hello", "fr": "bonjour"}[self.language]

        @dummy
        def fail(self):
            raise ServiceError("refused")

        @dummy
        def wait_for_gate(self):
            gate.wait()
            return "through"

        @dummy
        def echo(self, value):
            return value

    return Greeter


# -- worker_factory -------------------------------------------------------------------


def test_worker_factory_replaces_every_dependency_provider_with_a_mock():
    worker = worker_factory(make_service())
    assert isinstance(worker.journal, MagicMock)
    assert isinstance(worker.language, MagicMock)
    assert worker.greet("ann") == "hello ann"
    worker.journal.assert_called_once_with("greet ann")


def test_worker_factory_injects_the_dependencies_it_is_given():
    entries: list[str] = []
    worker = worker_factory(make_service(), journal=entries.append, language="fr")
    assert worker.greet_in_language() == "bonjour"
    worker.greet("bob")
    assert entries == ["greet bob"]


def test_worker_factory_rejects_names_that_are_not_dependency_providers():
    with pytest.raises(ExtensionNotFound) as exc_info:
        worker_factory(make_service(), greet=object(), nonexistent=object())
    assert "DependencyProvider(s) 'greet, nonexistent' not found on" in str(
        exc_info.value
    )


def test_worker_factory_builds_services_without_dependencies():
    class Plain:
        name = "plain"

    assert isinstance(worker_factory(Plain), Plain)


# -- entrypoint_hook ------------------------------------------------------------------


def test_entrypoint_hook_runs_the_method_with_real_dependencies(container_factory):
    entries: list[str] = []
    container = container_factory(make_service(entries))
    container.start()

    with entrypoint_hook(container, "greet") as greet:
        assert greet("ann") == "hello ann"

    # the hook returns only after the worker's dependencies are torn down
    assert entries == ["setup greet", "greet ann", "teardown greet"]


def test_entrypoint_hook_raises_the_exception_of_the_method(container_factory):
    container = container_factory(make_service())
    container.start()

    with entrypoint_hook(container, "fail") as fail:
        with pytest.raises(ServiceError, match="refused"):
            fail()


@pytest.mark.parametrize(("language", "greeting"), [("en", "hello"), ("fr", "bonjour")])
def test_entrypoint_hook_gives_the_worker_the_context_data(
    container_factory, language, greeting
):
    container = container_factory(make_service())
    container.start()

    with entrypoint_hook(
        container, "greet_in_language", {"language": language}
    ) as greet:
        assert greet() == greeting


def test_entrypoint_hook_on_a_method_without_entrypoint_names_it(container_factory):
    container = container_factory(make_service())

    with pytest.raises(ExtensionNotFound) as exc_info:
        with entrypoint_hook(container, "nonexistent"):
            pass  # pragma: no cover
    assert f"No entrypoint for 'nonexistent' found on container {container}" in str(
        exc_info.value
    )


def test_entrypoint_hook_times_out_on_a_worker_that_does_not_finish(container_factory):
    gate = concurrency.Event()
    container = container_factory(make_service(gate=gate))
    container.start()

    with pytest.raises(entrypoint_waiter.Timeout) as exc_info:
        with entrypoint_hook(container, "wait_for_gate", timeout=0.05) as wait_for_gate:
            wait_for_gate()
    assert str(exc_info.value) == "Timeout on greeter.wait_for_gate after 0.05 seconds"
    gate.send()


def test_entrypoint_hook_raises_what_killed_the_container(container_factory):
    entered = concurrency.Event()

    class Stuck:
        name = "stuck"

        @dummy
        def hang(self):
            entered.send()
            concurrency.Event().wait()

    container = container_factory(Stuck)
    container.start()

    def kill_container_once_the_worker_runs():
        entered.wait()
        try:
            raise ConnectionResetError("broker went away")
        except ConnectionResetError:
            container.kill(sys.exc_info())

    concurrency.spawn(kill_container_once_the_worker_runs)
    with entrypoint_hook(container, "hang") as hang:
        with pytest.raises(ConnectionResetError, match="broker went away"):
            hang()


def test_entrypoint_hook_returns_the_result_of_its_own_call_only(container_factory):
    container = container_factory(make_service())
    container.start()
    echo = get_extension(container, Entrypoint, method_name="echo")

    with entrypoint_hook(container, "echo") as hook:
        # another worker of the same method, running at the same time
        container.spawn_worker(echo, ("someone else's",), {})
        assert hook("mine") == "mine"


# -- entrypoint_waiter ----------------------------------------------------------------


def test_entrypoint_waiter_waits_for_a_worker_spawned_elsewhere(container_factory):
    entries: list[str] = []

    class Starter:
        name = "starter"
        journal = Journal(entries)

        @once("at start", suffix="!")
        def announce(self, text, suffix):
            return text + suffix

    container = container_factory(Starter)
    with entrypoint_waiter(container, "announce") as result:
        container.start()

    assert result.get() == "at start!"
    assert result.worker_ctx.entrypoint.method_name == "announce"
    assert result.worker_ctx.args == ("at start",)
    assert entries[-1] == "teardown announce"


def test_entrypoint_waiter_completes_on_the_worker_the_callback_accepts(
    container_factory,
):
    container = container_factory(make_service())
    container.start()
    echo = get_extension(container, Entrypoint, method_name="echo")
    seen = []

    def is_three(worker_ctx, result, exc_info):
        seen.append(result)
        return result == 3

    with entrypoint_waiter(container, "echo", callback=is_three) as result:
        for value in range(1, 6):
            container.spawn_worker(echo, (value,), {})

    assert result.get() == 3
    assert result.worker_ctx.args == (3,)
    assert seen[:3] == [1, 2, 3]


def test_entrypoint_waiter_ignores_workers_of_other_methods(container_factory):
    container = container_factory(make_service())
    container.start()
    greet = get_extension(container, Entrypoint, method_name="greet")
    echo = get_extension(container, Entrypoint, method_name="echo")

    with entrypoint_waiter(container, "echo") as result:
        container.spawn_worker(greet, ("ann",), {})
        container.spawn_worker(echo, ("echoed",), {})

    assert result.get() == "echoed"


def test_entrypoint_waiter_result_reraises_the_worker_exception(container_factory):
    container = container_factory(make_service())
    container.start()
    fail = get_extension(container, Entrypoint, method_name="fail")

    with entrypoint_waiter(container, "fail") as result:
        container.spawn_worker(fail, (), {})

    with pytest.raises(ServiceError):
        result.get()


def test_entrypoint_waiter_times_out_with_the_method_in_the_message(container_factory):
    container = container_factory(make_service())
    container.start()

    with pytest.raises(EntrypointWaiterTimeout) as exc_info:
        with entrypoint_waiter(container, "greet", timeout=0.01):
            pass
    assert str(exc_info.value) == "Timeout on greeter.greet after 0.01 seconds"
    assert entrypoint_waiter.Timeout is EntrypointWaiterTimeout


def test_entrypoint_waiter_without_timeout_still_waits_for_the_worker(
    container_factory,
):
    container = container_factory(make_service())
    container.start()
    echo = get_extension(container, Entrypoint, method_name="echo")

    with concurrency.Timeout(5):
        with entrypoint_waiter(container, "echo", timeout=None) as result:
            concurrency.spawn_after(0.01, container.spawn_worker, echo, ("late",), {})
    assert result.get() == "late"


def test_entrypoint_waiter_refuses_a_method_without_entrypoint(container_factory):
    container = container_factory(make_service())

    with pytest.raises(RuntimeError, match="greeter has no entrypoint `nonexistent`"):
        with entrypoint_waiter(container, "nonexistent"):
            pass  # pragma: no cover


def test_nested_entrypoint_waiters_each_wait_for_their_own_method(container_factory):
    container = container_factory(make_service())
    container.start()
    greet = get_extension(container, Entrypoint, method_name="greet")
    echo = get_extension(container, Entrypoint, method_name="echo")

    with entrypoint_waiter(container, "greet") as greeted:
        with entrypoint_waiter(container, "echo") as echoed:
            container.spawn_worker(greet, ("ann",), {})
            container.spawn_worker(echo, ("back",), {})

    assert greeted.get() == "hello ann"
    assert echoed.get() == "back"
    assert "_worker_result" not in vars(container)  # the container is unpatched


def test_entrypoint_waiter_raises_the_error_of_its_callback(container_factory):
    container = container_factory(make_service())
    container.start()
    echo = get_extension(container, Entrypoint, method_name="echo")

    def broken(worker_ctx, result, exc_info):
        raise LookupError("bug in the callback")

    with pytest.raises(LookupError, match="bug in the callback"):
        with entrypoint_waiter(container, "echo", callback=broken):
            container.spawn_worker(echo, (1,), {})


# -- replace_dependencies ---------------------------------------------------------------


def test_replace_dependencies_with_one_name_returns_the_injected_mock(
    container_factory,
):
    container = container_factory(make_service())
    journal = replace_dependencies(container, "journal")
    container.start()

    with entrypoint_hook(container, "greet") as greet:
        greet("ann")

    journal.assert_called_once_with("greet ann")


def test_replace_dependencies_with_several_names_returns_mocks_in_argument_order(
    container_factory,
):
    container = container_factory(make_service())
    language, journal = replace_dependencies(container, "language", "journal")
    container.start()

    with entrypoint_hook(container, "greet") as greet:
        greet("bob")

    journal.assert_called_once_with("greet bob")
    language.assert_not_called()


def test_replace_dependencies_by_keyword_injects_the_given_objects(container_factory):
    container = container_factory(make_service())
    entries: list[str] = []
    replaced = replace_dependencies(container, journal=entries.append, language="fr")
    assert list(replaced) == []
    container.start()

    with entrypoint_hook(container, "greet_in_language") as greet:
        assert greet() == "bonjour"
    with entrypoint_hook(container, "greet") as greet:
        greet("cy")
    assert entries == ["greet cy"]
    assert all(
        isinstance(dep, MockDependencyProvider) for dep in container.dependencies
    )


def test_replace_dependencies_mixes_mocks_and_given_objects(container_factory):
    container = container_factory(make_service())
    journal = replace_dependencies(container, "journal", language="en")
    container.start()

    with entrypoint_hook(container, "greet_in_language") as greet:
        assert greet() == "hello"
    assert isinstance(journal, MagicMock)


def test_replaced_providers_are_never_set_up(container_factory):
    class Fragile:
        name = "fragile"
        broken = BrokenAtSetup()

        @dummy
        def method(self):
            return self.broken

    container = container_factory(Fragile)
    replace_dependencies(container, broken="stand-in")
    container.start()

    with entrypoint_hook(container, "method") as method:
        assert method() == "stand-in"


def test_replace_dependencies_refuses_a_name_given_twice(container_factory):
    container = container_factory(make_service())
    with pytest.raises(RuntimeError, match="Cannot replace the same dependency"):
        replace_dependencies(container, "journal", journal=object())


def test_replace_dependencies_refuses_unknown_names(container_factory):
    container = container_factory(make_service())
    with pytest.raises(
        ExtensionNotFound, match="Dependency\\(s\\) 'nonexistent' not found"
    ):
        replace_dependencies(container, "nonexistent")
    with pytest.raises(ExtensionNotFound, match="'greet' not found"):
        replace_dependencies(container, "greet")


def test_replace_dependencies_refuses_a_started_container(container_factory):
    container = container_factory(make_service())
    container.start()
    with pytest.raises(RuntimeError, match="before the container is started"):
        replace_dependencies(container, "journal")


# -- restrict_entrypoints, once, dummy --------------------------------------------------


def test_restrict_entrypoints_keeps_only_the_named_methods(container_factory):
    called = MagicMock()

    class Startup:
        name = "startup"

        @once("first")
        def first(self, value):
            called(value)

        @once("second")
        def second(self, value):
            called(value)

    container = container_factory(Startup)
    restrict_entrypoints(container, "second")
    assert [ep.method_name for ep in container.entrypoints] == ["second"]

    with entrypoint_waiter(container, "second"):
        container.start()
    called.assert_called_once_with("second")


def test_restrict_entrypoints_refuses_unknown_methods(container_factory):
    container = container_factory(make_service())
    with pytest.raises(
        ExtensionNotFound, match="Entrypoint\\(s\\) 'nonexistent' not found"
    ):
        restrict_entrypoints(container, "greet", "nonexistent")


def test_restrict_entrypoints_refuses_a_started_container(container_factory):
    container = container_factory(make_service())
    container.start()
    with pytest.raises(RuntimeError, match="before the container is started"):
        restrict_entrypoints(container, "greet")


def test_once_runs_its_method_at_start_with_its_arguments(container_factory):
    class Startup:
        name = "startup"

        @once(1, 2, scale=10, expected_exceptions=ValueError)
        def add(self, a, b, scale):
            return (a + b) * scale

    container = container_factory(Startup)
    entrypoint = get_extension(container, Once)
    assert entrypoint.expected_exceptions is ValueError

    with entrypoint_waiter(container, "add") as result:
        container.start()
    assert result.get() == 30


def test_dummy_registers_an_entrypoint_and_leaves_the_method_callable():
    service = make_service()
    (entrypoint,) = getattr(service.echo, ENTRYPOINT_EXTENSIONS_ATTR)
    assert type(entrypoint) is Entrypoint
    assert service().echo("plain call") == "plain call"


def test_dummy_accepts_entrypoint_options():
    class Service:
        name = "service"

        @dummy(expected_exceptions=KeyError)
        def method(self):
            pass  # pragma: no cover

    (entrypoint,) = getattr(Service.method, ENTRYPOINT_EXTENSIONS_ATTR)
    assert entrypoint.expected_exceptions is KeyError
