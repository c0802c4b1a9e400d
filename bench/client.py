"""The measuring client: one process, one framework, one scenario.

    python -m bench.client ours rpc --amqp-uri URI --concurrency 10 --payload tiny
    python -m bench.client nameko events --amqp-uri URI --count 5000

It runs under the venv of the framework it measures (ours under ``.venv``, nameko
under the nameko venv), monkey-patched as that framework's own CLI would, and
prints its result as one JSON object on the last line of stdout.

Concurrency N means N green threads in this process, each with its own
``ClusterRpcProxy`` (its own connection and reply queue), each calling in a loop:
at most N calls are outstanding at any time. Every thread first makes
``--warmup-calls`` calls; the measured window starts when all threads are warm,
together, and each thread stops starting calls when ``--duration`` has passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.payloads import PAYLOAD_NAMES, TINY, make_payload

OURS = "ours"
NAMEKO = "nameko"
FRAMEWORKS = (OURS, NAMEKO)

CALL_TIMEOUT = 60.0  # seconds; a call slower than this is a broken run, not a slow one
READY_TIMEOUT = 120.0  # seconds for every thread to connect and warm up
EVENTS_TIMEOUT = 300.0  # seconds for the handler to see every event
POLL_INTERVAL = 0.1  # seconds between two looks at the handler's count


@dataclass
class Toolkit:
    """What a scenario needs from the framework under test."""

    cluster_rpc_proxy: Any
    event_dispatcher: Any
    spawn: Callable[..., Any]
    event: Callable[[], Any]
    sleep: Callable[[float], None]


def load_toolkit(framework: str) -> Toolkit:
    """Monkey-patch as the framework's CLI does, then import its standalone API.

    Patching comes first: kombu and amqp must load on green sockets.
    """
    if framework == OURS:
        from framework import concurrency

        concurrency.monkey_patch()
        from framework.standalone.events import event_dispatcher
        from framework.standalone.rpc import ClusterRpcProxy

        return Toolkit(
            ClusterRpcProxy,
            event_dispatcher,
            concurrency.spawn,
            concurrency.Event,
            concurrency.sleep,
        )
    if framework == NAMEKO:
        # nameko's own concurrency library, in nameko's venv: this client must use
        # exactly what a nameko user's does, not our framework's seam.
        import eventlet
        import eventlet.event

        eventlet.monkey_patch()
        from nameko.standalone.events import event_dispatcher as nameko_dispatcher
        from nameko.standalone.rpc import ClusterRpcProxy as NamekoClusterRpcProxy

        return Toolkit(
            NamekoClusterRpcProxy,
            nameko_dispatcher,
            eventlet.spawn,
            eventlet.event.Event,
            eventlet.sleep,
        )
    raise ValueError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")


class StartLine:
    """Holds threads until all are warm, then releases them with one deadline."""

    def __init__(self, toolkit: Toolkit, threads: int) -> None:
        self.toolkit = toolkit
        self.expected = threads
        self.arrived = 0
        self._go = toolkit.event()

    def arrive_and_wait(self) -> float:
        """Report this thread warm; returns the shared deadline (``perf_counter``)."""
        self.arrived += 1
        return self._go.wait()

    def release_when_all_arrived(
        self,
        workers: list[Any],
        extra_wait: Callable[[], None] | None = None,
        duration: float = 0.0,
    ) -> float:
        """Wait for every worker, then start the window; returns its start time."""
        limit = time.monotonic() + READY_TIMEOUT
        while self.arrived < self.expected:
            for worker in workers:
                if worker.dead:
                    worker.wait()  # re-raises what killed it
                    raise RuntimeError("a worker finished before the start line")
            if time.monotonic() > limit:
                raise TimeoutError(
                    f"only {self.arrived} of {self.expected} workers warmed up in {READY_TIMEOUT}s"
                )
            self.toolkit.sleep(0.01)
        if extra_wait is not None:
            extra_wait()
        start = time.perf_counter()
        self._go.send(start + duration)
        return start


# -- rpc ----------------------------------------------------------------------------


def run_rpc(
    toolkit: Toolkit, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    payload = make_payload(args.payload)
    start_line = StartLine(toolkit, args.concurrency)

    def worker() -> tuple[int, list[float], float]:
        with toolkit.cluster_rpc_proxy(config, timeout=CALL_TIMEOUT) as proxy:
            method = getattr(getattr(proxy, args.service), args.method)
            for _ in range(args.warmup_calls):
                method(payload)
            deadline = start_line.arrive_and_wait()
            latencies: list[float] = []
            now = time.perf_counter()
            while now < deadline:
                method(payload)
                done = time.perf_counter()
                latencies.append(done - now)
                now = done
            return len(latencies), latencies, now

    workers = [toolkit.spawn(worker) for _ in range(args.concurrency)]
    start = start_line.release_when_all_arrived(workers, duration=args.duration)
    results = [w.wait() for w in workers]
    calls = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results) - start
    latencies = sorted(lat for r in results for lat in r[1])
    return {
        "calls": calls,
        "elapsed": elapsed,
        "rate": calls / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- events ---------------------------------------------------------------------------


def run_events(
    toolkit: Toolkit, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Dispatch ``--count`` events from ``--dispatchers`` threads; wait until handled.

    The handler service records the wall-clock time of each event it handles; the
    rate is events over the time from the first dispatch to the last one handled.
    Each dispatcher sends one warm-up event first (connecting, declaring), which is
    handled before the window starts and not counted.
    """
    start_line = StartLine(toolkit, args.dispatchers)
    shares = [
        args.count // args.dispatchers + (1 if i < args.count % args.dispatchers else 0)
        for i in range(args.dispatchers)
    ]

    def dispatcher(share: int) -> float:
        dispatch = toolkit.event_dispatcher(config)
        try:
            dispatch(args.source, args.event_type, {"seq": -1})
            start_line.arrive_and_wait()
            for seq in range(share):
                dispatch(args.source, args.event_type, {"seq": seq})
            return time.perf_counter()
        finally:
            close = getattr(dispatch, "close", None)
            if close is not None:
                close()

    with toolkit.cluster_rpc_proxy(config, timeout=CALL_TIMEOUT) as proxy:
        handled = getattr(getattr(proxy, args.sink), args.sink_method)
        baseline = handled()["count"]

        def warmup_handled() -> None:
            wait_for_count(toolkit, handled, baseline + args.dispatchers)

        workers = [toolkit.spawn(dispatcher, share) for share in shares]
        start = start_line.release_when_all_arrived(workers, extra_wait=warmup_handled)
        wall_start = time.time()
        dispatched_at = max(w.wait() for w in workers)
        final = wait_for_count(
            toolkit, handled, baseline + args.dispatchers + args.count
        )
    elapsed = final["last"] - wall_start
    return {
        "events": args.count,
        "elapsed": elapsed,
        "rate": args.count / elapsed,
        "dispatch_rate": args.count / (dispatched_at - start),
    }


