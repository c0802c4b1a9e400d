"""How the nameko side reports an outcome to the test: JSON-friendly dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def describe_error(exc: BaseException) -> dict[str, Any]:
    """Enough of an exception for the test to tell what was rebuilt, and from what."""
    return {
        "class": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "args": [str(arg) for arg in exc.args],
        "str": str(exc),
        # RemoteError's attributes; absent from rebuilt instances
        "exc_type": getattr(exc, "exc_type", None),
        "value": getattr(exc, "value", None),
    }


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"result": call()}
    except Exception as exc:  # the test asserts on what was raised
        return {"error": describe_error(exc)}


def describe_context(worker_ctx: Any) -> dict[str, Any]:
    """What a worker knows about its caller: context data and the call-id stack."""
    data = {key: value for key, value in worker_ctx.data.items()}
    return {"data": data, "call_id_stack": list(worker_ctx.call_id_stack)}
