"""Our services in the interop tests: run in the test process, on our framework."""

from __future__ import annotations

from typing import Any

from framework.containers import WorkerContext
from framework.events import EventDispatcher
from framework.extensions import DependencyProvider
from framework.rpc import RpcProxy, rpc
from interop import contract

PEER_TIMEOUT = 10  # seconds; a lost reply fails the test instead of hanging it


class WorkerContextProvider(DependencyProvider):
    """Injects the worker context itself, to report the caller's context data."""

    def get_dependency(self, worker_ctx: WorkerContext) -> WorkerContext:
        return worker_ctx


def describe_context(worker_ctx: WorkerContext) -> dict[str, Any]:
    """The same shape as ``nameko_side.report.describe_context``."""
    return {
        "data": dict(worker_ctx.data),
        "call_id_stack": list(worker_ctx.call_id_stack),
    }


class Ours:
    """Serves nameko's clients, and calls nameko's ``EchoService`` with our RpcProxy."""

    name = contract.OURS

    nameko_echo = RpcProxy(contract.NAMEKO_ECHO, timeout=PEER_TIMEOUT)
    worker_ctx = WorkerContextProvider()

    @rpc
    def echo(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}

    @rpc
    def greet(self, name: str, greeting: str = "Hello") -> str:
        return f"{greeting}, {name}!"

    @rpc(expected_exceptions=ValueError)
    def raise_plain(self, message: str) -> None:
        raise ValueError(message)

    @rpc
    def raise_unexpected(self, message: str) -> None:
        # Not declared: its text stays in the service (framework.exceptions.safe_error).
        raise ValueError(message)

    @rpc
    def raise_registered(self, reason: str) -> None:
        raise contract.Rejected(reason)

    @rpc(expected_exceptions=contract.NotRegistered)
    def raise_unregistered(self, reason: str) -> None:
        raise contract.NotRegistered(reason)

    @rpc
    def relay_context(self) -> dict[str, Any]:
        """nameko -> ours -> nameko: what this hop saw, and what the next one saw."""
        return {
            "here": describe_context(self.worker_ctx),
            "next": self.nameko_echo.context(),
        }

    @rpc
    def call_nameko(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call to nameko through our in-service RpcProxy (run it with
        ``entrypoint_hook`` to see its exception as raised here)."""
        return getattr(self.nameko_echo, method)(*args, **kwargs)

    @rpc
    def call_nameko_with_timeout(self, timeout: float, method: str, *args: Any) -> Any:
        return getattr(self.nameko_echo, method).with_timeout(timeout)(*args)

    @rpc
    def call_nameko_async(
        self, calls: list[tuple[str, list[Any], dict[str, Any]]]
    ) -> list[Any]:
        """Start every call, then collect every reply: the calls overlap."""
        replies = [
            getattr(self.nameko_echo, method).call_async(*args, **kwargs)
            for method, args, kwargs in calls
        ]
        return [reply.result() for reply in replies]


class OursDispatcher:
    name = contract.OURS_DISPATCHER

    dispatch = EventDispatcher()

    @rpc
    def emit(self, event_type: str, payload: Any) -> None:
        self.dispatch(event_type, payload)