def wait_for_count(
    toolkit: Toolkit, handled: Callable[[], dict[str, Any]], count: int
) -> dict[str, Any]:
    limit = time.monotonic() + EVENTS_TIMEOUT
    while True:
        state = handled()
        if state["count"] >= count:
            return state
        if time.monotonic() > limit:
            raise TimeoutError(
                f"the handler saw {state['count']} of {count} events in {EVENTS_TIMEOUT}s"
            )
        toolkit.sleep(POLL_INTERVAL)


# -- command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("--amqp-uri", required=True)
    scenarios = parser.add_subparsers(dest="scenario", required=True)

    rpc = scenarios.add_parser(
        "rpc", help="calls/s and latency through standalone proxies"
    )
    rpc.add_argument("--service", default="bench_target")
    rpc.add_argument("--method", default="echo")
    rpc.add_argument("--payload", choices=PAYLOAD_NAMES, default=TINY)
    rpc.add_argument("--concurrency", type=int, default=1)
    rpc.add_argument(
        "--duration", type=float, default=3.0, help="seconds in the measured window"
    )
    rpc.add_argument(
        "--warmup-calls",
        type=int,
        default=20,
        help="calls per thread before the window",
    )

    events = scenarios.add_parser(
        "events", help="events handled/s, dispatch to handler"
    )
    events.add_argument("--count", type=int, default=5000)
    events.add_argument("--dispatchers", type=int, default=10)
    events.add_argument("--source", default="bench_source")
    events.add_argument("--event-type", default="ping")
    events.add_argument("--sink", default="bench_sink")
    events.add_argument("--sink-method", default="handled")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    toolkit = load_toolkit(args.framework)
    config: dict[str, Any] = {"AMQP_URI": args.amqp_uri}
    if args.framework == "ours":
        # --ours-config of python -m bench (see bench/processes.py)
        config.update(json.loads(os.environ.get("BENCH_OURS_CONFIG") or "{}"))
    if args.scenario == "rpc":
        result = run_rpc(toolkit, config, args)
    else:
        result = run_events(toolkit, config, args)
    # The one line the driver reads; everything else a client prints goes to stderr.
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
