"""Context data and the call-id stack across a chain nameko -> ours -> nameko.

The chain: a standalone client calls ``nameko_caller.relay_context``, which calls
``ours.relay_context`` (nameko's in-service RpcProxy), which calls
``nameko_echo.context`` (our in-service RpcProxy). Every hop reports the context it
received, so the test sees each header crossing each boundary.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_hook
from interop import contract
from interop.our_services import PEER_TIMEOUT, Ours
from interop.peers import call

CONTEXT = {
    "language": "fr-FR",
    "tenant": "acmé",
}  # a well-known key, and one of our own
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module", autouse=True)
def nameko_peers(start_nameko: Callable[..., Any]) -> None:
    start_nameko(contract.NAMEKO_ECHO, contract.NAMEKO_CALLER)


@pytest.fixture(autouse=True)
def ours(container_factory: Callable[..., Any], config: dict[str, Any]) -> Any:
    container = container_factory(Ours, config)
    container.start()
    return container


def call_id(service: str, method: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(service)}\.{re.escape(method)}\.{UUID}")


def assert_call_ids(stack: list[str], expected: list[re.Pattern[str]]) -> None:
    assert len(stack) == len(expected), stack
    for entry, pattern in zip(stack, expected, strict=True):
        assert pattern.fullmatch(entry), (
            f"{entry!r} is not {pattern.pattern!r} in {stack}"
        )


def start_chain_from_nameko(
    nameko_client: Any, config: dict[str, Any]
) -> dict[str, Any]:
    [outcome] = nameko_client(
        [call(contract.NAMEKO_CALLER, "relay_context")], context_data=CONTEXT
    )
    assert "result" in outcome, outcome
    return outcome["result"]


def start_chain_from_us(nameko_client: Any, config: dict[str, Any]) -> dict[str, Any]:
    with ClusterRpcProxy(config, context_data=CONTEXT, timeout=PEER_TIMEOUT) as proxy:
        return proxy[contract.NAMEKO_CALLER].relay_context()


@pytest.mark.parametrize(
    "start_chain",
    [start_chain_from_nameko, start_chain_from_us],
    ids=["nameko_client", "our_client"],
)
def test_context_data_and_call_id_stack_survive_nameko_ours_nameko(
    start_chain: Any, nameko_client: Any, config: dict[str, Any]
) -> None:
    chain = start_chain(nameko_client, config)
    first, second, third = chain["here"], chain["next"]["here"], chain["next"]["next"]

    # Every hop sees exactly the caller's context data: nothing lost, nothing added
    # (nameko would take any non-`nameko.` header we sent into its context too).
    for hop in (first, second, third):
        assert hop["data"] == CONTEXT

    # Both standalone proxies name their caller as nameko 2 does.
    origin = call_id("standalone_rpc_proxy", "call")
    assert_call_ids(
        first["call_id_stack"],
        [origin, call_id(contract.NAMEKO_CALLER, "relay_context")],
    )
    assert_call_ids(
        second["call_id_stack"],
        [
            origin,
            call_id(contract.NAMEKO_CALLER, "relay_context"),
            call_id(contract.OURS, "relay_context"),
        ],
    )
    assert_call_ids(
        third["call_id_stack"],
        [
            origin,
            call_id(contract.NAMEKO_CALLER, "relay_context"),
            call_id(contract.OURS, "relay_context"),
            call_id(contract.NAMEKO_ECHO, "context"),
        ],
    )
    # ...and each hop's stack is its caller's, extended: the same ids, not new ones.
    assert second["call_id_stack"][:2] == first["call_id_stack"]
    assert third["call_id_stack"][:3] == second["call_id_stack"]


def test_context_data_from_our_in_service_proxy_reaches_nameko(ours: Any) -> None:
    parent = "upstream.handle.0f0e0d0c-0b0a-4908-8706-050403020100"
    with entrypoint_hook(
        ours, "call_nameko", context_data={**CONTEXT, "call_id_stack": [parent]}
    ) as call_nameko:
        seen = call_nameko("context")

    assert seen["data"] == CONTEXT
    assert seen["call_id_stack"][0] == parent
    assert_call_ids(
        seen["call_id_stack"][1:],
        [
            call_id(contract.OURS, "call_nameko"),
            call_id(contract.NAMEKO_ECHO, "context"),
        ],
    )


def test_a_long_call_id_stack_is_truncated_alike_on_both_sides(ours: Any) -> None:
    # Both keep the caller's last `parent_calls_tracked` (10) ids plus their own.
    parents = [
        f"upstream.hop{i}.0f0e0d0c-0b0a-4908-8706-0504030201{i:02d}" for i in range(15)
    ]
    with entrypoint_hook(
        ours, "call_nameko", context_data={"call_id_stack": parents}
    ) as call_nameko:
        seen = call_nameko("context")

    stack = seen["call_id_stack"]
    assert len(stack) == 11
    assert stack[:9] == parents[-9:]
    assert_call_ids(
        stack[9:],
        [
            call_id(contract.OURS, "call_nameko"),
            call_id(contract.NAMEKO_ECHO, "context"),
        ],
    )
