"""Drive services in tests: build workers, call entrypoints directly, wait for them,
and swap dependencies for mocks.

``worker_factory`` unit-tests a service method with no container at all.
``entrypoint_hook`` calls a method through a real container (dependency providers
and all) without going through the transport. ``entrypoint_waiter`` waits until a
worker that something else caused (a message, a timer) has finished.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from unittest.mock import MagicMock, patch

from framework import concurrency
from framework.exceptions import ExtensionNotFound
from framework.extensions import DependencyProvider, Entrypoint
from framework.testing.utils import get_extension
from framework.testing.waiting import WaitResult

if TYPE_CHECKING:
    from framework.containers import ExcInfo, ServiceContainer, WorkerContext

__all__ = [
    "EntrypointWaiterTimeout",
    "MockDependencyProvider",
    "Once",
    "dummy",
    "entrypoint_hook",
    "entrypoint_waiter",
    "get_extension",
    "once",
    "replace_dependencies",
    "restrict_entrypoints",
    "worker_factory",
]

log = logging.getLogger(__name__)

WaiterCallback = Callable[["WorkerContext", Any, "ExcInfo | None"], bool]


# -- unit tests without a container -----------------------------------------------


def worker_factory(service_cls: type, **dependencies: Any) -> Any:
    """A bare instance of ``service_cls`` with every dependency provider replaced.

    Providers named in ``dependencies`` get that object, all others a ``MagicMock``.
    No container and no entrypoint machinery: call the methods directly.
    """
    service = service_cls()
    unused = dict(dependencies)
    for name, attr in inspect.getmembers(service_cls):
        if isinstance(attr, DependencyProvider):
            setattr(service, name, unused.pop(name) if name in unused else MagicMock())
    if unused:
        raise ExtensionNotFound(
            f"DependencyProvider(s) '{', '.join(sorted(unused))}' not found on {service_cls}."
        )
    return service


# -- extensions that only tests need --------------------------------------------------


class MockDependencyProvider(DependencyProvider):
    """Injects ``dependency`` (a fresh ``MagicMock`` if none is given) into workers."""

    def __init__(self, attr_name: str, dependency: Any = None) -> None:
        self.attr_name = attr_name
        self.dependency = MagicMock() if dependency is None else dependency

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        return self.dependency


class Once(Entrypoint):
    """Runs its method once, as the container starts, with the given arguments.

    ``@once("a", b=2)`` calls ``method("a", b=2)`` at start.
    """

    def __init__(
        self,
        *args: Any,
        expected_exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
        sensitive_arguments: str | tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        self.args = args
        self.kwargs = kwargs
        super().__init__(
            expected_exceptions=expected_exceptions,
            sensitive_arguments=sensitive_arguments,
        )

    def start(self) -> None:
        self.container.spawn_worker(self, self.args, self.kwargs)


once = Once.decorator

# An entrypoint that never fires by itself: it gives ``entrypoint_hook`` something
# to call on a method that has no transport of its own.
dummy = Entrypoint.decorator


# -- calling and waiting ------------------------------------------------------------


class EntrypointWaiterTimeout(Exception):
    """The awaited worker did not finish within the waiter's timeout."""


class EntrypointWaitResult(WaitResult):
    """A ``WaitResult`` that also remembers the worker that produced it."""

    worker_ctx: WorkerContext | None = None


@contextmanager
def entrypoint_waiter(
    container: ServiceContainer,
    method_name: str,
    timeout: float | None = 30,
    callback: WaiterCallback | None = None,
) -> Iterator[EntrypointWaitResult]:
    """Wait, on leaving the block, until a worker of ``method_name`` has finished.

    "Finished" means its result is known *and* its dependencies are torn down, so
    whatever the worker wrote is visible when the block exits. With ``callback``,
    only a worker for which ``callback(worker_ctx, result, exc_info)`` returns true
    counts. Yields a result whose ``get()`` returns the worker's result (or raises
    its exception) and whose ``worker_ctx`` is the worker's context.

    ``timeout`` (seconds, ``None`` for none) covers the whole block; on expiry it
    raises ``entrypoint_waiter.Timeout``.
    """
    if get_extension(container, Entrypoint, method_name=method_name) is None:
        raise RuntimeError(
            f"{container.service_name} has no entrypoint `{method_name}`"
        )

    waiter = EntrypointWaitResult()
    torn_down = concurrency.Event()
    callback_errors: list[BaseException] = []
    # The container calls these through ``self``, so patching the instance reaches
    # every worker; a waiter nested in another wraps the outer one's wrapper.
    forward_result = container._worker_result
    forward_teardown = container._worker_teardown

    def is_awaited(
        worker_ctx: WorkerContext, result: Any, exc_info: ExcInfo | None
    ) -> bool:
        if (
            waiter.worker_ctx is not None
            or worker_ctx.entrypoint.method_name != method_name
        ):
            return False
        if callback is None:
            return True
        try:
            return bool(callback(worker_ctx, result, exc_info))
        except Exception as exc:
            # The callback runs in the worker's thread; hand its failure to the test.
            callback_errors.append(exc)
            return True

    def worker_result(
        worker_ctx: WorkerContext, result: Any, exc_info: ExcInfo | None
    ) -> None:
        forward_result(worker_ctx, result, exc_info)
        if is_awaited(worker_ctx, result, exc_info):
            waiter.worker_ctx = worker_ctx
            waiter.send(result, exc_info)

    def worker_teardown(worker_ctx: WorkerContext) -> None:
        forward_teardown(worker_ctx)
        if worker_ctx is waiter.worker_ctx and not torn_down.ready():
            torn_down.send()

    expired = EntrypointWaiterTimeout(
        f"Timeout on {container.service_name}.{method_name} after {timeout} seconds"
    )
    with concurrency.Timeout(timeout, expired):
        with (
            patch.object(container, "_worker_result", worker_result),
            patch.object(container, "_worker_teardown", worker_teardown),
        ):
            yield waiter
            torn_down.wait()
    if callback_errors:
        raise callback_errors[0]


