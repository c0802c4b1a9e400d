"""Scheduler figures: tick latency, a burst, and what a claim costs the database.

    .venv/bin/python -m bench.scheduler [--window 60] [--quick]

* **Tick latency** (scheduled time to the target's method starting), p50/p99/max,
  with 1 and with 3 replicas, for 1,000 schedules spread over each minute
  (schedule *i* fires at second *i* mod 60: about 17 due every second), and the
  replicas' CPU per run over the window (from ``/proc``), which the machine's
  load distorts far less than the latency.
* **Burst**: 200 schedules due in the same second, 3 replicas: when the last
  target call starts, counted from the scheduled second.
* **Claim cost**: one ``claim_due`` transaction in this process, on the same
  database with the 1,000 schedules, with 1 and 200 of them due: SQL statements
  and milliseconds (median of repeats).

Replicas are ``framework run services.scheduler.service`` processes with logging
at WARNING; the target is a service in this process recording the time each call
starts and the tick it serves (from the run's context data). Everything runs on
the local RabbitMQ (a fresh vhost) and PostgreSQL (a fresh database), both
removed at the end. Prints a markdown table and writes it to
``bench/results/scheduler.md``.
"""

from __future__ import annotations

from framework import concurrency

concurrency.monkey_patch()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy  # noqa: E402
import sqlalchemy.orm  # noqa: E402

from framework.containers import ServiceContainer  # noqa: E402
from framework.contextdata import ContextDataProvider  # noqa: E402
from framework.database import Session, create_engine  # noqa: E402
from framework.rpc import rpc  # noqa: E402
from framework.testing.postgres import fresh_database  # noqa: E402
from framework.testing.processes import (  # noqa: E402
    start_service,
    stop_processes,
    wait_until_ready,
)
from framework.testing.rabbit import Client  # noqa: E402
from framework.testing.utils import find_free_port  # noqa: E402
from services.scheduler.claiming import SchedulerSettings  # noqa: E402
from services.scheduler.repository import ScheduleRepository  # noqa: E402
from services.scheduler.schemas import (  # noqa: E402
    SCHEDULED_FOR_CONTEXT_KEY,
    parse_schedule,
)

ROOT = Path(__file__).resolve().parent.parent
AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672"
RABBIT_API = "http://guest:guest@127.0.0.1:15672"
RESULTS = ROOT / "bench" / "results" / "scheduler.md"
START_TIMEOUT = 60.0
SPREAD_SCHEDULES = 1000
BURST_SCHEDULES = 200
CLAIM_REPEATS = 20


# -- the target -------------------------------------------------------------------------


class Tick(ContextDataProvider):
    context_key = SCHEDULED_FOR_CONTEXT_KEY


class BenchTarget:
    name = "bench_target"
    calls: list[tuple[str, float]] = []  # (tick, time.time() at the call)
    tick = Tick()

    @rpc
    def touch(self) -> None:
        BenchTarget.calls.append((self.tick, time.time()))


def latencies_ms(since: float, until: float) -> list[float]:
    """Milliseconds from each tick to its call, for ticks in ``[since, until)``."""
    values = []
    for tick, called in BenchTarget.calls:
        scheduled = datetime.fromisoformat(tick).timestamp()
        if since <= scheduled < until:
            values.append((called - scheduled) * 1000)
    return values


# -- the environment --------------------------------------------------------------------


@contextmanager
def environment() -> Iterator[tuple[str, str]]:
    """A fresh vhost and database, migrated; removed at the end."""
    name = f"bench_scheduler_{uuid.uuid4().hex[:10]}"
    rabbit = Client(RABBIT_API)
    rabbit.create_vhost(name)
    rabbit.set_vhost_permissions(name, "guest", ".*", ".*", ".*")
    try:
        with fresh_database(name, ROOT / "services" / "scheduler") as url:
            yield f"{AMQP_SERVER}/{name}", url
    finally:
        rabbit.delete_vhost(name)


class Replicas:
    """``count`` scheduler processes, started together and stopped together."""

    def __init__(self, count: int, amqp_uri: str, url: str, log_dir: Path) -> None:
        config = log_dir / "scheduler.json"
        config.write_text(
            json.dumps(
                {
                    "AMQP_URI": amqp_uri,
                    "DATABASE_URL": url,
                    "max_workers": 300,
                    "LOGGING": {
                        "version": 1,
                        "root": {"level": "WARNING", "handlers": ["console"]},
                        "handlers": {"console": {"class": "logging.StreamHandler"}},
                    },
                }
            )
        )
        self.ports = [find_free_port() for _ in range(count)]
        self.processes = [
            start_service(
                "services.scheduler.service",
                config,
                cwd=ROOT,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
                log_file=log_dir / f"replica-{count}-{number}.log",
                defines={
                    "HEALTH_SERVER_ADDRESS": f"127.0.0.1:{port}",
                    "SCHEDULER_REPLICA": f"replica-{number}",
                },
            )
            for number, port in enumerate(self.ports, 1)
        ]
        try:
            wait_until_ready(self.ports, START_TIMEOUT)
        except TimeoutError:
            self.stop()
            raise SystemExit(f"replicas not ready within {START_TIMEOUT}s") from None

    def cpu_seconds(self) -> float:
        """User + system CPU the replicas have used so far (Linux ``/proc``)."""
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        total = 0
        for process in self.processes:
            # Fields after the command name (which may hold spaces): utime is
            # the 14th field of the line, stime the 15th.
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1]
            utime, stime = fields.split()[11:13]
            total += int(utime) + int(stime)
        return total / ticks_per_second

    def stop(self) -> None:
        stop_processes(self.processes)


