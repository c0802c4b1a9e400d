"""The benchmark's services under nameko 2.14.1.

Everything below the marker is identical, byte for byte, in ``services_ours.py``
(``bench`` checks it before measuring): the two frameworks run the same code.
"""

from __future__ import annotations

import time
from typing import Any

from nameko.events import event_handler
from nameko.rpc import RpcProxy, rpc

# -- identical in services_ours.py and services_nameko.py below this line --

# What the event handler has seen, for ``BenchSink.handled``. Module state, since
# both frameworks make a fresh service instance per worker; green threads switch
# only on I/O, so the updates need no lock.
HANDLED: dict[str, Any] = {"count": 0, "first": None, "last": None}


class BenchTarget:
    name = "bench_target"

    @rpc
    def echo(self, payload: Any) -> Any:
        return payload


class BenchRelay:
    name = "bench_relay"

    target = RpcProxy("bench_target")

    @rpc
    def relay(self, payload: Any) -> Any:
        return self.target.echo(payload)


class BenchSink:
    name = "bench_sink"

    @event_handler("bench_source", "ping")
    def on_ping(self, payload: Any) -> None:
        now = time.time()
        if HANDLED["first"] is None:
            HANDLED["first"] = now
        HANDLED["count"] += 1
        HANDLED["last"] = now

    @rpc
    def handled(self) -> dict[str, Any]:
        return dict(HANDLED)
