"""Small helpers for tests: finding extensions, waiting, ports, RabbitMQ housekeeping."""

from __future__ import annotations

import itertools
import logging
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar
from unittest.mock import Mock

import requests

from framework import concurrency
from framework.extensions import DependencyProvider, Entrypoint, Extension

if TYPE_CHECKING:
    from framework.containers import ServiceContainer, WorkerContext
    from framework.runners import ServiceRunner
    from framework.testing.rabbit import Client

log = logging.getLogger(__name__)

ExtensionT = TypeVar("ExtensionT", bound=Extension)
Resource = TypeVar("Resource")

_MISSING: Any = object()


def get_extension(
    container: ServiceContainer, extension_cls: type[ExtensionT], **match_attrs: Any
) -> ExtensionT | None:
    """The container's extension of this class whose attributes equal ``match_attrs``.

    ``get_extension(container, Entrypoint, method_name="create")`` finds the
    entrypoint of ``create``. ``None`` if there is no such extension.
    """
    for extension in container.extensions:
        if not isinstance(extension, extension_cls):
            continue
        if all(
            getattr(extension, name, _MISSING) == value
            for name, value in match_attrs.items()
        ):
            return extension
    return None


def get_container(runner: ServiceRunner, service_cls: type) -> ServiceContainer | None:
    """The runner's container hosting ``service_cls``, or ``None``."""
    for container in runner.containers:
        if container.service_cls == service_cls:
            return container
    return None


@contextmanager
def wait_for_call(timeout: float, mock_method: Mock) -> Iterator[Mock]:
    """Wait up to ``timeout`` seconds for ``mock_method`` to have been called.

    Raises ``concurrency.Timeout`` if it was not; yields the mock otherwise.
    The first checks only yield to the hub (as nameko's do), so a call that is
    one green-thread switch away is seen before anything else runs again (a
    ``timer(0)`` fires once, not once per polling interval); then it polls.
    """
    with concurrency.Timeout(timeout):
        for attempt in itertools.count():
            if mock_method.called:
                break
            concurrency.sleep(0 if attempt < 100 else 0.01)
    yield mock_method


def assert_stops_raising(
    fn: Callable[[], Any],
    exception_type: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    timeout: float = 10,
    interval: float = 0.1,
) -> Any:
    """Call ``fn`` every ``interval`` seconds until it stops raising ``exception_type``.

    Returns what ``fn`` returned. After ``timeout`` seconds raises
    ``concurrency.Timeout``, chained to the last exception ``fn`` raised, so the
    report says why it never succeeded.
    """
    last_error: BaseException | None = None
    timer = concurrency.Timeout(timeout)
    try:
        while True:
            try:
                return fn()
            except exception_type as exc:
                last_error = exc
            concurrency.sleep(interval)
    except concurrency.Timeout as exc:
        if exc is not timer:
            raise
        raise exc from last_error
    finally:
        timer.cancel()


def wait_for_worker_idle(container: ServiceContainer, timeout: float = 10) -> None:
    """Deprecated (nameko 2.x): wait until the container has no running worker.

    Prefer ``entrypoint_waiter``, which waits for the specific call you caused.
    """
    warnings.warn(
        "`wait_for_worker_idle` is deprecated; use `entrypoint_waiter` instead",
        DeprecationWarning,
        stacklevel=2,
    )
    with concurrency.Timeout(timeout):
        container._worker_pool.waitall()


class AnyInstanceOf:
    """Equal to any instance of ``cls``; for assertions on mock calls."""

    def __init__(self, cls: type | tuple[type, ...]) -> None:
        self.cls = cls

    def __eq__(self, other: object) -> bool:
        try:
            return isinstance(other, self.cls)
        except TypeError:
            # ``cls`` is not a class (e.g. an instance was passed): equal to nothing.
            return False

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = getattr(self.cls, "__name__", repr(self.cls))
        return f"<AnyInstanceOf-{name}>"


ANY_PARTIAL = AnyInstanceOf(partial)


