"""What the bench measures, group by group (``--only rpc|events|startup|raw``).

Each side (ours, nameko, the raw loop) has a vhost of its own, so both frameworks'
services can run at the same time under the same names. That is what lets every
figure be measured for both sides back to back, seconds apart, with the order
alternating from one measurement to the next: the load other people put on this
shared machine and broker comes and goes by the minute, and measuring one
framework's whole series and then the other's would hand that noise to one side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.broker import BenchError, BrokerProbe, prefill_events
from bench.payloads import LARGE, PAYLOAD_NAMES, TINY
from bench.processes import (
    NAMEKO,
    OURS,
    FirstCall,
    Framework,
    ProcessRegistry,
    RunningService,
    raw_server,
    run_client,
    running_service,
)
from bench.report import CEILING, RAW, Results

log = logging.getLogger(__name__)

GROUPS = ("rpc", "events", "startup", "raw")
SIDES = (OURS, NAMEKO, RAW)

TARGET_CALL = FirstCall("bench_target", "echo", ("ping",))
RELAY_CALL = FirstCall("bench_relay", "relay", ("ping",))
SINK_CALL = FirstCall("bench_sink", "handled")
EVENT_SOURCE, EVENT_TYPE = "bench_source", "ping"
# The queue both frameworks give BenchSink.on_ping: nameko's naming for a
# SERVICE_POOL handler, evt-<source>-<type>--<service>.<method>.
SINK_QUEUE = f"evt-{EVENT_SOURCE}-{EVENT_TYPE}--bench_sink.on_ping"
DRAIN_TIMEOUT = 300.0  # seconds for the handler to empty the prefilled queue


@dataclass
class Settings:
    runs: int = 3
    duration: float = 3.0  # seconds in each throughput window
    warmup_calls: int = 20  # per client thread, before the window
    concurrencies: tuple[int, ...] = (1, 10, 50)
    relay_concurrencies: tuple[int, ...] = (1, 10)
    events: int = 5000
    event_dispatchers: int = 10

    @classmethod
    def quick(cls) -> Settings:
        return cls(runs=1, duration=1.0, warmup_calls=5, events=1000)


@dataclass
class Bench:
    """Everything a group needs: where each side runs, and where results go."""

    frameworks: dict[str, Framework]
    registry: ProcessRegistry
    uris: dict[str, str]  # side -> AMQP URI of its vhost
    configs: dict[str, Path]  # framework -> its services' config file
    probes: dict[str, BrokerProbe]  # framework -> a plain caller on its vhost
    settings: Settings
    results: Results
    groups: tuple[str, ...] = GROUPS

    def order(self, turn: int) -> list[Framework]:
        """Both frameworks, the first one alternating with ``turn``."""
        keys = [OURS, NAMEKO] if turn % 2 == 0 else [NAMEKO, OURS]
        return [self.frameworks[k] for k in keys]

    @contextmanager
    def service(
        self, framework: Framework, service_class: str, first_call: FirstCall, run: int
    ) -> Iterator[RunningService]:
        with running_service(
            self.registry,
            framework,
            service_class,
            self.configs[framework.key],
            self.probes[framework.key],
            first_call,
        ) as service:
            yield service
        if service.problems:
            self.problem(run, framework.key, f"{service_class}: {service.problems}")

    @contextmanager
    def services(
        self, service_class: str, first_call: FirstCall, run: int, keys: list[str]
    ) -> Iterator[list[Framework]]:
        """``service_class`` under both frameworks, each on its vhost; yields those
        that started. One that does not start fails ``keys`` for this run."""
        with ExitStack() as stack:
            started = []
            for fw in self.order(run):
                service = self.service(fw, service_class, first_call, run)
                try:
                    stack.enter_context(service)
                except BenchError as exc:
                    for key in keys:
                        self.results.figures[key].fail(fw.key)
                    self.problem(run, fw.key, f"{service_class}: {one_line(exc)}")
                    continue
                started.append(fw)
            yield started

    def problem(self, run: int, side: str, what: str) -> None:
        log.warning("run %d/%d  %s  %s", run + 1, self.settings.runs, side, what)
        self.results.problems.append(f"run {run + 1}, {side}: {what}")

    def attempt(
        self, keys: list[str], side: str, run: int, measure: Callable[[], Any]
    ) -> Any:
        """``measure()``, or ``None`` if it failed: the failure is recorded against
        ``keys`` and the bench goes on with the next figure."""
        try:
            return measure()
        except BenchError as exc:
            for key in keys:
                self.results.figures[key].fail(side)
            label = self.results.figures[keys[0]].label
            self.problem(run, side, f"{label}: failed: {one_line(exc)}")
            return None

    def client(self, framework: Framework, scenario: str, *args: Any) -> dict[str, Any]:
        uri = self.uris[framework.key]
        argv = [framework.key, "--amqp-uri", uri, scenario, *map(str, args)]
        name = f"{framework.key}-client"
        return run_client(self.registry, framework.python, "bench.client", argv, name)

    def rpc_client(
        self, framework: Framework, call: FirstCall, payload: str, concurrency: int
    ) -> dict[str, Any]:
        options = {
            "service": call.service,
            "method": call.method,
            "payload": payload,
            "concurrency": concurrency,
            "duration": self.settings.duration,
            "warmup-calls": self.settings.warmup_calls,
        }
        return self.client(framework, "rpc", *as_options(options))

    def raw_client(self, confirms: str, payload: str, c: int) -> dict[str, Any]:
        """The raw py-amqp loop (server and client), with ``c`` requests in flight."""
        uri = self.uris[RAW]
        # "async-transient": asynchronous confirms, messages not persistent.
        confirms, _, transient = confirms.partition("-")
        options: dict[str, Any] = {
            "amqp-uri": uri,
            "confirms": confirms,
            "payload": payload,
            "concurrency": c,
            "duration": self.settings.duration,
        }
        python = self.frameworks[OURS].python
        with raw_server(self.registry, uri, confirms, RAW_PREFETCH, bool(transient)):
            argv = ["client", *as_options(options)]
            if transient:
                argv.append("--transient")
            return run_client(self.registry, python, "bench.raw", argv, "raw-client")

    def record(self, key: str, side: str, value: float, run: int) -> None:
        figure = self.results.figures[key]
        figure.add(side, value)
        log.info(
            "run %d/%d  %-6s  %10.2f %-8s  %s",
            run + 1,
            self.settings.runs,
            side,
            value,
            figure.unit,
            figure.label,
        )


def one_line(exc: BaseException) -> str:
    """What went wrong, and the last line of the log quoted in the message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def as_options(options: dict[str, Any]) -> list[str]:
    return [
        part for name, value in options.items() for part in (f"--{name}", str(value))
    ]


