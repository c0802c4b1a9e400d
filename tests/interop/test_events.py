"""Events between nameko 2.14.1 and our framework: each handler type, both ways,
and handlers of both sides sharing one queue.

Every test tags its payloads with a fresh ``run`` id, since the module's nameko
processes (and the durable queues) outlive a single test.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from framework.events import BROADCAST, SERVICE_POOL, SINGLETON, event_handler
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_hook
from framework.testing.utils import assert_stops_raising
from interop import contract
from interop.our_services import (
    PEER_TIMEOUT,
    OursDispatcher,
    WorkerContextProvider,
    describe_context,
)
from interop.peers import call, dispatch

HANDLER_TYPES = [SERVICE_POOL, SINGLETON, BROADCAST]
DELIVERY_TIMEOUT = 20  # seconds for events to be handled
POOL_EVENT_COUNT = 40


@pytest.fixture(scope="module", autouse=True)
def nameko_peers(start_nameko: Callable[..., Any]) -> None:
    start_nameko(
        contract.NAMEKO_DISPATCHER, contract.NAMEKO_LISTENER, contract.POOL_MEMBER
    )


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex


class Handled:
    """What our handlers handled: ``(handler type, payload, context)`` records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, handler: str, payload: Any, worker_ctx: Any) -> None:
        self.records.append(
            {
                "handler": handler,
                "payload": payload,
                "context": describe_context(worker_ctx),
            }
        )

    def of(self, handler: str, run: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["handler"] == handler and r["payload"].get("run") == run
        ]


