"""nameko 2.14.1 services: the peers our services and clients talk to.

Run by ``nameko run interop.nameko_side.services:<Class> --config <file>`` in the
nameko venv, with ``tests/`` on ``PYTHONPATH``. Every service answers ``ping`` so
the test can tell when it consumes. Event handlers record what they handled in
this process; ``handled(run)`` returns the records of one test run.
"""

from __future__ import annotations

import time

from nameko.events import (
    BROADCAST,
    SERVICE_POOL,
    SINGLETON,
    EventDispatcher,
    EventHandler,
    event_handler,
)
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy, rpc

from interop import contract
from interop.nameko_side.report import describe_context, outcome

HANDLED: list[dict] = []


class WorkerContextProvider(DependencyProvider):
    """Injects the worker context itself, to report the caller's context data."""

    def get_dependency(self, worker_ctx):
        return worker_ctx


class FixedBroadcastHandler(EventHandler):
    """BROADCAST with reliable delivery: needs an identifier that survives restarts."""

    @property
    def broadcast_identifier(self):
        return contract.FIXED_BROADCAST_IDENTIFIER


def record(handler, payload, worker_ctx):
    HANDLED.append(
        {
            "handler": handler,
            "payload": payload,
            "context": describe_context(worker_ctx),
        }
    )


def handled_in_run(run):
    return [
        entry
        for entry in HANDLED
        if isinstance(entry["payload"], dict) and entry["payload"].get("run") == run
    ]


class EchoService:
    name = contract.NAMEKO_ECHO

    worker_ctx = WorkerContextProvider()

    @rpc
    def ping(self):
        return "pong"

    @rpc
    def echo(self, *args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    @rpc
    def greet(self, name, greeting="Hello"):
        return f"{greeting}, {name}!"

    @rpc
    def slow(self, seconds):
        time.sleep(seconds)  # green: `nameko run` monkey patches
        return seconds

    @rpc
    def raise_plain(self, message):
        raise ValueError(message)

    @rpc
    def raise_registered(self, reason):
        raise contract.Rejected(reason)

    @rpc
    def raise_unregistered(self, reason):
        raise contract.NotRegistered(reason)

    @rpc
    def context(self):
        return describe_context(self.worker_ctx)


class CallerService:
    """Calls our service through nameko's in-service ``RpcProxy``."""

    name = contract.NAMEKO_CALLER

    ours = RpcProxy(contract.OURS)
    worker_ctx = WorkerContextProvider()

    @rpc
    def ping(self):
        return "pong"

    @rpc
    def call_ours(self, method, args, kwargs):
        return outcome(lambda: getattr(self.ours, method)(*args, **kwargs))

    @rpc
    def call_ours_async(self, calls):
        """Start every call, then collect every reply: the calls overlap."""
        replies = [
            getattr(self.ours, method).call_async(*args, **kwargs)
            for method, args, kwargs in calls
        ]
        return [outcome(reply.result) for reply in replies]

    @rpc
    def relay_context(self):
        """nameko -> ours -> nameko: what each hop saw of the context."""
        return {
            "here": describe_context(self.worker_ctx),
            "next": self.ours.relay_context(),
        }


class DispatcherService:
    name = contract.NAMEKO_DISPATCHER

    dispatch = EventDispatcher()

    @rpc
    def ping(self):
        return "pong"

    @rpc
    def emit(self, event_type, payload):
        self.dispatch(event_type, payload)


class ListenerService:
    """One handler of each type for the events our dispatcher sends."""

    name = contract.NAMEKO_LISTENER

    worker_ctx = WorkerContextProvider()

    @rpc
    def ping(self):
        return "pong"

    @rpc
    def handled(self, run):
        return handled_in_run(run)

    @event_handler(contract.OURS_DISPATCHER, contract.EVENT, handler_type=SERVICE_POOL)
    def handle_pooled(self, payload):
        record(SERVICE_POOL, payload, self.worker_ctx)

    @event_handler(contract.OURS_DISPATCHER, contract.EVENT, handler_type=SINGLETON)
    def handle_singleton(self, payload):
        record(SINGLETON, payload, self.worker_ctx)

    @event_handler(
        contract.OURS_DISPATCHER,
        contract.EVENT,
        handler_type=BROADCAST,
        reliable_delivery=False,
    )
    def handle_broadcast(self, payload):
        record(BROADCAST, payload, self.worker_ctx)


class PoolMemberService:
    """Shares its handlers' queues with our ``pool_member`` (same names throughout)."""

    name = contract.POOL_MEMBER

    worker_ctx = WorkerContextProvider()

    @rpc
    def ping(self):
        return "pong"

    @rpc
    def handled(self, run):
        return handled_in_run(run)

    @event_handler(
        contract.POOL_SOURCE,
        contract.POOL_EVENTS[SERVICE_POOL],
        handler_type=SERVICE_POOL,
    )
    def handle_pooled(self, payload):
        record(SERVICE_POOL, payload, self.worker_ctx)

    @event_handler(
        contract.POOL_SOURCE, contract.POOL_EVENTS[SINGLETON], handler_type=SINGLETON
    )
    def handle_singleton(self, payload):
        record(SINGLETON, payload, self.worker_ctx)

    @event_handler(
        contract.POOL_SOURCE,
        contract.POOL_EVENTS[BROADCAST],
        handler_type=BROADCAST,
        reliable_delivery=False,
    )
    def handle_broadcast(self, payload):
        record(BROADCAST, payload, self.worker_ctx)


class WireMirrorService:
    """Every kind of entity a service declares; our ``wire_mirror`` has the same."""

    name = contract.WIRE_MIRROR

    other = RpcProxy(contract.NAMEKO_ECHO)  # a reply queue
    dispatch = EventDispatcher()  # the event exchange

    @rpc
    def ping(self):
        return "pong"

    @event_handler(contract.WIRE_MIRROR, contract.EVENT, handler_type=SERVICE_POOL)
    def pooled(self, payload):
        pass

    @event_handler(
        contract.WIRE_MIRROR,
        contract.EVENT,
        handler_type=SERVICE_POOL,
        reliable_delivery=False,
    )
    def pooled_unreliable(self, payload):
        pass

    @event_handler(contract.WIRE_MIRROR, contract.EVENT, handler_type=SINGLETON)
    def singleton(self, payload):
        pass

    @FixedBroadcastHandler.decorator(
        contract.WIRE_MIRROR, contract.EVENT, handler_type=BROADCAST
    )
    def broadcast(self, payload):
        pass