def repository(url: str) -> tuple[ScheduleRepository, sqlalchemy.engine.Engine]:
    engine = create_engine(url)
    session = sqlalchemy.orm.sessionmaker(
        bind=engine, class_=Session, expire_on_commit=False
    )()
    settings = SchedulerSettings(
        replica="bench",
        misfire_grace=timedelta(seconds=5),
        lost_after=timedelta(seconds=10),
    )
    return ScheduleRepository(session, settings), engine


def reset(url: str, crons: list[str]) -> None:
    """Only these schedules (every one calling the bench target), no runs."""
    repo, engine = repository(url)
    repo.session.execute(sqlalchemy.text("TRUNCATE runs, schedules RESTART IDENTITY"))
    repo.session.commit()
    for number, cron in enumerate(crons):
        repo.add(
            parse_schedule(
                {
                    "name": f"bench {number}",
                    "cron": cron,
                    "target": {
                        "kind": "rpc",
                        "service": "bench_target",
                        "method": "touch",
                    },
                    "overlap_policy": "allow",
                    "timeout_seconds": 10,
                }
            )
        )
    repo.session.close()
    engine.dispose()


def spread() -> list[str]:
    return [f"{number % 60} * * * * *" for number in range(SPREAD_SCHEDULES)]


def spread_ticks(since: float, until: float) -> int:
    """How many ticks of ``spread()``'s schedules fall in ``[since, until)``: at each
    whole second, the schedules whose second field is that second's (UTC)."""
    per_second, remainder = divmod(SPREAD_SCHEDULES, 60)
    return sum(
        per_second + (1 if second % 60 < remainder else 0)
        for second in range(math.ceil(since), math.ceil(until))
    )


# -- measurements -------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def measure_spread(
    replicas: int, window: float, amqp_uri: str, url: str, log_dir: Path
) -> dict[str, Any]:
    reset(url, spread())
    group = Replicas(replicas, amqp_uri, url, log_dir)
    try:
        concurrency.sleep(2)  # past start-up: the first claims coincide with it
        since, cpu_since = time.time(), group.cpu_seconds()
        concurrency.sleep(window)
        until = time.time() - 1  # the last second's calls may still be arriving
        cpu = group.cpu_seconds() - cpu_since
        concurrency.sleep(2)
    finally:
        group.stop()
    values = latencies_ms(since, until)
    expected = spread_ticks(since, until)
    return {
        "calls": len(values),
        "expected": expected,
        # The replicas' CPU over the window (one second more than the calls
        # counted) per run: what load on the machine distorts least.
        "cpu_per_run_ms": cpu * 1000 / (SPREAD_SCHEDULES * window / 60),
        "p50": statistics.median(values),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def measure_burst(amqp_uri: str, url: str, log_dir: Path) -> dict[str, Any]:
    group = Replicas(3, amqp_uri, url, log_dir)
    try:
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=8)
        reset(url, [f"{due.second} {due.minute} * * * *"] * BURST_SCHEDULES)
        # From before the claims (half a second ahead) to after the last call.
        concurrency.sleep(max(due.timestamp() - 1 - time.time(), 0))
        cpu_since = group.cpu_seconds()
        concurrency.sleep(max(due.timestamp() - time.time(), 0) + 3)
        cpu = group.cpu_seconds() - cpu_since
    finally:
        group.stop()
    values = latencies_ms(due.timestamp(), due.timestamp() + 1)
    return {
        "cpu_per_run_ms": cpu * 1000 / BURST_SCHEDULES,
        "calls": len(values),
        "first": min(values),
        "p50": statistics.median(values),
        "last": max(values),
    }