def wait_for(predicate: Callable[[], Any], what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy (within the deadline)."""

    def check() -> Any:
        value = predicate()
        assert value, f"still waiting for {what}"
        return value

    return assert_stops_raising(
        check, AssertionError, timeout=DELIVERY_TIMEOUT, interval=0.05
    )


# -- nameko dispatches, we handle ---------------------------------------------------------


@pytest.fixture
def our_listener(
    container_factory: Callable[..., Any], config: dict[str, Any]
) -> Handled:
    """Our ``ours_listener``: one handler of each type for nameko_dispatcher's event."""
    handled = Handled()

    class OursListener:
        name = "ours_listener"

        worker_ctx = WorkerContextProvider()

        @event_handler(
            contract.NAMEKO_DISPATCHER, contract.EVENT, handler_type=SERVICE_POOL
        )
        def handle_pooled(self, payload: Any) -> None:
            handled.add(SERVICE_POOL, payload, self.worker_ctx)

        @event_handler(
            contract.NAMEKO_DISPATCHER, contract.EVENT, handler_type=SINGLETON
        )
        def handle_singleton(self, payload: Any) -> None:
            handled.add(SINGLETON, payload, self.worker_ctx)

        @event_handler(
            contract.NAMEKO_DISPATCHER,
            contract.EVENT,
            handler_type=BROADCAST,
            reliable_delivery=False,
        )
        def handle_broadcast(self, payload: Any) -> None:
            handled.add(BROADCAST, payload, self.worker_ctx)

    container_factory(OursListener, config).start()
    return handled


@pytest.mark.parametrize("handler_type", HANDLER_TYPES)
def test_event_from_a_nameko_service_reaches_our_handler(
    handler_type: str, our_listener: Handled, nameko_client: Any, run: str
) -> None:
    payload = {"run": run, "text": "événement 🎉", "items": [1, {"nested": True}]}

    [outcome] = nameko_client(
        [call(contract.NAMEKO_DISPATCHER, "emit", contract.EVENT, payload)],
        context_data={"language": "de"},
    )
    assert outcome == {"result": None}

    [record] = wait_for(
        lambda: our_listener.of(handler_type, run), f"our {handler_type} handler"
    )
    assert record["payload"] == payload
    assert record["context"]["data"] == {"language": "de"}
    stack = record["context"]["call_id_stack"]
    assert stack[0].startswith("standalone_rpc_proxy.call.")
    assert stack[1].startswith(f"{contract.NAMEKO_DISPATCHER}.emit.")
    assert stack[2].startswith(
        f"ours_listener.{contract.HANDLER_METHODS[handler_type]}."
    )


def test_event_from_nameko_standalone_dispatcher_reaches_our_handler(
    our_listener: Handled, nameko_client: Any, run: str
) -> None:
    payload = {"run": run, "from": "nameko's event_dispatcher"}

    [outcome] = nameko_client(
        [dispatch(contract.NAMEKO_DISPATCHER, contract.EVENT, payload)]
    )
    assert outcome == {"result": None}

    # nameko's standalone dispatcher sends no headers: the handler starts a stack.
    [record] = wait_for(
        lambda: our_listener.of(SERVICE_POOL, run), "our service-pool handler"
    )
    assert record["payload"] == payload
    assert record["context"]["data"] == {}
    assert [
        entry.rsplit(".", 1)[0] for entry in record["context"]["call_id_stack"]
    ] == ["ours_listener.handle_pooled"]


# -- we dispatch, nameko handles ----------------------------------------------------------


def nameko_handled(
    config: dict[str, Any], service: str, run: str
) -> list[dict[str, Any]]:
    with ClusterRpcProxy(config, timeout=PEER_TIMEOUT) as proxy:
        return proxy[service].handled(run)


@pytest.mark.parametrize("handler_type", HANDLER_TYPES)
def test_event_from_our_service_reaches_nameko_handler(
    handler_type: str, container_factory: Any, config: dict[str, Any], run: str
) -> None:
    container = container_factory(OursDispatcher, config)
    container.start()
    payload = {"run": run, "text": "événement 🎉", "items": [1, {"nested": True}]}

    with entrypoint_hook(
        container, "emit", context_data={"language": "de", "tenant": "acmé"}
    ) as emit:
        emit(contract.EVENT, payload)

    def handled_by_this_type() -> list[dict[str, Any]]:
        return [
            r
            for r in nameko_handled(config, contract.NAMEKO_LISTENER, run)
            if r["handler"] == handler_type
        ]

    [record] = wait_for(handled_by_this_type, f"nameko's {handler_type} handler")
    assert record["payload"] == payload
    assert record["context"]["data"] == {"language": "de", "tenant": "acmé"}
    stack = record["context"]["call_id_stack"]
    assert stack[0].startswith(f"{contract.OURS_DISPATCHER}.emit.")
    assert stack[1].startswith(
        f"{contract.NAMEKO_LISTENER}.{contract.HANDLER_METHODS[handler_type]}."
    )


def test_event_from_our_standalone_dispatcher_reaches_nameko_handler(
    config: dict[str, Any], run: str
) -> None:
    payload = {"run": run, "from": "our event_dispatcher"}
    dispatch_event = event_dispatcher(config)
    try:
        dispatch_event(contract.OURS_DISPATCHER, contract.EVENT, payload)
    finally:
        dispatch_event.close()

    def handled_by_pool() -> list[dict[str, Any]]:
        return [
            r
            for r in nameko_handled(config, contract.NAMEKO_LISTENER, run)
            if r["handler"] == SERVICE_POOL
        ]

    [record] = wait_for(handled_by_pool, "nameko's service-pool handler")
    assert record["payload"] == payload


# -- one queue, handlers on both sides ----------------------------------------------------


@pytest.fixture
def our_pool_member(
    container_factory: Callable[..., Any], config: dict[str, Any]
) -> Handled:
    """Our ``pool_member``: the same service name, handler types and method names as
    nameko's, so the SERVICE_POOL and SINGLETON queues are the very same queues."""
    handled = Handled()

    class PoolMember:
        name = contract.POOL_MEMBER

        worker_ctx = WorkerContextProvider()

        @event_handler(
            contract.POOL_SOURCE,
            contract.POOL_EVENTS[SERVICE_POOL],
            handler_type=SERVICE_POOL,
        )
        def handle_pooled(self, payload: Any) -> None:
            handled.add(SERVICE_POOL, payload, self.worker_ctx)

        @event_handler(
            contract.POOL_SOURCE,
            contract.POOL_EVENTS[SINGLETON],
            handler_type=SINGLETON,
        )
        def handle_singleton(self, payload: Any) -> None:
            handled.add(SINGLETON, payload, self.worker_ctx)

        @event_handler(
            contract.POOL_SOURCE,
            contract.POOL_EVENTS[BROADCAST],
            handler_type=BROADCAST,
            reliable_delivery=False,
        )
        def handle_broadcast(self, payload: Any) -> None:
            handled.add(BROADCAST, payload, self.worker_ctx)

    container_factory(PoolMember, config).start()
    return handled


def dispatch_pool_events(config: dict[str, Any], handler_type: str, run: str) -> None:
    dispatch_event = event_dispatcher(config)
    try:
        for n in range(POOL_EVENT_COUNT):
            dispatch_event(
                contract.POOL_SOURCE,
                contract.POOL_EVENTS[handler_type],
                {"run": run, "n": n},
            )
    finally:
        dispatch_event.close()


@pytest.mark.parametrize("handler_type", [SERVICE_POOL, SINGLETON])
def test_nameko_and_our_handlers_on_one_queue_handle_each_event_exactly_once_between_them(
    handler_type: str, our_pool_member: Handled, config: dict[str, Any], run: str
) -> None:
    dispatch_pool_events(config, handler_type, run)

    def handled_by_both() -> tuple[list[int], list[int]] | None:
        ours = [r["payload"]["n"] for r in our_pool_member.of(handler_type, run)]
        theirs = [
            r["payload"]["n"]
            for r in nameko_handled(config, contract.POOL_MEMBER, run)
            if r["handler"] == handler_type
        ]
        return (ours, theirs) if len(ours) + len(theirs) >= POOL_EVENT_COUNT else None

    ours, theirs = wait_for(handled_by_both, f"{POOL_EVENT_COUNT} events handled")
    duplicates = [n for n, count in Counter(ours + theirs).items() if count > 1]
    assert duplicates == []
    assert sorted(ours + theirs) == list(range(POOL_EVENT_COUNT))
    # The broker round-robins between the two consumers: both took a share.
    assert ours and theirs, (ours, theirs)


def test_nameko_and_our_broadcast_handlers_each_handle_every_event(
    our_pool_member: Handled, config: dict[str, Any], run: str
) -> None:
    dispatch_pool_events(config, BROADCAST, run)

    def handled_by_both() -> tuple[list[int], list[int]] | None:
        ours = [r["payload"]["n"] for r in our_pool_member.of(BROADCAST, run)]
        theirs = [
            r["payload"]["n"]
            for r in nameko_handled(config, contract.POOL_MEMBER, run)
            if r["handler"] == BROADCAST
        ]
        done = len(ours) >= POOL_EVENT_COUNT and len(theirs) >= POOL_EVENT_COUNT
        return (ours, theirs) if done else None

    ours, theirs = wait_for(
        handled_by_both, f"{POOL_EVENT_COUNT} events handled on each side"
    )
    assert sorted(ours) == list(range(POOL_EVENT_COUNT))
    assert sorted(theirs) == list(range(POOL_EVENT_COUNT))
