"""The extension model: declaration, binding, decorators, signatures."""

from __future__ import annotations

import pytest

from framework import concurrency
from framework.containers import ServiceContainer
from framework.exceptions import IncorrectSignature
from framework.extensions import (
    ENTRYPOINT_EXTENSIONS_ATTR,
    DependencyProvider,
    Entrypoint,
    Extension,
    ProviderCollector,
    SharedExtension,
    iter_extensions,
)

entrypoint = Entrypoint.decorator


class Shared(SharedExtension):
    pass


class Inner(Extension):
    shared = Shared()


class Provider(DependencyProvider):
    inner = Inner()

    def __init__(self, value: int = 0) -> None:
        self.value = value


class Service:
    name = "svc"
    dep = Provider(value=7)
    other = Provider(value=8)

    @entrypoint
    def bare(self, a, b=1):
        return a + b

    @entrypoint(expected_exceptions=ValueError, sensitive_arguments=("password",))
    def configured(self, password):
        return password


def test_decorator_works_bare_and_with_arguments_and_leaves_methods_callable():
    (bare,) = getattr(Service.bare, ENTRYPOINT_EXTENSIONS_ATTR)
    (configured,) = getattr(Service.configured, ENTRYPOINT_EXTENSIONS_ATTR)
    assert bare.expected_exceptions == ()
    assert configured.expected_exceptions is ValueError
    assert configured.sensitive_arguments == ("password",)
    assert Service().bare(1, 2) == 3


def test_binding_clones_the_prototype_with_its_constructor_arguments():
    container = ServiceContainer(Service, {})
    bound = {dep.attr_name: dep for dep in container.dependencies}
    assert bound["dep"].value == 7 and bound["other"].value == 8
    assert bound["dep"] is not Service.dep
    assert not Service.dep.is_bound()
    assert bound["dep"].container.service_name == "svc"


def test_binding_a_bound_extension_is_an_error():
    container = ServiceContainer(Service, {})
    dep = next(iter(container.dependencies))
    with pytest.raises(RuntimeError):
        dep.bind(container, "x")


def test_shared_extensions_are_one_instance_per_container():
    container = ServiceContainer(Service, {})
    shared = [ext for ext in container.subextensions if isinstance(ext, Shared)]
    inners = [ext for ext in container.subextensions if isinstance(ext, Inner)]
    assert len(shared) == 1 and len(inners) == 2
    assert all(inner.shared is shared[0] for inner in inners)
    other = ServiceContainer(Service, {})
    assert [e for e in other.subextensions if isinstance(e, Shared)][0] is not shared[0]


def test_iter_extensions_walks_sub_extensions_depth_first():
    container = ServiceContainer(Service, {})
    dep = next(iter(container.dependencies))
    assert [type(e) for e in iter_extensions(dep)] == [Shared, Inner]


def test_check_signature_raises_incorrect_signature():
    container = ServiceContainer(Service, {})
    ep = next(e for e in container.entrypoints if e.method_name == "bare")
    ep.check_signature((1,), {})
    ep.check_signature((1,), {"b": 2})
    with pytest.raises(IncorrectSignature):
        ep.check_signature((), {})
    with pytest.raises(IncorrectSignature):
        ep.check_signature((1, 2, 3), {})


def test_reprs_say_what_is_bound():
    assert "[unbound]" in repr(Service.dep)
    container = ServiceContainer(Service, {})
    dep = next(d for d in container.dependencies if d.attr_name == "dep")
    assert "[svc.dep]" in repr(dep)


def test_provider_collector_waits_until_the_last_provider_unregisters():
    class Collector(ProviderCollector, SharedExtension):
        pass

    collector = Collector()
    collector.wait_for_providers()  # none ever registered: returns at once
    collector.register_provider("a")
    collector.register_provider("b")
    waiter = concurrency.spawn(collector.wait_for_providers)
    collector.unregister_provider("a")
    concurrency.sleep(0)
    assert not waiter.dead
    collector.unregister_provider("b")
    with concurrency.Timeout(1):
        waiter.wait()


class Greeting(DependencyProvider[str]):
    def get_dependency(self, worker_ctx) -> str:
        return f"hello from {worker_ctx.service_name}"


def test_a_provider_typed_with_what_it_injects_injects_it_and_stays_a_provider(
    container_factory,
):
    from framework.testing.services import dummy, entrypoint_hook

    class Typed:
        name = "typed"
        greeting = Greeting()

        @dummy
        def greet(self) -> str:
            return self.greeting

    # On the class it is still the provider (the container finds it there).
    assert isinstance(Typed.greeting, Greeting)
    container = container_factory(Typed, {})
    container.start()
    with entrypoint_hook(container, "greet") as greet:
        assert greet() == "hello from typed"


def test_a_declared_provider_knows_its_attribute_name_like_its_bound_copy():
    container = ServiceContainer(Service, {})
    bound = {p.attr_name: p for p in container.dependencies}["dep"]
    assert Service.dep.attr_name == "dep" and Service.other.attr_name == "other"
    assert bound is not Service.dep


def test_sensitive_variables_still_work_with_a_deprecation_warning():
    from framework.extensions import Entrypoint

    with pytest.deprecated_call():
        entrypoint = Entrypoint(sensitive_variables=("a", "b.x[0]"))
    assert entrypoint.sensitive_arguments == ("a", "b.x[0]")
