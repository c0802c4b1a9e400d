"""What the bench measures, group by group (``--only rpc|events|startup|raw``).

In every run both frameworks are measured one after the other, on the same vhost,
with their services started fresh; which one goes first alternates from run to
run, so a slow drift of the machine (or of other people's load on the shared
broker) does not always favour the same side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """Everything a group needs: where to run, what to run, where results go."""

    frameworks: dict[str, Framework]
    registry: ProcessRegistry
    amqp_uri: str
    config_path: Path
    probe: BrokerProbe
    settings: Settings
    results: Results

    def order(self, run: int) -> list[Framework]:
        keys = [OURS, NAMEKO] if run % 2 == 0 else [NAMEKO, OURS]
        return [self.frameworks[k] for k in keys]

    @contextmanager
    def service(
        self, framework: Framework, service_class: str, first_call: FirstCall, run: int
    ) -> Iterator[RunningService]:
        with running_service(
            self.registry,
            framework,
            service_class,
            self.config_path,
            self.probe,
            first_call,
        ) as service:
            yield service
        if service.problems:
            self.problem(run, framework.key, f"{service_class}: {service.problems}")

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
            self.problem(run, side, f"{label}: failed: {str(exc).splitlines()[0]}")
            return None

    def client(self, framework: Framework, scenario: str, *args: Any) -> dict[str, Any]:
        argv = [framework.key, "--amqp-uri", self.amqp_uri, scenario, *map(str, args)]
        return run_client(
            self.registry,
            framework.python,
            "bench.client",
            argv,
            f"{framework.key}-client",
        )

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


def as_options(options: dict[str, Any]) -> list[str]:
    return [
        part for name, value in options.items() for part in (f"--{name}", str(value))
    ]


def payload_label(payload: str) -> str:
    return "tiny payload" if payload == TINY else "10 KB payload"


# -- the figures, in table order ------------------------------------------------------------

# (confirm mode, payload, in flight). At concurrency 1 each call waits for its
# confirm before its reply (``turn``), as both frameworks' proxies do; with more
# in flight, confirms overlap (``async``). Those give the ceiling column of the
# main table; the others are for scale.
RAW_CASES = (
    ("turn", TINY, 1),
    ("turn", LARGE, 1),
    ("async", TINY, 1),
    ("async", TINY, 10),
    ("async", TINY, 50),
    ("async", LARGE, 10),
    ("async", LARGE, 50),
    ("none", TINY, 1),
    ("none", TINY, 10),
    ("none", TINY, 50),
)
RAW_PREFETCH = 10  # what both frameworks' services use (max_workers)
CONFIRM_LABELS = {
    "turn": "confirms waited in turn",
    "async": "asynchronous confirms",
    "none": "no confirms",
}


def define_figures(results: Results, settings: Settings, groups: list[str]) -> None:
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
            results.figure(
                raw_key(confirms, payload, c), label, "calls/s", section=CEILING
            )
            if c == 1:
                results.figure(
                    raw_key(confirms, payload, c) + ".p50",
                    f"{label}, latency p50",
                    "ms",
                    higher_is_better=False,
                    section=CEILING,
                )


def raw_key(confirms: str, payload: str, concurrency: int) -> str:
    return f"raw.{confirms}.{payload}.c{concurrency}"


# -- rpc ------------------------------------------------------------------------------------


def rpc_group(bench: Bench) -> None:
    for run in range(bench.settings.runs):
        for fw in bench.order(run):
            with bench.service(fw, "BenchTarget", TARGET_CALL, run):
                measure_standalone_rpc(bench, fw, run)
                # The relay calls bench_target, which keeps running for it.
                with bench.service(fw, "BenchRelay", RELAY_CALL, run):
                    measure_relay(bench, fw, run)


def measure_standalone_rpc(bench: Bench, fw: Framework, run: int) -> None:
    for payload in PAYLOAD_NAMES:
        for c in bench.settings.concurrencies:
            keys = [f"rpc.{payload}.c{c}"]
            if c == 1:
                keys += [f"rpc.{payload}.p50", f"rpc.{payload}.p99"]
            measure = partial(bench.rpc_client, fw, TARGET_CALL, payload, c)
            result = bench.attempt(keys, fw.key, run, measure)
            if result is None:
                continue
            bench.record(f"rpc.{payload}.c{c}", fw.key, result["rate"], run)
            if c == 1:
                bench.record(f"rpc.{payload}.p50", fw.key, result["p50_ms"], run)
                bench.record(f"rpc.{payload}.p99", fw.key, result["p99_ms"], run)


def measure_relay(bench: Bench, fw: Framework, run: int) -> None:
    for c in bench.settings.relay_concurrencies:
        measure = partial(bench.rpc_client, fw, RELAY_CALL, TINY, c)
        result = bench.attempt([f"relay.c{c}"], fw.key, run, measure)
        if result is not None:
            bench.record(f"relay.c{c}", fw.key, result["rate"], run)


# -- events -----------------------------------------------------------------------------------


def events_group(bench: Bench) -> None:
    s = bench.settings
    for run in range(s.runs):
        for fw in bench.order(run):
            # The handler alone: its queue is filled before it starts, and it is
            # timed from the first event it handles to the last.
            prefill_events(
                bench.amqp_uri, EVENT_SOURCE, EVENT_TYPE, SINK_QUEUE, s.events
            )
            with bench.service(fw, "BenchSink", SINK_CALL, run):
                drained = partial(wait_for_handled, bench.probe, s.events)
                state = bench.attempt(["events.drain"], fw.key, run, drained)
                if state is None:
                    continue
                drain_rate = (s.events - 1) / (state["last"] - state["first"])
                bench.record("events.drain", fw.key, drain_rate, run)
                # End to end, on the same handler process.
                options = {"count": s.events, "dispatchers": s.event_dispatchers}
                measure = partial(bench.client, fw, "events", *as_options(options))
                result = bench.attempt(["events.e2e"], fw.key, run, measure)
                if result is not None:
                    bench.record("events.e2e", fw.key, result["rate"], run)


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
    for run in range(bench.settings.runs):
        for fw in bench.order(run):
            with bench.service(fw, "BenchTarget", TARGET_CALL, run) as service:
                bench.record("startup", fw.key, service.startup_seconds, run)


# -- raw ceiling ------------------------------------------------------------------------------


def raw_group(bench: Bench) -> None:
    for run in range(bench.settings.runs):
        for confirms, payload, c in RAW_CASES:
            key = raw_key(confirms, payload, c)
            keys = [key, key + ".p50"] if c == 1 else [key]
            measure = partial(run_raw_case, bench, confirms, payload, c)
            result = bench.attempt(keys, RAW, run, measure)
            if result is None:
                continue
            bench.record(key, RAW, result["rate"], run)
            if c == 1:
                bench.record(key + ".p50", RAW, result["p50_ms"], run)
            attach_ceiling(bench.results, confirms, payload, c, result)


def run_raw_case(bench: Bench, confirms: str, payload: str, c: int) -> dict[str, Any]:
    options = {
        "amqp-uri": bench.amqp_uri,
        "confirms": confirms,
        "payload": payload,
        "concurrency": c,
        "duration": bench.settings.duration,
    }
    with raw_server(bench.registry, bench.amqp_uri, confirms, RAW_PREFETCH):
        return run_client(
            bench.registry,
            bench.frameworks[OURS].python,
            "bench.raw",
            ["client", *as_options(options)],
            "raw-client",
        )


def attach_ceiling(
    results: Results, confirms: str, payload: str, c: int, result: dict[str, Any]
) -> None:
    """The raw loop with the frameworks' confirm behaviour is the main table's ceiling."""
    if confirms != ("turn" if c == 1 else "async"):
        return
    figures = results.figures
    if f"rpc.{payload}.c{c}" in figures:
        figures[f"rpc.{payload}.c{c}"].add(RAW, result["rate"])
    if c == 1 and f"rpc.{payload}.p50" in figures:
        figures[f"rpc.{payload}.p50"].add(RAW, result["p50_ms"])
        figures[f"rpc.{payload}.p99"].add(RAW, result["p99_ms"])


GROUP_RUNNERS: dict[str, Callable[[Bench], None]] = {
    "rpc": rpc_group,
    "events": events_group,
    "startup": startup_group,
    "raw": raw_group,
}
