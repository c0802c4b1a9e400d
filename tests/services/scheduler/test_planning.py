"""The missed-run and overlap policies as pure functions: any clock, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from framework.cron import CronSchedule
from services.scheduler.planning import (
    FIRE,
    MAX_CATCHUP_RUNS,
    QUEUE,
    SKIP,
    overlap_decision,
    plan_ticks,
)

EVERY_MINUTE = CronSchedule("* * * * *")
NOW = datetime(2026, 6, 1, 12, 0, 2, tzinfo=UTC)
GRACE = timedelta(seconds=5)
HOUR = timedelta(hours=1)


def minutes_ago(minutes: int) -> datetime:
    return datetime(2026, 6, 1, 12, 0, tzinfo=UTC) - timedelta(minutes=minutes)


@pytest.mark.parametrize("policy", ["skip", "run_once", "run_all"])
def test_a_tick_within_the_grace_is_on_time_and_runs_under_every_policy(
    policy: str,
) -> None:
    plan = plan_ticks(EVERY_MINUTE, minutes_ago(0), NOW, policy, HOUR, GRACE)
    assert plan.fire == [minutes_ago(0)]
    assert plan.missed == 0
    assert plan.next_fire_at == minutes_ago(-1)


def test_skip_runs_none_of_the_missed_ticks() -> None:
    plan = plan_ticks(EVERY_MINUTE, minutes_ago(10), NOW, "skip", HOUR, GRACE)
    assert plan.fire == [minutes_ago(0)]
    assert plan.missed == 10


def test_run_once_runs_the_latest_missed_tick() -> None:
    plan = plan_ticks(
        EVERY_MINUTE,
        minutes_ago(10),
        NOW + timedelta(seconds=30),
        "run_once",
        HOUR,
        GRACE,
    )
    assert plan.fire == [minutes_ago(0)]  # 32 s late: missed, and the latest
    assert plan.missed == 10


def test_run_all_runs_every_missed_tick_oldest_first() -> None:
    plan = plan_ticks(EVERY_MINUTE, minutes_ago(10), NOW, "run_all", HOUR, GRACE)
    assert plan.fire == [minutes_ago(m) for m in range(10, -1, -1)]
    assert plan.missed == 0


def test_run_all_stops_at_the_catch_up_window() -> None:
    window = timedelta(minutes=3)
    plan = plan_ticks(EVERY_MINUTE, minutes_ago(10), NOW, "run_all", window, GRACE)
    assert plan.fire == [minutes_ago(2), minutes_ago(1), minutes_ago(0)]


def test_a_long_outage_of_a_fast_schedule_catches_up_a_bounded_number_of_runs() -> None:
    every_second = CronSchedule("* * * * * *")
    plan = plan_ticks(
        every_second, NOW - timedelta(days=2), NOW, "run_all", timedelta(days=3), GRACE
    )
    assert len(plan.fire) == MAX_CATCHUP_RUNS + 6  # the latest late ones, on time ones
    assert plan.fire[-1] == NOW
    assert plan.missed > 0


@pytest.mark.parametrize(
    ("policy", "running", "queued", "decision"),
    [
        ("skip", False, False, FIRE),
        ("skip", True, False, SKIP),
        ("allow", True, True, FIRE),
        ("queue_one", True, False, QUEUE),
        ("queue_one", True, True, SKIP),
        ("queue_one", False, False, FIRE),
    ],
)
def test_overlap_decision(
    policy: str, running: bool, queued: bool, decision: str
) -> None:
    assert overlap_decision(policy, running, queued) == decision