def payload_label(payload: str) -> str:
    return "tiny payload" if payload == TINY else "10 KB payload"


# -- the figures, in table order ------------------------------------------------------------

# (confirm mode, payload, in flight). See bench/raw.py for the modes.
RAW_CASES = (
    ("turn", TINY, 1),
    ("turn", LARGE, 1),
    ("async", TINY, 1),
    ("async", TINY, 10),
    ("async", TINY, 50),
    ("async", LARGE, 10),
    ("async", LARGE, 50),
    # What persistence costs the broker: the same loop, messages transient.
    ("async-transient", TINY, 10),
    ("async-transient", TINY, 50),
    ("async-transient", LARGE, 10),
    ("none", TINY, 1),
    ("none", TINY, 10),
    ("none", TINY, 50),
)
RAW_PREFETCH = 10  # what both frameworks' services use (max_workers)
CONFIRM_LABELS = {
    "turn": "confirms waited in turn",
    "async": "asynchronous confirms",
    "async-transient": "asynchronous confirms, transient messages",
    "none": "no confirms",
}


def ceiling_mode(concurrency: int) -> str:
    """The raw loop that does what the frameworks' RPC does at ``concurrency``.

    Alone, a caller waits for its request's confirm before its reply (``turn``);
    with several callers in flight, their confirms overlap (``async``).
    """
    return "turn" if concurrency == 1 else "async"


