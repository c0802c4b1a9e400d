"""A nameko client for the tests: reads a JSON request on stdin, prints outcomes.

    {"config": {...}, "context_data": {...}, "timeout": 10,
     "actions": [{"op": "call", "service": "s", "method": "m", "args": [], "kwargs": {}},
                 {"op": "call_async", ...},   # started now, resolved after the rest
                 {"op": "dispatch", "service": "s", "event_type": "t", "data": ...}]}

Calls use nameko's standalone ``ClusterRpcProxy``, events nameko's standalone
``event_dispatcher``. Prints one JSON list, an outcome per action, in order.
"""

from __future__ import annotations

import json
import sys

from nameko.standalone.events import event_dispatcher
from nameko.standalone.rpc import ClusterRpcProxy

from interop import contract  # noqa: F401 - registers the shared exceptions
from interop.nameko_side.report import outcome


def main() -> None:
    request = json.load(sys.stdin)
    config = request["config"]
    actions = request["actions"]
    outcomes: list = [None] * len(actions)
    pending = []
    dispatch = event_dispatcher(config)  # connects on first use only
    with ClusterRpcProxy(
        config,
        context_data=request.get("context_data"),
        timeout=request.get("timeout", 10),
    ) as proxy:
        for index, action in enumerate(actions):
            op = action["op"]
            if op == "dispatch":
                outcomes[index] = outcome(
                    lambda a=action: dispatch(a["service"], a["event_type"], a["data"])
                )
                continue
            method = getattr(proxy[action["service"]], action["method"])
            args, kwargs = action.get("args", []), action.get("kwargs", {})
            if op == "call":
                outcomes[index] = outcome(lambda m=method, a=args, k=kwargs: m(*a, **k))
            elif op == "call_async":
                pending.append((index, method.call_async(*args, **kwargs)))
            else:
                raise ValueError(f"unknown op {op!r}")
        for index, reply in pending:
            outcomes[index] = outcome(reply.result)
    json.dump(outcomes, sys.stdout)


if __name__ == "__main__":
    main()