class DummyProvider(Entrypoint):
    """An entrypoint that never fires, named after ``method_name``.

    nameko's tests build worker contexts around one (``WorkerContext(container,
    service, DummyProvider("method"))``) when all a test needs is an entrypoint.
    """

    def __init__(self, method_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method_name = method_name  # type: ignore[assignment]


class ConstantDependency(DependencyProvider):
    """A dependency provider that injects ``value`` (default ``None``) as it is."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        return self.value


class MockCallArgs(NamedTuple):
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def unpack_mock_call(call: Any) -> MockCallArgs:
    """A ``mock.call`` (or an entry of ``call_args_list``) as ``(args, kwargs)``."""
    args, kwargs = call
    return MockCallArgs(tuple(args), dict(kwargs))


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class PipelineSizeError(ValueError, RuntimeError):
    """A ``ResourcePipeline`` without room for a ready resource.

    A ``ValueError`` (a bad argument) that is also the ``RuntimeError`` nameko
    raised, so code written for either catches it.
    """


class ResourcePipeline(Generic[Resource]):
    """Creates resources ahead of use and destroys used ones, both in the background.

    Creating a vhost (or a database) per test costs a round trip or two; the
    pipeline keeps ``size`` of them ready, so a test only waits when it outpaces
    the creator, and it never waits for a destruction.

        with ResourcePipeline(create, destroy).run() as pipeline:
            vhost = pipeline.get()
            ...
            pipeline.discard(vhost)

    A resource that ``create`` fails to make is reported by the ``get()`` that
    would have received it. Resources still waiting unused when the pipeline
    stops are destroyed too.
    """

    def __init__(
        self,
        create: Callable[[], Resource],
        destroy: Callable[[Resource], Any],
        size: int = 3,
    ) -> None:
        if size < 1:
            raise PipelineSizeError(
                f"a pipeline needs room for at least one ready resource, not {size}"
            )
        self.create = create
        self.destroy = destroy
        self.size = size
        # One slot per resource made but not yet handed out: the creator takes a
        # slot before creating, ``get()`` gives it back.
        self._slots = concurrency.Semaphore(size)
        self._ready: Any = concurrency.Queue()
        self._trash: Any = concurrency.Queue()
        self._running = False
        self._creator: concurrency.GreenThread | None = None
        self._destroyer: concurrency.GreenThread | None = None

    @contextmanager
    def run(self) -> Iterator[ResourcePipeline[Resource]]:
        self._start()
        try:
            yield self
        finally:
            self._shutdown()

    @property
    def ready(self) -> Any:
        """The queue of resources made and not yet handed out (as in nameko)."""
        return self._ready

    def get(self) -> Resource:
        """A fresh resource; waits while none is ready yet."""
        item = self._ready.get()
        self._slots.release()
        if isinstance(item, _CreateFailed):
            raise item.error
        return item

    def discard(self, item: Resource) -> None:
        """Hand back a used resource, to be destroyed in the background."""
        self._trash.put(item)

    def _start(self) -> None:
        self._running = True
        self._creator = concurrency.spawn(self._create_loop)
        self._destroyer = concurrency.spawn(self._destroy_loop)

    def _create_loop(self) -> None:
        while True:
            self._slots.acquire()
            if not self._running:
                return
            try:
                item: Any = self.create()
            except Exception as exc:
                log.exception("pipeline could not create a resource")
                item = _CreateFailed(exc)
            self._ready.put(item)

    def _destroy_loop(self) -> None:
        while True:
            item = self._trash.get()
            if item is _STOP:
                return
            if isinstance(item, _CreateFailed):
                continue
            try:
                self.destroy(item)
            except Exception:
                log.exception("pipeline could not destroy resource %r", item)

    def _shutdown(self) -> None:
        assert self._creator is not None and self._destroyer is not None
        self._running = False
        # Wake a creator waiting for a slot; one busy creating finishes first, so
        # what it makes is not lost but destroyed below.
        self._slots.release()
        self._creator.wait()
        while True:
            try:
                self._trash.put(self._ready.get_nowait())
            except concurrency.Empty:
                break
        self._trash.put(_STOP)
        self._destroyer.wait()


class _CreateFailed:
    def __init__(self, error: Exception) -> None:
        self.error = error


_STOP: Any = object()


def get_rabbit_connections(vhost: str, rabbit_manager: Client) -> list[dict[str, Any]]:
    """The broker's open AMQP connections to ``vhost`` (via the management API)."""
    connections = rabbit_manager.get_connections()
    if not connections:
        return []
    return [
        connection for connection in connections if connection.get("vhost") == vhost
    ]


def reset_rabbit_connections(vhost: str, rabbit_manager: Client) -> None:
    """Close every AMQP connection to ``vhost`` from the broker side."""
    for connection in get_rabbit_connections(vhost, rabbit_manager):
        try:
            rabbit_manager.delete_connection(connection["name"])
        except requests.HTTPError as exc:
            # Closed by its owner between the listing and now: nothing to do.
            if exc.response is not None and exc.response.status_code == 404:
                continue
            raise