def define_figures(
    results: Results, settings: Settings, groups: tuple[str, ...]
) -> None:
    """Every figure the chosen groups measure, with the lead's target ratios."""
    if "rpc" in groups:
        for payload in PAYLOAD_NAMES:
            for c in settings.concurrencies:
                results.figure(
                    f"rpc.{payload}.c{c}",
                    f"RPC, standalone proxy, {payload_label(payload)}, concurrency {c}",
                    "calls/s",
                    target=3.0 if c >= 10 else None,
                )
            if 1 in settings.concurrencies:
                for pct in (50, 99):
                    results.figure(
                        f"rpc.{payload}.p{pct}",
                        f"RPC latency p{pct}, {payload_label(payload)}, concurrency 1",
                        "ms",
                        higher_is_better=False,
                        target=0.7 if (payload, pct) == (TINY, 50) else None,
                    )
        for c in settings.relay_concurrencies:
            results.figure(
                f"relay.c{c}",
                f"RPC service to service (relay), tiny payload, concurrency {c}",
                "calls/s",
                target=3.0 if c >= 10 else None,
            )
    if "events" in groups:
        results.figure(
            "events.e2e",
            f"Events handled/s, end to end ({settings.event_dispatchers} "
            "standalone dispatchers)",
            "events/s",
            target=2.0,
        )
        results.figure(
            "events.dispatch",
            f"Events dispatched/s, same run ({settings.event_dispatchers} "
            "standalone dispatchers, confirms included)",
            "events/s",
        )
        results.figure(
            "events.drain",
            "Events handled/s, handler only (queue filled beforehand)",
            "events/s",
        )
    if "startup" in groups:
        results.figure(
            "startup",
            "Start-up: process spawn to first answered RPC",
            "s",
            higher_is_better=False,
            target=1.0,
        )
    if "raw" in groups:
        for confirms, payload, c in RAW_CASES:
            label = (
                f"raw, {CONFIRM_LABELS[confirms]}, {payload_label(payload)}, "
                f"{c} in flight"
            )
            key = raw_key(confirms, payload, c)
            results.figure(key, label, "calls/s", section=CEILING)
            if c == 1:
                results.figure(
                    key + ".p50",
                    f"{label}, latency p50",
                    "ms",
                    higher_is_better=False,
                    section=CEILING,
                )


def raw_key(confirms: str, payload: str, concurrency: int) -> str:
    return f"raw.{confirms}.{payload}.c{concurrency}"


# -- rpc ------------------------------------------------------------------------------------


def rpc_group(bench: Bench) -> None:
    s = bench.settings
    cases = [(payload, c) for payload in PAYLOAD_NAMES for c in s.concurrencies]
    target_keys = [key for payload, c in cases for key in rpc_keys(payload, c)]
    relay_keys = [f"relay.c{c}" for c in s.relay_concurrencies]
    for run in range(s.runs):
        turn = run
        with bench.services(
            "BenchTarget", TARGET_CALL, run, target_keys + relay_keys
        ) as targets:
            for payload, c in cases:
                for fw in bench.order(turn):
                    if fw in targets:
                        measure_standalone_rpc(bench, fw, payload, c, run)
                measure_ceiling(bench, payload, c, run)
                turn += 1
            # The relay calls bench_target, which keeps running for it.
            relays_keys = relay_keys if len(targets) == 2 else []
            with bench.services("BenchRelay", RELAY_CALL, run, relays_keys) as relays:
                for c in s.relay_concurrencies:
                    for fw in bench.order(turn):
                        if fw in relays and fw in targets:
                            measure_relay(bench, fw, c, run)
                    turn += 1


def rpc_keys(payload: str, c: int) -> list[str]:
    """The figures one standalone RPC measurement gives."""
    keys = [f"rpc.{payload}.c{c}"]
    if c == 1:
        keys += [f"rpc.{payload}.p50", f"rpc.{payload}.p99"]
    return keys


def measure_standalone_rpc(
    bench: Bench, fw: Framework, payload: str, c: int, run: int
) -> None:
    measure = partial(bench.rpc_client, fw, TARGET_CALL, payload, c)
    result = bench.attempt(rpc_keys(payload, c), fw.key, run, measure)
    if result is None:
        return
    bench.record(f"rpc.{payload}.c{c}", fw.key, result["rate"], run)
    if c == 1:
        bench.record(f"rpc.{payload}.p50", fw.key, result["p50_ms"], run)
        bench.record(f"rpc.{payload}.p99", fw.key, result["p99_ms"], run)


def measure_ceiling(bench: Bench, payload: str, c: int, run: int) -> None:
    """The raw loop for the same case, right after the frameworks measured it."""
    confirms = ceiling_mode(c)
    measure = partial(bench.raw_client, confirms, payload, c)
    result = bench.attempt(rpc_keys(payload, c), RAW, run, measure)
    if result is None:
        return
    bench.record(f"rpc.{payload}.c{c}", RAW, result["rate"], run)
    if c == 1:
        bench.record(f"rpc.{payload}.p50", RAW, result["p50_ms"], run)
        bench.record(f"rpc.{payload}.p99", RAW, result["p99_ms"], run)
    # The same measurement belongs in the ceiling table, when it is shown.
    key = raw_key(confirms, payload, c)
    if key in bench.results.figures:
        bench.results.figures[key].add(RAW, result["rate"])
        if c == 1:
            bench.results.figures[key + ".p50"].add(RAW, result["p50_ms"])


