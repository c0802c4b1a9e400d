"""@cron: expressions, time zones and DST, overlap, drain, the cluster lock.

Time is a ``ManualClock`` moved by the tests: a DST day or a month of ticks runs
in milliseconds, and nothing waits for the real clock. Only the cluster lock on
PostgreSQL needs a real server; the rest runs with neither broker nor database
(the lock's SQLite test uses a file in ``tmp_path``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy

from framework import concurrency
from framework.cron import (
    CLAIMS_TABLE,
    CronSchedule,
    InvalidCronExpression,
    ManualClock,
    ScheduledFor,
    cron,
)
from framework.exceptions import ConfigurationError
from framework.testing.postgres import fresh_database
from tests.helpers import wait_for

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=PARIS, fold=fold)  # type: ignore[misc]


def make_service(
    expression: str,
    clock: ManualClock,
    tz: str = "UTC",
    **options: Any,
) -> Any:
    class Scheduled:
        name = "scheduled"
        ticks: list[str] = []
        release = concurrency.Event()
        block = False
        scheduled_for = ScheduledFor()

        @cron(expression, tz=tz, clock=clock, **options)
        def tick(self) -> None:
            Scheduled.ticks.append(self.scheduled_for)
            if Scheduled.block:
                Scheduled.release.wait()

    return Scheduled


def advance_to(clock: ManualClock, moment: datetime, step: timedelta) -> None:
    """Move the clock to ``moment`` in ``step``s, letting each tick fire."""
    while clock.now() < moment:
        clock.set(min(clock.now() + step, moment.astimezone(UTC)))
        concurrency.sleep(0)


# -- expressions -----------------------------------------------------------------------


def test_a_half_past_two_job_fires_once_on_the_day_clocks_skip_that_hour() -> None:
    schedule = CronSchedule("30 2 * * *", "Europe/Paris")
    fired = list(schedule.between(paris(2026, 3, 28, 12), paris(2026, 3, 30, 12)))
    # 02:30 does not exist on 29 March: the job runs once, as the gap ends.
    assert fired == [paris(2026, 3, 29, 3, 0), paris(2026, 3, 30, 2, 30)]


def test_a_half_past_two_job_fires_once_on_the_day_clocks_repeat_that_hour() -> None:
    schedule = CronSchedule("30 2 * * *", "Europe/Paris")
    fired = list(schedule.between(paris(2026, 10, 24, 12), paris(2026, 10, 26, 12)))
    assert [moment.astimezone(UTC) for moment in fired] == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 summer time
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]


def test_a_job_every_twenty_minutes_keeps_its_period_through_the_repeated_hour() -> (
    None
):
    schedule = CronSchedule("*/20 * * * *", "Europe/Paris")
    fired = list(schedule.between(paris(2026, 10, 25, 1, 50), paris(2026, 10, 25, 3)))
    gaps = {b.astimezone(UTC) - a.astimezone(UTC) for a, b in itertools.pairwise(fired)}
    assert len(fired) == 7  # 02:00, 02:20, 02:40 twice, then 03:00
    assert gaps == {timedelta(minutes=20)}


def test_six_fields_put_seconds_first_and_aliases_are_understood() -> None:
    start = datetime(2026, 1, 1, 10, 0, 0, tzinfo=UTC)
    assert CronSchedule("*/15 * * * * *").next_times(start, 2) == [
        start + timedelta(seconds=15),
        start + timedelta(seconds=30),
    ]
    assert CronSchedule("@hourly").next_after(start) == start + timedelta(hours=1)
    assert CronSchedule("@daily", "Europe/Paris").next_after(start) == paris(
        2026, 1, 2, 0, 0
    )


@pytest.mark.parametrize(
    ("expression", "tz", "reason"),
    [
        ("61 * * * *", "UTC", "not a valid cron expression"),
        ("* * *", "UTC", "has 3 fields"),
        ("@fortnightly", "UTC", "has 1 fields"),
        ("* * * * *", "Mars/Olympus", "unknown time zone"),
        ("", "UTC", "non-empty"),
    ],
)
def test_bad_expressions_and_zones_are_refused_with_the_reason(
    expression: str, tz: str, reason: str
) -> None:
    with pytest.raises(InvalidCronExpression, match=reason):
        CronSchedule(expression, tz)


def test_a_bad_expression_stops_the_service_at_start(container_factory: Any) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    container = container_factory(make_service("60 * * * *", clock), {})
    with pytest.raises(ConfigurationError, match=r"@cron on scheduled\.tick: '60"):
        container.start()


def test_a_bad_overlap_policy_stops_the_service_at_start(
    container_factory: Any,
) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    service = make_service("* * * * *", clock, overlap="sometimes")
    with pytest.raises(ConfigurationError, match="overlap must be one of"):
        container_factory(service, {}).start()


# -- the entrypoint ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (
            paris(2026, 3, 28, 12),
            paris(2026, 3, 30, 12),
            # 03:00 CEST as the gap ends, then 02:30 CEST
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"],
        ),
        (
            paris(2026, 10, 24, 12),
            paris(2026, 10, 26, 12),
            # the first 02:30 (CEST) only, then 02:30 CET
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"],
        ),
    ],
    ids=["clocks-skip", "clocks-repeat"],
)
def test_a_half_past_two_worker_runs_once_on_each_dst_day(
    container_factory: Any, start: datetime, end: datetime, expected: list[str]
) -> None:
    clock = ManualClock(start)
    service = make_service("30 2 * * *", clock, tz="Europe/Paris")
    container_factory(service, {}).start()

    advance_to(clock, end, timedelta(minutes=10))
    wait_for(lambda: len(service.ticks) >= 2, timeout=5)
    concurrency.sleep(0.05)
    assert service.ticks == expected


def test_ticks_missed_while_suspended_are_coalesced_into_the_latest(
    container_factory: Any,
) -> None:
    clock = ManualClock(datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC))
    service = make_service("* * * * *", clock)
    container_factory(service, {}).start()

    clock.advance(minutes=5)  # one jump: as if the process had been stopped
    wait_for(lambda: len(service.ticks) == 1, timeout=5)
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 2, timeout=5)
    assert service.ticks == ["2026-01-01T10:05:00+00:00", "2026-01-01T10:06:00+00:00"]


def run_overlapping(container_factory: Any, overlap: str) -> Any:
    """Three ticks while the first run blocks; then release it."""
    clock = ManualClock(datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC))
    service = make_service("* * * * *", clock, overlap=overlap)
    service.block = True
    container = container_factory(service, {})
    container.start()
    for _ in range(3):
        clock.advance(minutes=1)
        concurrency.sleep(0.01)
    return service, container


def test_overlap_skip_drops_ticks_while_a_run_is_going(container_factory: Any) -> None:
    service, container = run_overlapping(container_factory, "skip")
    wait_for(lambda: len(service.ticks) == 1, timeout=5)
    service.release.send(None)
    wait_for(lambda: container.active_workers == 0, timeout=5)
    assert service.ticks == ["2026-01-01T10:01:00+00:00"]


def test_overlap_allow_runs_ticks_alongside(container_factory: Any) -> None:
    service, container = run_overlapping(container_factory, "allow")
    wait_for(lambda: len(service.ticks) == 3, timeout=5)
    assert container.active_workers == 3
    service.release.send(None)


def test_overlap_queue_one_runs_one_waiting_tick_after_the_current(
    container_factory: Any,
) -> None:
    service, container = run_overlapping(container_factory, "queue_one")
    concurrency.sleep(0.05)
    assert service.ticks == ["2026-01-01T10:01:00+00:00"]
    service.release.send(None)
    wait_for(lambda: len(service.ticks) == 2, timeout=5)
    wait_for(lambda: container.active_workers == 0, timeout=5)
    # The second tick waited; the third found one already waiting and was dropped.
    assert service.ticks == ["2026-01-01T10:01:00+00:00", "2026-01-01T10:02:00+00:00"]


def test_stop_drains_the_running_tick_then_no_more_fire(container_factory: Any) -> None:
    clock = ManualClock(datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC))
    service = make_service("* * * * *", clock)
    service.block = True
    container = container_factory(service, {})
    container.start()
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 1, timeout=5)

    stopper = concurrency.spawn(container.stop)
    concurrency.sleep(0.05)
    assert not stopper.dead  # waiting for the running tick
    service.release.send(None)
    with concurrency.Timeout(5):
        stopper.wait()
    clock.advance(minutes=5)
    concurrency.sleep(0.05)
    assert len(service.ticks) == 1


# -- cluster_once -----------------------------------------------------------------------


def run_replicas(container_factory: Any, url: str, replicas: int = 3) -> Any:
    """``replicas`` containers of one cluster-once service on one clock and database."""
    clock = ManualClock(datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC))
    # "allow": the clock moves a minute every 20 ms, faster than a run's end is
    # recorded in the database; with "skip" the cluster would rightly skip ticks
    # (the overlap tests below), and this test is about one replica per tick.
    service = make_service("* * * * *", clock, cluster_once=True, overlap="allow")
    for _ in range(replicas):
        container_factory(service, {"DATABASE_URL": url}).start()
    for _ in range(5):
        clock.advance(minutes=1)
        concurrency.sleep(0.02)
    return service


def claims(url: str) -> list[tuple[str, datetime]]:
    engine = sqlalchemy.create_engine(
        url.replace("postgresql:", "postgresql+psycopg2:")
    )
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sqlalchemy.text(f"SELECT name, scheduled_for FROM {CLAIMS_TABLE}")
            )
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        engine.dispose()


def test_cluster_once_runs_each_tick_on_one_replica_sqlite(
    container_factory: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'claims.sqlite3'}"
    service = run_replicas(container_factory, url)
    wait_for(lambda: len(service.ticks) >= 5, timeout=5)
    concurrency.sleep(0.05)
    assert sorted(service.ticks) == [
        f"2026-01-01T10:0{minute}:00+00:00" for minute in range(1, 6)
    ]
    assert len(claims(url)) == 5


@pytest.fixture
def pg_cron_url() -> Iterator[str]:
    with fresh_database("cron_test") as url:
        yield url


@pytest.mark.integration
def test_cluster_once_runs_each_tick_on_one_replica_postgres(
    container_factory: Any, pg_cron_url: str
) -> None:
    service = run_replicas(container_factory, pg_cron_url)
    wait_for(lambda: len(service.ticks) >= 5, timeout=5)
    concurrency.sleep(0.05)
    assert sorted(service.ticks) == [
        f"2026-01-01T10:0{minute}:00+00:00" for minute in range(1, 6)
    ]
    assert sorted(row[0] for row in claims(pg_cron_url)) == ["scheduled.tick"] * 5


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (paris(2026, 3, 28, 12), paris(2026, 3, 30, 12)),
        (paris(2026, 10, 24, 12), paris(2026, 10, 26, 12)),
    ],
    ids=["clocks-skip", "clocks-repeat"],
)
@pytest.mark.parametrize("expression", ["30 2 * * *", "*/20 * * * *"])
def test_walking_back_finds_the_same_fire_times_as_walking_forward(
    expression: str, start: datetime, end: datetime
) -> None:
    schedule = CronSchedule(expression, "Europe/Paris")
    forward = list(schedule.between(start, end))
    backward = list(itertools.takewhile(lambda t: t > start, schedule.iter_before(end)))
    assert [t.astimezone(UTC) for t in backward[::-1]] == [
        t.astimezone(UTC) for t in forward
    ]


# -- cluster_once and the overlap policy: decided for the whole cluster ----------------------


def two_replicas(container_factory: Any, url: str, overlap: str) -> tuple[Any, Any]:
    """Two containers of a cluster-once service on one clock and database, whose
    runs block until released."""
    clock = ManualClock(datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC))
    service = make_service("* * * * *", clock, cluster_once=True, overlap=overlap)
    service.block = True
    replicas = [container_factory(service, {"DATABASE_URL": url}) for _ in range(2)]
    for replica in replicas:
        replica.start()
    return service, clock, replicas


def running_row(url: str) -> Any:
    engine = sqlalchemy.create_engine(
        url.replace("postgresql:", "postgresql+psycopg2:")
    )
    try:
        with engine.begin() as connection:
            return connection.execute(
                sqlalchemy.text(
                    "SELECT scheduled_for, queued_for FROM framework_cron_running"
                )
            ).one()
    finally:
        engine.dispose()


def expire_leases(url: str) -> None:
    """As if the lease of the run going had run out (its replica died long ago)."""
    engine = sqlalchemy.create_engine(
        url.replace("postgresql:", "postgresql+psycopg2:")
    )
    try:
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text(
                    "UPDATE framework_cron_running "
                    "SET lease_until = now() - interval '1 second'"
                )
            )
    finally:
        engine.dispose()


def tick_at(minute: int) -> str:
    return f"2026-01-01T10:{minute:02d}:00+00:00"


@pytest.mark.integration
def test_cluster_once_skip_is_decided_for_the_cluster_not_per_replica(
    container_factory: Any, pg_cron_url: str
) -> None:
    service, clock, replicas = two_replicas(container_factory, pg_cron_url, "skip")
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 1, timeout=5)
    # The other replica is idle, but the run going on the first one is the
    # cluster's: the next ticks are skipped on both.
    for _ in range(2):
        clock.advance(minutes=1)
        concurrency.sleep(0.02)
    wait_for(lambda: len(claims(pg_cron_url)) == 3, timeout=5)
    assert service.ticks == [tick_at(1)]

    service.release.send(None)
    wait_for(lambda: running_row(pg_cron_url)[0] is None, timeout=5)
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 2, timeout=5)
    assert service.ticks == [tick_at(1), tick_at(4)]


@pytest.mark.integration
def test_cluster_once_queue_one_runs_the_waiting_tick_once_the_cluster_run_ends(
    container_factory: Any, pg_cron_url: str
) -> None:
    service, clock, replicas = two_replicas(container_factory, pg_cron_url, "queue_one")
    for _ in range(3):
        clock.advance(minutes=1)
        concurrency.sleep(0.02)
    wait_for(lambda: len(claims(pg_cron_url)) == 3, timeout=5)
    assert service.ticks == [tick_at(1)]
    assert running_row(pg_cron_url)[1] is not None  # 10:02 waits; 10:03 dropped

    service.release.send(None)
    wait_for(lambda: len(service.ticks) == 2, timeout=5)
    wait_for(lambda: tuple(running_row(pg_cron_url)) == (None, None), timeout=5)
    assert service.ticks == [tick_at(1), tick_at(2)]


@pytest.mark.integration
def test_a_replica_that_died_mid_run_blocks_the_cluster_only_until_its_lease_expires(
    container_factory: Any, pg_cron_url: str
) -> None:
    service, clock, (first, second) = two_replicas(
        container_factory, pg_cron_url, "skip"
    )
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 1, timeout=5)
    running_on = first if first.active_workers else second
    survivor = second if running_on is first else first
    running_on.kill()  # its run never ends: nothing releases the row

    clock.advance(minutes=1)
    wait_for(lambda: len(claims(pg_cron_url)) == 2, timeout=5)
    assert service.ticks == [tick_at(1)]  # the lease still holds

    expire_leases(pg_cron_url)
    service.block = False
    clock.advance(minutes=1)
    wait_for(lambda: len(service.ticks) == 2, timeout=5)
    assert service.ticks == [tick_at(1), tick_at(3)]
    assert survivor.active_workers == 0