entrypoint_waiter.Timeout = EntrypointWaiterTimeout  # type: ignore[attr-defined]


@contextmanager
def entrypoint_hook(
    container: ServiceContainer,
    method_name: str,
    context_data: dict[str, Any] | None = None,
    timeout: float | None = 30,
) -> Iterator[Callable[..., Any]]:
    """Yield a function that runs ``method_name`` in a worker of ``container``.

    The call goes straight to ``container.spawn_worker``, bypassing the transport:
    dependency providers run, the entrypoint's result handling does not. It
    returns the method's result (or raises its exception) once the worker's
    dependencies are torn down; if the container dies meanwhile it raises the
    error the container died of. ``context_data`` becomes the worker's context
    (language, auth token, call id stack...).
    """
    entrypoint = get_extension(container, Entrypoint, method_name=method_name)
    if entrypoint is None:
        raise ExtensionNotFound(
            f"No entrypoint for '{method_name}' found on container {container}."
        )

    def hook(*args: Any, **kwargs: Any) -> Any:
        spawned: list[WorkerContext] = []
        outcome = concurrency.Event()

        def is_this_call(worker_ctx: WorkerContext, result: Any, exc_info: Any) -> bool:
            # spawn_worker returns before the worker first runs (green threads only
            # switch on blocking), so ``spawned`` is filled in by the time this runs.
            return bool(spawned) and worker_ctx is spawned[0]

        def call() -> None:
            try:
                with entrypoint_waiter(
                    container, method_name, timeout, is_this_call
                ) as waiter:
                    spawned.append(
                        container.spawn_worker(
                            entrypoint, args, kwargs, context_data=context_data
                        )
                    )
                outcome.send(waiter.get())
            except Exception:
                outcome.send_exception(*sys.exc_info())

        def watch_container() -> None:
            # A dying container kills its workers, so the waiter would only time out.
            try:
                container.wait()
            except Exception:
                if not outcome.ready():
                    outcome.send_exception(*sys.exc_info())

        caller = concurrency.spawn(call)
        watcher = concurrency.spawn(watch_container)
        try:
            return outcome.wait()
        finally:
            concurrency.kill(caller)
            concurrency.kill(watcher)

    yield hook


# -- reshaping a container before it starts ------------------------------------------


def replace_dependencies(
    container: ServiceContainer, *names: str, **replacements: Any
) -> Any:
    """Swap the container's dependency providers for injectors of stand-ins.

    Each positional name gets a fresh ``MagicMock``; each keyword name gets the
    given object. Returns the mock for a single positional name, a generator of
    the mocks (in argument order) otherwise. Must be called before ``start()``.
    """
    both = set(names) & set(replacements)
    if both:
        raise RuntimeError(
            f"Cannot replace the same dependency via both args and kwargs: {sorted(both)}"
        )
    if container.started:
        raise RuntimeError(
            "You must replace dependencies before the container is started."
        )

    providers = {provider.attr_name: provider for provider in container.dependencies}
    missing = (set(names) | set(replacements)) - set(providers)
    if missing:
        raise ExtensionNotFound(
            f"Dependency(s) '{', '.join(sorted(missing))}' not found on {container}."
        )

    mocks = {name: MagicMock() for name in names}
    for name, replacement in {**mocks, **replacements}.items():
        container.dependencies.remove(providers[name])
        stand_in = MockDependencyProvider(name, dependency=replacement).bind(
            container, name
        )
        container.dependencies.add(stand_in)  # type: ignore[arg-type]

    replaced = (mocks[name] for name in names)
    if len(names) == 1:
        return next(replaced)
    return replaced


def restrict_entrypoints(container: ServiceContainer, *method_names: str) -> None:
    """Keep only the entrypoints of ``method_names``; the others never fire.

    Must be called before ``start()``.
    """
    if container.started:
        raise RuntimeError(
            "You must restrict entrypoints before the container is started."
        )
    known = {entrypoint.method_name for entrypoint in container.entrypoints}
    missing = set(method_names) - known
    if missing:
        raise ExtensionNotFound(
            f"Entrypoint(s) '{', '.join(sorted(missing))}' not found on {container}."
        )
    for entrypoint in list(container.entrypoints):
        if entrypoint.method_name not in method_names:
            container.entrypoints.remove(entrypoint)