def measure_relay(bench: Bench, fw: Framework, c: int, run: int) -> None:
    measure = partial(bench.rpc_client, fw, RELAY_CALL, TINY, c)
    result = bench.attempt([f"relay.c{c}"], fw.key, run, measure)
    if result is not None:
        bench.record(f"relay.c{c}", fw.key, result["rate"], run)


# -- events -----------------------------------------------------------------------------------


def events_group(bench: Bench) -> None:
    s = bench.settings
    for run in range(s.runs):
        with ExitStack() as sinks:
            # The handler alone: its queue is filled before it starts, and it is
            # timed from the first event it handles to the last. One framework at
            # a time, so the two drains never compete for the CPU.
            started = []
            for fw in bench.order(run):
                keys = ["events.drain", "events.e2e", "events.dispatch"]
                start = partial(start_prefilled_sink, bench, fw, run, sinks)
                if not bench.attempt(keys, fw.key, run, start):
                    continue
                started.append(fw)
                drained = partial(wait_for_handled, bench.probes[fw.key], s.events)
                state = bench.attempt(["events.drain"], fw.key, run, drained)
                if state is not None:
                    rate = (s.events - 1) / (state["last"] - state["first"])
                    bench.record("events.drain", fw.key, rate, run)
            # End to end, on the same handler processes.
            for fw in bench.order(run + 1):
                if fw not in started:
                    continue
                options = {"count": s.events, "dispatchers": s.event_dispatchers}
                measure = partial(bench.client, fw, "events", *as_options(options))
                keys = ["events.e2e", "events.dispatch"]
                result = bench.attempt(keys, fw.key, run, measure)
                if result is not None:
                    bench.record("events.e2e", fw.key, result["rate"], run)
                    bench.record(
                        "events.dispatch", fw.key, result["dispatch_rate"], run
                    )


def start_prefilled_sink(
    bench: Bench, fw: Framework, run: int, stack: ExitStack
) -> RunningService:
    """Fill the handler's queue, then start it (running until ``stack`` closes)."""
    uri = bench.uris[fw.key]
    prefill_events(uri, EVENT_SOURCE, EVENT_TYPE, SINK_QUEUE, bench.settings.events)
    return stack.enter_context(bench.service(fw, "BenchSink", SINK_CALL, run))


def wait_for_handled(probe: BrokerProbe, count: int) -> dict[str, Any]:
    limit = time.monotonic() + DRAIN_TIMEOUT
    while True:
        state = probe.call(SINK_CALL.service, SINK_CALL.method)
        if state["count"] >= count:
            return state
        if time.monotonic() > limit:
            raise BenchError(
                f"the handler handled {state['count']} of {count} events "
                f"in {DRAIN_TIMEOUT}s"
            )
        time.sleep(0.1)


# -- start-up ---------------------------------------------------------------------------------


def startup_group(bench: Bench) -> None:
    """One framework at a time: nothing else of ours runs while a service starts."""
    for run in range(bench.settings.runs):
        for fw in bench.order(run):
            service = partial(bench.service, fw, "BenchTarget", TARGET_CALL, run)
            bench.attempt(
                ["startup"],
                fw.key,
                run,
                partial(measure_startup, bench, service, fw, run),
            )


def measure_startup(
    bench: Bench, service: Callable[[], Any], fw: Framework, run: int
) -> None:
    with service() as running:
        bench.record("startup", fw.key, running.startup_seconds, run)


# -- raw ceiling ------------------------------------------------------------------------------


def raw_group(bench: Bench) -> None:
    """The raw loop's modes, for scale; the ones the RPC group already measured as
    its ceiling (same mode, payload and concurrency) are not measured twice."""
    measured = set()
    if "rpc" in bench.groups:
        measured = {
            (ceiling_mode(c), payload, c)
            for payload in PAYLOAD_NAMES
            for c in bench.settings.concurrencies
        }
    for run in range(bench.settings.runs):
        for confirms, payload, c in RAW_CASES:
            if (confirms, payload, c) in measured:
                continue
            key = raw_key(confirms, payload, c)
            keys = [key, key + ".p50"] if c == 1 else [key]
            measure = partial(bench.raw_client, confirms, payload, c)
            result = bench.attempt(keys, RAW, run, measure)
            if result is None:
                continue
            bench.record(key, RAW, result["rate"], run)
            if c == 1:
                bench.record(key + ".p50", RAW, result["p50_ms"], run)


GROUP_RUNNERS: dict[str, Callable[[Bench], None]] = {
    "rpc": rpc_group,
    "events": events_group,
    "startup": startup_group,
    "raw": raw_group,
}
