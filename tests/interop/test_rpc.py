"""RPC between nameko 2.14.1 and our framework, both ways: results and errors.

nameko calls us with its standalone ``ClusterRpcProxy`` and with a nameko service's
``RpcProxy``; we call nameko with our standalone ``ClusterRpcProxy`` and with our
in-service ``RpcProxy``. Errors must arrive as nameko would deliver them between two
nameko services: registered exceptions rebuilt as instances, anything else as
``RemoteError`` with the remote type name and message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from framework.exceptions import (
    IncorrectSignature,
    MethodNotFound,
    RemoteError,
    RpcTimeout,
)
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_hook
from interop import contract
from interop.our_services import PEER_TIMEOUT, Ours
from interop.peers import call, call_async

# Non-ASCII text, nesting, JSON's scalar types, and an integer beyond 32 bits.
PAYLOAD = {
    "ünïcödé": "日本語のテキスト 🐍",
    "nested": {
        "list": [1, 2.5, None, True, False, "ß"],
        "deeper": {"empty": {}, "items": [[], [{"k": "v"}]]},
    },
    "big": 2**53,
}
ARGS = ["Grüße", PAYLOAD, [1, [2, [3]]]]
KWARGS = {"name": "Zoë", "data": PAYLOAD}
ECHOED = {"args": ARGS, "kwargs": KWARGS}


@pytest.fixture(scope="module", autouse=True)
def nameko_peers(start_nameko: Callable[..., Any]) -> None:
    start_nameko(contract.NAMEKO_ECHO, contract.NAMEKO_CALLER)


@pytest.fixture
def ours(container_factory: Callable[..., Any], config: dict[str, Any]) -> Any:
    container = container_factory(Ours, config)
    container.start()
    return container


# -- nameko calls us ------------------------------------------------------------------


@pytest.fixture(params=["standalone", "in_service"])
def nameko_calls_ours(
    request: pytest.FixtureRequest, ours: Any, nameko_client: Callable[..., Any]
) -> Callable[..., dict[str, Any]]:
    """``call(method, *args, **kwargs)`` -> the outcome nameko reported:
    ``{"result": ...}`` or ``{"error": {"class", "args", "exc_type", "value"...}}``."""

    def standalone(method: str, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        [outcome] = nameko_client([call(contract.OURS, method, *args, **kwargs)])
        return outcome

    def in_service(method: str, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        [outcome] = nameko_client(
            [call(contract.NAMEKO_CALLER, "call_ours", method, list(args), kwargs)]
        )
        assert "result" in outcome, outcome  # call_ours reports the inner outcome
        return outcome["result"]

    return standalone if request.param == "standalone" else in_service


def test_nameko_gets_our_result_for_args_kwargs_unicode_and_nested_payloads(
    nameko_calls_ours: Any,
) -> None:
    assert nameko_calls_ours("echo", *ARGS, **KWARGS) == {"result": ECHOED}
    assert nameko_calls_ours("greet", "Zoë", greeting="Grüß Gott") == {
        "result": "Grüß Gott, Zoë!"
    }


def test_nameko_standalone_call_async_gets_each_reply_to_its_own_call(
    ours: Any, nameko_client: Any
) -> None:
    outcomes = nameko_client(
        [
            call_async(contract.OURS, "greet", f"caller {i}", greeting="Hi")
            for i in range(5)
        ]
    )

    assert outcomes == [{"result": f"Hi, caller {i}!"} for i in range(5)]


def test_nameko_in_service_call_async_gets_each_reply_to_its_own_call(
    ours: Any, nameko_client: Any
) -> None:
    calls = [["greet", [f"caller {i}"], {"greeting": "Hi"}] for i in range(5)] + [
        ["echo", ARGS, KWARGS]
    ]

    [outcome] = nameko_client([call(contract.NAMEKO_CALLER, "call_ours_async", calls)])

    assert outcome == {
        "result": [{"result": f"Hi, caller {i}!"} for i in range(5)]
        + [{"result": ECHOED}]
    }


def test_our_plain_exception_reaches_nameko_as_remote_error_with_type_and_value(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("raise_plain", "bad ünïcödé input")["error"]

    assert error["class"] == "nameko.exceptions.RemoteError"
    assert (error["exc_type"], error["value"]) == ("ValueError", "bad ünïcödé input")


def test_our_unexpected_exception_reaches_nameko_with_its_type_but_not_its_text(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("raise_unexpected", "secret detail")["error"]

    assert error["class"] == "nameko.exceptions.RemoteError"
    assert error["exc_type"] == "ValueError"
    assert "secret detail" not in error["value"]
    assert error["value"].startswith("unexpected ValueError (correlation id ")


def test_our_unregistered_exception_reaches_nameko_as_remote_error(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("raise_unregistered", "nobody registered me")["error"]

    assert error["class"] == "nameko.exceptions.RemoteError"
    assert (error["exc_type"], error["value"]) == (
        "NotRegistered",
        "nobody registered me",
    )


def test_our_registered_exception_is_rebuilt_as_an_instance_by_nameko(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("raise_registered", "over the limit")["error"]

    assert error["class"] == "interop.contract.Rejected"
    assert error["args"] == ["over the limit"]


def test_nameko_calling_a_method_we_lack_gets_its_own_method_not_found(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("no_such_method", 1)["error"]

    assert error["class"] == "nameko.exceptions.MethodNotFound"
    assert error["args"] == ["no_such_method"]


def test_nameko_calling_with_a_bad_signature_gets_its_own_incorrect_signature(
    nameko_calls_ours: Any,
) -> None:
    error = nameko_calls_ours("greet", "Zoë", "Hi", "one too many")["error"]

    assert error["class"] == "nameko.exceptions.IncorrectSignature"
    assert "argument" in error["str"]


# -- we call nameko -------------------------------------------------------------------


@pytest.fixture(params=["standalone", "in_service"])
def ours_calls_nameko(
    request: pytest.FixtureRequest, container_factory: Any, config: dict[str, Any]
) -> Iterator[Callable[..., Any]]:
    """``call(method, *args, **kwargs)`` on nameko's echo service: its result, or
    the exception our proxy raised."""
    if request.param == "standalone":
        with ClusterRpcProxy(config, timeout=PEER_TIMEOUT) as proxy:
            yield lambda method, /, *args, **kwargs: getattr(
                proxy[contract.NAMEKO_ECHO], method
            )(*args, **kwargs)
    else:
        container = container_factory(Ours, config)
        container.start()
        with entrypoint_hook(container, "call_nameko") as call_nameko:
            yield call_nameko


def test_we_get_nameko_result_for_args_kwargs_unicode_and_nested_payloads(
    ours_calls_nameko: Any,
) -> None:
    assert ours_calls_nameko("echo", *ARGS, **KWARGS) == ECHOED
    assert ours_calls_nameko("greet", "Zoë", greeting="Grüß Gott") == "Grüß Gott, Zoë!"


def test_our_standalone_call_async_gets_each_nameko_reply_to_its_own_call(
    config: dict[str, Any],
) -> None:
    with ClusterRpcProxy(config, timeout=PEER_TIMEOUT) as proxy:
        replies = [
            proxy[contract.NAMEKO_ECHO].greet.call_async(f"caller {i}", greeting="Hi")
            for i in range(5)
        ]
        echo_reply = proxy[contract.NAMEKO_ECHO].echo.call_async(*ARGS, **KWARGS)

        assert [reply.result() for reply in reversed(replies)] == [
            f"Hi, caller {i}!" for i in reversed(range(5))
        ]
        assert echo_reply.result() == ECHOED


def test_our_in_service_call_async_gets_each_nameko_reply_to_its_own_call(
    ours: Any,
) -> None:
    calls = [("greet", [f"caller {i}"], {"greeting": "Hi"}) for i in range(5)] + [
        ("echo", ARGS, KWARGS)
    ]

    with entrypoint_hook(ours, "call_nameko_async") as call_nameko_async:
        results = call_nameko_async(calls)

    assert results == [f"Hi, caller {i}!" for i in range(5)] + [ECHOED]


def test_nameko_plain_exception_reaches_us_as_remote_error_with_type_and_value(
    ours_calls_nameko: Any,
) -> None:
    with pytest.raises(RemoteError) as raised:
        ours_calls_nameko("raise_plain", "bad ünïcödé input")

    assert (raised.value.exc_type, raised.value.value) == (
        "ValueError",
        "bad ünïcödé input",
    )


def test_nameko_unregistered_exception_reaches_us_as_remote_error(
    ours_calls_nameko: Any,
) -> None:
    with pytest.raises(RemoteError) as raised:
        ours_calls_nameko("raise_unregistered", "nobody registered me")

    assert (raised.value.exc_type, raised.value.value) == (
        "NotRegistered",
        "nobody registered me",
    )


def test_nameko_registered_exception_is_rebuilt_as_an_instance_by_us(
    ours_calls_nameko: Any,
) -> None:
    with pytest.raises(contract.Rejected) as raised:
        ours_calls_nameko("raise_registered", "over the limit")

    assert raised.value.args == ("over the limit",)


def test_calling_a_method_nameko_lacks_raises_our_method_not_found(
    ours_calls_nameko: Any,
) -> None:
    with pytest.raises(MethodNotFound) as raised:
        ours_calls_nameko("no_such_method", 1)

    assert raised.value.args == ("no_such_method",)


def test_calling_nameko_with_a_bad_signature_raises_our_incorrect_signature(
    ours_calls_nameko: Any,
) -> None:
    with pytest.raises(IncorrectSignature) as raised:
        ours_calls_nameko("greet", "Zoë", "Hi", "one too many")

    assert "argument" in str(raised.value)


@pytest.fixture(params=["standalone", "in_service"])
def ours_calls_nameko_with_timeout(
    request: pytest.FixtureRequest, container_factory: Any, config: dict[str, Any]
) -> Iterator[Callable[..., Any]]:
    """``call(timeout, method, *args)`` on nameko's echo service, with our timeout."""
    if request.param == "standalone":
        with ClusterRpcProxy(config) as proxy:
            echo = proxy[contract.NAMEKO_ECHO]
            yield lambda timeout, method, *args: getattr(echo, method).with_timeout(
                timeout
            )(*args)
    else:
        container = container_factory(Ours, config)
        container.start()
        with entrypoint_hook(container, "call_nameko_with_timeout") as call_nameko:
            yield call_nameko


def test_a_slow_nameko_reply_times_out_and_is_not_taken_for_the_next_reply(
    ours_calls_nameko_with_timeout: Any,
) -> None:
    with pytest.raises(RpcTimeout):
        ours_calls_nameko_with_timeout(0.2, "slow", 1.0)

    # The late reply to the first call arrives while this one waits: it is dropped.
    assert ours_calls_nameko_with_timeout(PEER_TIMEOUT, "slow", 1.5) == 1.5
