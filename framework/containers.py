"""``ServiceContainer``: hosts one service class, its extensions and its workers."""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol

from framework import concurrency, serialization
from framework.constants import (
    CALL_ID_STACK_CONTEXT_KEY,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_WORKERS,
    DEFAULT_PARENT_CALLS_TRACKED,
    DRAIN_TIMEOUT_CONFIG_KEY,
    EVENT_ID_CONTEXT_KEY,
    MAX_WORKERS_CONFIG_KEY,
    PARENT_CALLS_CONFIG_KEY,
    SERVICE_CONTAINER_CLS,
)
from framework.exceptions import ConfigurationError, ContainerBeingKilled
from framework.extensions import (
    ENTRYPOINT_EXTENSIONS_ATTR,
    DependencyProvider,
    Entrypoint,
    Extension,
    iter_extensions,
)
from framework.logs import RecordTemplate, log_worker_error
from framework.utils import uuid4_str

log = logging.getLogger(__name__)
worker_log = logging.getLogger("framework.workers")
# One record per worker, often one per request: made from a template rather than
# through logging's generic path (see RecordTemplate).
_worker_finished = RecordTemplate(worker_log, logging.INFO, "worker finished")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
HandleResult = Callable[
    ["WorkerContext", Any, ExcInfo | None], tuple[Any, ExcInfo | None]
]


class WorkerObserver(Protocol):
    """Told of every worker's start and end (``framework.metrics`` is one).

    Called on the worker's own green thread, on the hot path: keep it cheap and
    never block. ``worker_finished`` follows every ``worker_started`` exactly once;
    ``outcome`` is ``success``, ``expected_error``, ``error``, or ``killed`` for a
    worker killed mid-call.
    """

    def worker_started(self, worker_ctx: WorkerContext) -> None: ...

    def worker_finished(
        self, worker_ctx: WorkerContext, outcome: str, duration: float
    ) -> None: ...


#: Observers of every container's workers in this process.
worker_observers: list[WorkerObserver] = []


def get_service_name(service_cls: type) -> str:
    name = getattr(service_cls, "name", None)
    if name is None:
        raise ConfigurationError(
            f"Service class must define a `name` attribute "
            f"({service_cls.__module__}.{service_cls.__name__})"
        )
    if not isinstance(name, str):
        raise ConfigurationError(
            f"Service name attribute must be a string "
            f"({service_cls.__module__}.{service_cls.__name__}.name)"
        )
    return name


def get_container_cls(config: dict[str, Any]) -> type[ServiceContainer]:
    from framework.utils import import_from_path

    return import_from_path(config.get(SERVICE_CONTAINER_CLS)) or ServiceContainer


def new_call_id() -> str:
    return uuid4_str()