def measure_claims(url: str, due_count: int) -> dict[str, Any]:
    """One claim pass with ``due_count`` of the 1,000 schedules due."""
    # Due ones fire every second (their next_fire_at set to this second); the
    # others once a year.
    reset(
        url,
        ["* * * * * *"] * due_count + ["0 0 0 1 1 *"] * (SPREAD_SCHEDULES - due_count),
    )
    repo, engine = repository(url)
    statements = 0

    def count(*args: Any) -> None:
        nonlocal statements
        statements += 1

    sqlalchemy.event.listen(engine, "before_cursor_execute", count)
    durations, counts, ticks, pass_counts = [], [], [], []
    try:
        for _ in range(CLAIM_REPEATS):
            repo.session.execute(
                sqlalchemy.text(
                    "UPDATE schedules SET next_fire_at = date_trunc('second', now()) "
                    "WHERE id <= :due"
                ),
                {"due": due_count},
            )
            repo.session.execute(sqlalchemy.text("DELETE FROM runs"))
            repo.session.commit()
            statements = 0
            started = time.perf_counter()
            # Passes of at most CLAIM_BATCH schedules, until nothing due is left.
            claimed_ticks, passes = 0, 0
            while True:
                claimed = repo.claim_due()
                claimed_ticks += len(claimed.launches)
                passes += 1
                if claimed.wait > 0 or not claimed.launches:
                    break
            durations.append((time.perf_counter() - started) * 1000)
            counts.append(statements)
            pass_counts.append(passes)
            # Claimed half a second ahead: a schedule may have its next tick in too.
            ticks.append(claimed_ticks)
            if claimed_ticks < due_count:
                raise SystemExit(f"claimed {claimed_ticks} ticks of {due_count} due")
    finally:
        repo.session.close()
        engine.dispose()
    return {
        "ms": statistics.median(durations),
        "statements": statistics.median(counts),
        "ticks": statistics.median(ticks),
        "passes": statistics.median(pass_counts),
        "per_tick_ms": statistics.median(
            duration / count for duration, count in zip(durations, ticks, strict=True)
        ),
    }


def table(results: dict[str, Any], window: float) -> str:
    load = os.getloadavg()
    lines = [
        f"Scheduler bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average "
        f"{load[0]:.1f} (2 cores shared with other work), {window:.0f} s windows.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for replicas in (1, 3):
        if f"spread-{replicas}" not in results:
            continue
        spread_result = results[f"spread-{replicas}"]
        lines.append(
            f"| tick latency, {SPREAD_SCHEDULES} schedules over a minute, {replicas} "
            f"replica{'s' if replicas > 1 else ''}: p50 / p99 / max | "
            f"{spread_result['p50']:.1f} / {spread_result['p99']:.1f} / "
            f"{spread_result['max']:.1f} ms ({spread_result['calls']} calls, "
            f"{spread_result['expected']} expected; replicas' CPU "
            f"{spread_result['cpu_per_run_ms']:.1f} ms per run) |"
        )
    burst = results.get("burst")
    if burst is not None:
        lines.append(
            f"| burst of {BURST_SCHEDULES} due in one second, 3 replicas: first / "
            f"median / last call | {burst['first']:.0f} / {burst['p50']:.0f} / "
            f"{burst['last']:.0f} ms ({burst['calls']} calls; replicas' CPU "
            f"{burst['cpu_per_run_ms']:.1f} ms per run) |"
        )
    for due in (1, BURST_SCHEDULES):
        claim = results.get(f"claim-{due}")
        if claim is None:
            continue
        lines.append(
            f"| claiming {due} due of {SPREAD_SCHEDULES} schedules | "
            f"{claim['ms']:.1f} ms, {claim['passes']:.0f} transaction(s), "
            f"{claim['statements']:.0f} SQL statements, {claim['ticks']:.0f} ticks "
            f"claimed ({claim['per_tick_ms']:.2f} ms per tick) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds per latency run"
    )
    parser.add_argument(
        "--quick", action="store_true", help="10 s windows: checks it works"
    )
    parser.add_argument(
        "--only",
        choices=("latency", "burst", "claims"),
        action="append",
        help="only these measurements (repeatable); the table shows what was run",
    )
    args = parser.parse_args()
    window = 10.0 if args.quick else args.window

    # This process claims too (the claim cost): its warnings are the bench's noise.
    logging.getLogger("services.scheduler").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    with environment() as (amqp_uri, url), tempfile.TemporaryDirectory() as logs:
        target = ServiceContainer(
            BenchTarget, {"AMQP_URI": amqp_uri, "max_workers": 300}
        )
        target.start()
        # The target stands in for another service: its own full garbage
        # collections (this process holds the claim benchmark's objects too)
        # would count as the scheduler's latency. Frozen as a replica freezes.
        gc.collect()
        gc.freeze()
        try:
            wanted = set(args.only or ("latency", "burst", "claims"))
            for replicas in (1, 3) if "latency" in wanted else ():
                print(f"tick latency with {replicas} replica(s)...", file=sys.stderr)
                results[f"spread-{replicas}"] = measure_spread(
                    replicas, window, amqp_uri, url, Path(logs)
                )
                print(results[f"spread-{replicas}"], file=sys.stderr)
            if "burst" in wanted:
                print("burst...", file=sys.stderr)
                results["burst"] = measure_burst(amqp_uri, url, Path(logs))
                print(results["burst"], file=sys.stderr)
            if "claims" in wanted:
                print("claim cost...", file=sys.stderr)
                for due in (1, BURST_SCHEDULES):
                    results[f"claim-{due}"] = measure_claims(url, due)
        finally:
            target.stop()
    output = table(results, window)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(output)
    sys.stdout.write(output)


if __name__ == "__main__":
    main()
