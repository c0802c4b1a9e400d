"""Our broker entities are nameko's: the same names, the same flags and arguments.

RabbitMQ refuses to redeclare an exchange or queue with different attributes
(``PRECONDITION_FAILED``), so a nameko service and ours can share a broker only if
both declare every entity identically. Here nameko redeclares, with its own
definitions (``nameko_side/declare.py``), what our ``wire_mirror`` service and our
standalone proxy declared, and the other way round. Each test has its own vhost.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import amqp.exceptions
import pytest

from framework import concurrency
from framework.events import (
    BROADCAST,
    SERVICE_POOL,
    SINGLETON,
    EventDispatcher,
    EventHandler,
    event_handler,
)
from framework.rpc import ReplyListener, RpcProxy, rpc
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_hook
from framework.testing.utils import assert_stops_raising, get_extension
from interop import contract
from interop.our_services import PEER_TIMEOUT
from interop.peers import run_nameko_script

DECLARE_SCRIPT = "interop.nameko_side.declare"


class FixedBroadcastHandler(EventHandler):
    """BROADCAST with reliable delivery: needs an identifier that survives restarts."""

    @property
    def broadcast_identifier(self) -> str:
        return contract.FIXED_BROADCAST_IDENTIFIER


def wire_mirror(handled: list[str]) -> type:
    """Our twin of nameko's ``WireMirrorService``: every kind of entity a service declares."""

    class WireMirror:
        name = contract.WIRE_MIRROR

        nameko_echo = RpcProxy(contract.NAMEKO_ECHO)  # a reply queue
        dispatch = EventDispatcher()  # the event exchange

        @rpc
        def ping(self) -> str:
            return "pong"

        @rpc
        def emit(self, payload: Any) -> None:
            self.dispatch(contract.EVENT, payload)

        @event_handler(contract.WIRE_MIRROR, contract.EVENT, handler_type=SERVICE_POOL)
        def pooled(self, payload: Any) -> None:
            handled.append("pooled")

        @event_handler(
            contract.WIRE_MIRROR,
            contract.EVENT,
            handler_type=SERVICE_POOL,
            reliable_delivery=False,
        )
        def pooled_unreliable(self, payload: Any) -> None:
            handled.append("pooled_unreliable")

        @event_handler(contract.WIRE_MIRROR, contract.EVENT, handler_type=SINGLETON)
        def singleton(self, payload: Any) -> None:
            handled.append("singleton")

        @FixedBroadcastHandler.decorator(
            contract.WIRE_MIRROR, contract.EVENT, handler_type=BROADCAST
        )
        def broadcast(self, payload: Any) -> None:
            handled.append("broadcast")

    return WireMirror


EXPECTED_QUEUES = {
    f"rpc-{contract.WIRE_MIRROR}",
    f"evt-{contract.WIRE_MIRROR}-{contract.EVENT}--{contract.WIRE_MIRROR}.pooled",
    f"evt-{contract.WIRE_MIRROR}-{contract.EVENT}--{contract.WIRE_MIRROR}.pooled_unreliable",
    f"evt-{contract.WIRE_MIRROR}-{contract.EVENT}",
    f"evt-{contract.WIRE_MIRROR}-{contract.EVENT}--{contract.WIRE_MIRROR}.broadcast-{contract.FIXED_BROADCAST_IDENTIFIER}",
}
EXPECTED_EXCHANGES = {"nameko-rpc", f"{contract.WIRE_MIRROR}.events"}


def nameko_redeclares(
    python: Path, config: dict[str, Any], reply_queues: list[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    request = {
        "config": {"AMQP_URI": config["AMQP_URI"]},
        "reply_queues": list(reply_queues),
    }
    return run_nameko_script(python, DECLARE_SCRIPT, request)


def emit_and_wait_for_every_handler(container: Any, handled: list[str]) -> None:
    with entrypoint_hook(container, "emit") as emit:
        emit({"hello": "wire"})

    def every_handler_ran() -> None:
        assert sorted(handled) == [
            "broadcast",
            "pooled",
            "pooled_unreliable",
            "singleton",
        ]

    assert_stops_raising(every_handler_ran, AssertionError, timeout=10, interval=0.05)


def test_nameko_redeclares_every_entity_we_declared_without_a_mismatch(
    container_factory: Callable[..., Any],
    rabbit_config: dict[str, Any],
    rabbit_manager: Any,
    nameko_venv_python: Path,
) -> None:
    handled: list[str] = []
    container = container_factory(wire_mirror(handled), rabbit_config)
    container.start()
    emit_and_wait_for_every_handler(
        container, handled
    )  # our dispatcher declared the event exchange
    reply_listener = get_extension(container, ReplyListener)

    with ClusterRpcProxy(rabbit_config, timeout=PEER_TIMEOUT) as proxy:
        standalone_listener = proxy._client._reply_listener
        ours_declared = {
            queue["name"] for queue in rabbit_manager.get_queues(rabbit_config["vhost"])
        }
        reply_queues = [
            (reply_listener.queue.name, reply_listener.routing_key),
            (standalone_listener.queue.name, standalone_listener.routing_key),
        ]
        assert {name for name, _ in reply_queues} <= ours_declared

        results = nameko_redeclares(nameko_venv_python, rabbit_config, reply_queues)

    refused = [result for result in results if result["error"]]
    assert refused == []
    redeclared_queues = {r["name"] for r in results if r["kind"] == "queue"}
    redeclared_exchanges = {r["name"] for r in results if r["kind"] == "exchange"}
    # nameko named every queue as we did: it redeclared ours rather than making new ones.
    assert redeclared_queues == EXPECTED_QUEUES | {name for name, _ in reply_queues}
    assert redeclared_queues <= ours_declared
    assert redeclared_exchanges == EXPECTED_EXCHANGES


def test_our_service_consumes_entities_nameko_declared_first(
    container_factory: Callable[..., Any],
    rabbit_config: dict[str, Any],
    nameko_venv_python: Path,
) -> None:
    results = nameko_redeclares(nameko_venv_python, rabbit_config)
    assert [result for result in results if result["error"]] == []
    assert {r["name"] for r in results if r["kind"] == "queue"} >= EXPECTED_QUEUES

    handled: list[str] = []
    container = container_factory(wire_mirror(handled), rabbit_config)
    container.start()

    emit_and_wait_for_every_handler(container, handled)
    with ClusterRpcProxy(rabbit_config, timeout=PEER_TIMEOUT) as proxy:
        assert proxy[contract.WIRE_MIRROR].ping() == "pong"


def test_our_service_fails_to_start_on_a_queue_declared_with_other_arguments(
    container_factory: Callable[..., Any],
    rabbit_config: dict[str, Any],
    rabbit_manager: Any,
) -> None:
    # e.g. left behind by a nameko deployment that customised its queues: the broker
    # will not let us consume it as ours, and a service that cannot consume must say
    # so rather than hang in start().
    queue = (
        f"evt-{contract.WIRE_MIRROR}-{contract.EVENT}--{contract.WIRE_MIRROR}.pooled"
    )
    rabbit_manager.create_queue(
        rabbit_config["vhost"], queue, durable=True, arguments={"x-max-priority": 10}
    )
    container = container_factory(wire_mirror([]), rabbit_config)

    with concurrency.Timeout(10), pytest.raises(amqp.exceptions.PreconditionFailed):
        container.start()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        container.wait()  # and the container died of it