class WorkerContext:
    """Everything about one call: its service instance, arguments and context."""

    def __init__(
        self,
        container: ServiceContainer,
        service: Any,
        entrypoint: Entrypoint,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.container = container
        self.config = container.config
        self.service = service
        self.entrypoint = entrypoint
        self.service_name = container.service_name
        self.args = tuple(args) if args is not None else ()
        self.kwargs = kwargs if kwargs is not None else {}
        self.data = dict(data) if data else {}
        self._parent_call_id_stack = _parent_call_ids(
            self.data.pop(CALL_ID_STACK_CONTEXT_KEY, None)
        )
        self._call_id: str | None = None

    @property
    def call_id(self) -> str:
        if self._call_id is None:
            self._call_id = (
                f"{self.service_name}.{self.entrypoint.method_name}.{new_call_id()}"
            )
        return self._call_id

    @property
    def call_id_stack(self) -> list[str]:
        limit = self.config.get(PARENT_CALLS_CONFIG_KEY, DEFAULT_PARENT_CALLS_TRACKED)
        stack = self._parent_call_id_stack + [self.call_id]
        return stack[-(limit + 1) :]

    @property
    def context_data(self) -> dict[str, Any]:
        """The context passed on to the messages this worker sends."""
        data = dict(self.data)
        data.pop(EVENT_ID_CONTEXT_KEY, None)
        data[CALL_ID_STACK_CONTEXT_KEY] = self.call_id_stack
        return data

    @property
    def origin_call_id(self) -> str | None:
        return self._parent_call_id_stack[0] if self._parent_call_id_stack else None

    @property
    def immediate_parent_call_id(self) -> str | None:
        return self._parent_call_id_stack[-1] if self._parent_call_id_stack else None

    def __repr__(self) -> str:
        return (
            f"<WorkerContext [{self.service_name}.{self.entrypoint.method_name}] "
            f"at 0x{id(self):x}>"
        )


#: Longer "call ids" in an incoming call id stack are dropped: ours are ~80 chars.
MAX_CALL_ID_LENGTH = 512
#: At most this many parent call ids are kept (only the latest
#: ``parent_calls_tracked`` go downstream; the first is the origin).
MAX_PARENT_CALL_IDS = 256


def _parent_call_ids(value: Any) -> list[str]:
    """The parent call id stack from context data, whatever the caller sent.

    It comes from a message header, so it may be anything (``5``, a dict, a
    million entries): only strings of a sane length are kept, at most
    ``MAX_PARENT_CALL_IDS``, and anything else is ignored rather than failing
    the call.
    """
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list | tuple):
        log.warning(
            "ignoring a malformed call id stack",
            extra={"value_type": type(value).__name__},
        )
        return []
    ids = [
        item
        for item in value
        if isinstance(item, str) and 0 < len(item) <= MAX_CALL_ID_LENGTH
    ]
    return ids[-MAX_PARENT_CALL_IDS:]


def run_all(targets: Iterable[Any], method: str, swallow: bool = False) -> None:
    """Call ``method`` on every target concurrently and wait for all of them.

    Errors are caught inside each green thread (eventlet would otherwise print
    every one of them before we re-raise the first).
    """

    def call(target: Any) -> BaseException | None:
        try:
            getattr(target, method)()
        except Exception as exc:
            return exc
        return None

    threads = [concurrency.spawn(call, target) for target in targets]
    first_error: BaseException | None = None
    for thread in threads:
        exc = thread.wait()
        if exc is None:
            continue
        if swallow:
            log.warning("%s raised: %r", method, exc, exc_info=exc)
        elif first_error is None:
            first_error = exc
    if first_error is not None:
        raise first_error


