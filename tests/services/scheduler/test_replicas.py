"""Three scheduler replicas as deployed (``framework run``, configured through the
environment) on one schedule firing every second for a minute. Halfway one replica
is killed with SIGKILL; before that another is frozen with SIGSTOP for 5 seconds.

Every tick of the window must have exactly one run in the database and at most one
call at the target; a tick the target never heard of may only be a run the killed
replica had claimed (marked lost by the others, never fired twice).
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from framework.contextdata import ContextDataProvider
from framework.rpc import rpc
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.postgres import fresh_database, query
from framework.testing.processes import health_ready, start_service, stop_processes
from framework.testing.utils import find_free_port
from services.scheduler.schemas import SCHEDULED_FOR_CONTEXT_KEY
from tests.helpers import wait_for
from tests.services.scheduler.conftest import SERVICE_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PROJECT_DIR = SERVICE_DIR.parent.parent
WINDOW = 60  # seconds of ticks
FREEZE_AT, FREEZE_FOR = 15, 5  # SIGSTOP replica 2 at 15 s, for 5 s
KILL_AT = WINDOW // 2  # SIGKILL replica 1 halfway
START_TIMEOUT = 60
TIMEOUT_SECONDS = 8  # the schedule's; a killed replica's run is lost 8 + 12 s on


class TickTarget:
    name = "tick_target"
    ticks: list[str] = []

    class Tick(ContextDataProvider):
        context_key = SCHEDULED_FOR_CONTEXT_KEY

    tick = Tick()

    @rpc
    def record(self) -> None:
        TickTarget.ticks.append(self.tick)


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database("scheduler_e2e", SERVICE_DIR) as url:
        query(url, "DELETE FROM schedules")  # the built-ins call conversions
        yield url


def start_replica(
    number: int, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = find_free_port()
    process = start_service(
        "services.scheduler.service",
        "services/scheduler/config.yaml",
        cwd=PROJECT_DIR,
        env={**env, "SCHEDULER_REPLICA": f"replica-{number}"},
        log_file=log,
        defines={"HEALTH_SERVER_ADDRESS": f"127.0.0.1:{port}"},
    )
    return process, port


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def test_three_replicas_run_every_tick_exactly_once_through_a_kill_and_a_freeze(
    rabbit_config: dict[str, Any],
    container_factory: Any,
    database: str,
    tmp_path: Path,
) -> None:
    TickTarget.ticks.clear()
    container_factory(TickTarget, rabbit_config).start()
    env = {
        **os.environ,
        "AMQP_URI": rabbit_config["AMQP_URI"],
        "DATABASE_URL": database,
        # Its half is longer than the freeze: a frozen replica still calls its
        # runs, late, instead of leaving them to be marked lost.
        "SCHEDULER_LOST_AFTER_SECONDS": "12",
    }
    replicas = [
        start_replica(number, env, tmp_path / f"replica-{number}.log")
        for number in (1, 2, 3)
    ]
    try:
        wait_for(lambda: all(health_ready(port) for _, port in replicas), START_TIMEOUT)
        with ClusterRpcProxy(rabbit_config, timeout=10) as proxy:
            schedule = proxy.scheduler.create_schedule(
                {
                    "name": "every second",
                    "cron": "* * * * * *",
                    "target": {
                        "kind": "rpc",
                        "service": "tick_target",
                        "method": "record",
                    },
                    "missed_run_policy": "run_all",
                    "overlap_policy": "allow",
                    "timeout_seconds": TIMEOUT_SECONDS,
                }
            )
        started = time.monotonic()

        def at(second: float) -> None:
            wait_for(lambda: time.monotonic() - started >= second, timeout=WINDOW * 2)

        frozen, killed = replicas[1][0], replicas[0][0]
        at(FREEZE_AT)
        frozen.send_signal(signal.SIGSTOP)
        at(FREEZE_AT + FREEZE_FOR)
        frozen.send_signal(signal.SIGCONT)
        at(KILL_AT)
        killed.kill()
        at(WINDOW)
        query(database, "UPDATE schedules SET enabled = false")
        # Runs of the killed replica end as lost once past their deadline.
        wait_for(
            lambda: (
                query(database, "SELECT count(*) FROM runs WHERE outcome = 'running'")
                == [(0,)]
            ),
            timeout=TIMEOUT_SECONDS + 20,
        )
    finally:
        stop_processes(process for process, _ in replicas)

    runs = query(
        database,
        "SELECT scheduled_for, outcome, replica FROM runs WHERE schedule_id = %s "
        "ORDER BY scheduled_for",
        schedule["id"],
    )
    ticks = [row[0] for row in runs]
    # One run per tick, and no tick of the window left without one.
    assert len(ticks) >= WINDOW - 2
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ticks)}
    assert gaps == {1.0}, gaps

    called = collections.Counter(TickTarget.ticks)
    assert max(called.values()) == 1  # never fired twice
    succeeded = {iso(tick) for tick, outcome, _ in runs if outcome == "succeeded"}
    assert succeeded <= set(called)
    others = {(iso(tick), outcome, replica) for tick, outcome, replica in runs}
    not_succeeded = [row for row in others if row[0] not in succeeded]
    # Only what the killed replica held can be lost, and nothing else fails.
    assert all(outcome == "lost" for _, outcome, _ in not_succeeded), not_succeeded
    assert all(replica == "replica-1" for _, _, replica in not_succeeded)
    assert len(not_succeeded) <= 2
    assert {replica for _, _, replica in runs} >= {"replica-2", "replica-3"}
