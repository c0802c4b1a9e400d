"""Two services for the one-process dev mode test: a timer calls the other by RPC."""

from __future__ import annotations

from framework.rpc import RpcProxy, rpc
from framework.timer import timer


class Ponger:
    name = "ponger"

    @rpc
    def ping(self, n):
        return f"pong {n}"


class Pinger:
    name = "pinger"
    ponger = RpcProxy("ponger", timeout=5)
    count = 0

    @timer(interval=0.2)
    def tick(self):
        Pinger.count += 1
        print(self.ponger.ping(Pinger.count), flush=True)