class ServiceContainer:
    """Runs one service: binds its extensions, drives their lifecycle, spawns workers."""

    def __init__(self, service_cls: type, config: dict[str, Any]) -> None:
        self.service_cls = service_cls
        self.config = config
        self.service_name = get_service_name(service_cls)
        self.shared_extensions: dict[Any, Extension] = {}
        self.max_workers = config.get(MAX_WORKERS_CONFIG_KEY) or DEFAULT_MAX_WORKERS
        self.drain_timeout = float(
            config.get(DRAIN_TIMEOUT_CONFIG_KEY, DEFAULT_DRAIN_TIMEOUT)
        )
        self.serializer, self.accept = serialization.setup(config)

        self.dependencies: set[DependencyProvider] = set()
        self.entrypoints: set[Entrypoint] = set()
        self.subextensions: set[Extension] = set()

        for attr_name, value in inspect.getmembers(service_cls):
            if isinstance(value, DependencyProvider):
                bound = value.bind(self, attr_name)
                self.dependencies.add(bound)  # type: ignore[arg-type]
                self.subextensions.update(iter_extensions(bound))

        for method_name, method in inspect.getmembers(service_cls, callable):
            for entrypoint in getattr(method, ENTRYPOINT_EXTENSIONS_ATTR, ()):
                bound = entrypoint.bind(self, method_name)
                self.entrypoints.add(bound)  # type: ignore[arg-type]
                self.subextensions.update(iter_extensions(bound))

        self.started = False
        self._worker_pool = concurrency.GreenPool(size=self.max_workers)
        self._worker_threads: dict[WorkerContext, concurrency.GreenThread] = {}
        self._managed_threads: dict[concurrency.GreenThread, str | None] = {}
        self._worker_related: set[concurrency.GreenThread] = set()
        # "<provider>.<hook>" -> error type, while that hook keeps failing. Unlike
        # nameko, a failing hook does not kill the container; readiness reports
        # these instead (framework.health), so a broken dependency is not silent.
        self.failing_hooks: dict[str, str] = {}
        self._being_killed = False
        self._died = concurrency.Event()

    @property
    def extensions(self) -> set[Extension]:
        return set(self.entrypoints) | set(self.dependencies) | self.subextensions

    @property
    def interface(self) -> ServiceContainer:
        return self

    @property
    def active_workers(self) -> int:
        return len(self._worker_threads)

    @property
    def busy(self) -> bool:
        """Whether any worker or worker-related thread is still running."""
        return bool(self._worker_threads or self._worker_related)

    @property
    def free_workers(self) -> int:
        return self._worker_pool.free()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        log.info("starting %s", self, extra={"service": self.service_name})
        self.started = True
        run_all(self.extensions, "setup")
        run_all(self.extensions, "start")

    def stop(self) -> None:
        """Graceful: stop taking work, finish in-flight workers, then release.

        Workers ack their messages as they finish, and connections are only closed
        by the sub-extensions, which stop last; so no message a worker completed is
        redelivered because of a stop. The drain also waits for worker-related
        threads (a message waiting for a free worker, an error reply, a dead
        letter being published), which need the publisher. Workers still running
        after the drain deadline are killed: their messages were never acked and
        go to another instance.
        """
        if self._died.ready():
            return
        if self._being_killed:
            self._died.wait()
            return
        log.info("stopping %s", self, extra={"service": self.service_name})
        run_all(self.entrypoints, "stop")
        if not self._wait_for_workers(self.drain_timeout):
            log.warning(
                "killing %d workers still running after the %.1fs drain deadline",
                len(self._worker_threads) + len(self._worker_related),
                self.drain_timeout,
                extra={"service": self.service_name},
            )
            self._kill_worker_threads()
        run_all(self.dependencies, "stop")
        run_all(self.subextensions, "stop")
        self._kill_managed_threads()
        self.started = False
        if not self._died.ready():
            self._died.send(None)

    def kill(self, exc_info: ExcInfo | None = None) -> None:
        """Stop now. Idempotent; in-flight messages are left unacked (redelivered)."""
        if self._being_killed:
            try:
                self._died.wait()
            except Exception:
                pass
            return
        self._being_killed = True
        if exc_info is not None:
            log.info("killing %s due to %s", self, exc_info[1])
        else:
            log.info("killing %s", self)
        run_all(self.entrypoints, "kill", swallow=True)
        self._kill_worker_threads()
        run_all(self.extensions, "kill", swallow=True)
        self._kill_managed_threads()
        self.started = False
        if not self._died.ready():
            if exc_info is not None:
                self._died.send_exception(*exc_info)
            else:
                self._died.send(None)

    def wait(self) -> Any:
        return self._died.wait()

    def _wait_for_workers(self, timeout: float | None) -> bool:
        # A worker-related thread may start a worker (it waited for a free one)
        # and a worker may start one (an error reply): wait until both are gone.
        deadline = concurrency.Deadline(timeout)
        while self.busy:
            if deadline.expired():
                return False
            with concurrency.Timeout(deadline.remaining(), False):
                for thread in list(self._worker_related):
                    try:
                        thread.wait()
                    except concurrency.GreenletExit:
                        pass
                self._worker_pool.waitall()
        return True

    def _kill_worker_threads(self) -> None:
        for thread in list(self._worker_related):
            concurrency.kill(thread)
        for worker_ctx, thread in list(self._worker_threads.items()):
            log.warning("killing active worker %s", worker_ctx)
            concurrency.kill(thread)

    def _kill_managed_threads(self) -> None:
        for thread, identifier in list(self._managed_threads.items()):
            log.debug("killing managed thread %s", identifier or thread)
            concurrency.kill(thread)

    # -- workers -------------------------------------------------------------------

    def spawn_worker(
        self,
        entrypoint: Entrypoint,
        args: Iterable[Any],
        kwargs: dict[str, Any],
        context_data: dict[str, Any] | None = None,
        handle_result: HandleResult | None = None,
    ) -> WorkerContext:
        """Run ``entrypoint``'s method in a new worker; blocks while the pool is full."""
        if self._being_killed:
            log.info("Worker spawn prevented due to being killed")
            raise ContainerBeingKilled()
        service = self.service_cls()
        worker_ctx = WorkerContext(
            self, service, entrypoint, args, kwargs, data=context_data
        )
        thread = self._worker_pool.spawn(self._run_worker, worker_ctx, handle_result)
        self._worker_threads[worker_ctx] = thread
        thread.link(self._worker_thread_exited, worker_ctx)
        return worker_ctx

    def _worker_thread_exited(
        self, thread: concurrency.GreenThread, worker_ctx: WorkerContext
    ) -> None:
        self._worker_threads.pop(worker_ctx, None)

    def _run_worker(
        self, worker_ctx: WorkerContext, handle_result: HandleResult | None
    ) -> None:
        started = time.perf_counter()
        for observer in worker_observers:
            observer.worker_started(worker_ctx)
        try:
            exc_info = self._call_worker(worker_ctx, handle_result)
        except BaseException:
            # Killed mid-call (GreenletExit): observers still hear of the end, so
            # e.g. an in-flight gauge cannot leak.
            for observer in worker_observers:
                observer.worker_finished(
                    worker_ctx, "killed", time.perf_counter() - started
                )
            raise
        self._log_worker(worker_ctx, started, exc_info)

    def _call_worker(
        self, worker_ctx: WorkerContext, handle_result: HandleResult | None
    ) -> ExcInfo | None:
        result: Any = None
        exc_info: ExcInfo | None = None
        try:
            self._inject_dependencies(worker_ctx)
        except Exception as exc:
            # A broken provider fails this worker, not the service.
            exc_info = sys.exc_info()  # type: ignore[assignment]
            log_worker_error(log, worker_ctx, exc, "dependency setup failed")
        else:
            method = getattr(
                worker_ctx.service, worker_ctx.entrypoint.method_name or ""
            )
            try:
                result = method(*worker_ctx.args, **worker_ctx.kwargs)
            except Exception as exc:
                exc_info = sys.exc_info()  # type: ignore[assignment]
                # Its type, call id, frames and redacted arguments; the message
                # only of an expected error (an unexpected one may quote secrets).
                log_worker_error(log, worker_ctx, exc)

        if handle_result is not None:
            try:
                result, exc_info = handle_result(worker_ctx, result, exc_info)
            except Exception as exc:
                log_worker_error(
                    log, worker_ctx, exc, "error handling a worker's result"
                )

        self._worker_result(worker_ctx, result, exc_info)
        self._worker_teardown(worker_ctx)
        return exc_info

    def _inject_dependencies(self, worker_ctx: WorkerContext) -> None:
        for provider in self.dependencies:
            setattr(
                worker_ctx.service,
                provider.attr_name or "",
                provider.get_dependency(worker_ctx),
            )
        for provider in self.dependencies:
            try:
                provider.worker_setup(worker_ctx)
            except Exception as exc:
                self._hook_failed(provider, "worker_setup", exc)
                raise
            if self.failing_hooks:
                self._hook_succeeded(provider, "worker_setup")

    def _hook_failed(self, provider: Any, hook: str, exc: BaseException) -> None:
        self.failing_hooks[f"{provider.attr_name}.{hook}"] = type(exc).__name__

    def _hook_succeeded(self, provider: Any, hook: str) -> None:
        self.failing_hooks.pop(f"{provider.attr_name}.{hook}", None)

    def _worker_result(
        self, worker_ctx: WorkerContext, result: Any, exc_info: ExcInfo | None
    ) -> None:
        for provider in self.dependencies:
            try:
                provider.worker_result(worker_ctx, result, exc_info)
            except Exception as exc:
                self._hook_failed(provider, "worker_result", exc)
                fields = {"provider": repr(provider)}
                log_worker_error(log, worker_ctx, exc, "worker_result failed", fields)
            else:
                if self.failing_hooks:
                    self._hook_succeeded(provider, "worker_result")

    def _worker_teardown(self, worker_ctx: WorkerContext) -> None:
        for provider in self.dependencies:
            try:
                provider.worker_teardown(worker_ctx)
            except Exception as exc:
                self._hook_failed(provider, "worker_teardown", exc)
                fields = {"provider": repr(provider)}
                log_worker_error(log, worker_ctx, exc, "worker_teardown failed", fields)
            else:
                if self.failing_hooks:
                    self._hook_succeeded(provider, "worker_teardown")

    def _log_worker(
        self, worker_ctx: WorkerContext, started: float, exc_info: ExcInfo | None
    ) -> None:
        duration = time.perf_counter() - started
        outcome = "success"
        if exc_info is not None:
            expected = worker_ctx.entrypoint.expected_exceptions
            outcome = (
                "expected_error"
                if expected and isinstance(exc_info[1], expected)
                else "error"
            )
        # Observers before the log line: a handler may yield, and a worker killed
        # there would otherwise never report its end.
        for observer in worker_observers:
            observer.worker_finished(worker_ctx, outcome, duration)
        if not worker_log.isEnabledFor(logging.INFO):
            return
        _worker_finished.log(
            {
                "service": self.service_name,
                "entrypoint": worker_ctx.entrypoint.method_name,
                "call_id": worker_ctx.call_id,
                "call_id_stack": worker_ctx.call_id_stack,
                "duration_ms": round(duration * 1000, 3),
                "outcome": outcome,
            }
        )

    def spawn_worker_related(
        self, fn: Callable[..., Any], *args: Any
    ) -> concurrency.GreenThread:
        """Run ``fn(*args)`` in a green thread that belongs to handling a message
        without being a worker: waiting for a free worker, sending an error
        reply, dead-lettering. A graceful stop waits for it as for a worker
        (before the publisher closes); a kill kills it. Its errors are logged in
        the service's log format (type only), never printed by eventlet.
        """
        thread = concurrency.spawn(self._run_worker_related, fn, args)
        self._worker_related.add(thread)
        thread.link(self._worker_related_exited)
        return thread

    def _run_worker_related(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.error(
                "error in a worker-related thread",
                extra={
                    "service": self.service_name,
                    "function": getattr(fn, "__qualname__", repr(fn)),
                    "error_type": type(exc).__name__,
                },
            )

    def _worker_related_exited(self, thread: concurrency.GreenThread) -> None:
        self._worker_related.discard(thread)

    # -- managed threads -------------------------------------------------------------

    def spawn_managed_thread(
        self, fn: Callable[[], Any], identifier: str | None = None
    ) -> concurrency.GreenThread:
        """A background thread owned by the container: killed when it stops.

        An unhandled error in it kills the container: such threads run the
        machinery (consumer loops, timers), and a service without them is broken.
        """
        thread = concurrency.spawn(fn)
        self._managed_threads[thread] = identifier
        thread.link(self._managed_thread_exited, identifier)
        return thread

    def _managed_thread_exited(
        self, thread: concurrency.GreenThread, identifier: str | None
    ) -> None:
        self._managed_threads.pop(thread, None)
        try:
            thread.wait()
        except concurrency.GreenletExit:
            pass
        except Exception:
            log.critical(
                "%s thread %s exited with error", self, identifier, exc_info=True
            )
            concurrency.spawn_n(self.kill, sys.exc_info())

    def __repr__(self) -> str:
        return f"<ServiceContainer [{self.service_name}] at 0x{id(self):x}>"
