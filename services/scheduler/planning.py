"""The scheduling rules, as pure functions of a schedule, its due ticks and the time.

Kept apart from the database so each policy is tested on its own, with any clock:

* ``plan_ticks``: which of the ticks that came due since ``next_fire_at`` run
  (the missed-run policy, within the catch-up window) and the next one to wait for;
* ``overlap_decision``: what a tick does while a run of its schedule is going.

A tick at most ``grace`` late is on time and always runs; older ones were missed
(no replica was up, or the schedule's replicas were all busy) and follow the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from framework.cron import CronSchedule
from services.scheduler.schemas import (
    MISSED_RUN_RUN_ALL,
    MISSED_RUN_RUN_ONCE,
    OVERLAP_ALLOW,
    OVERLAP_QUEUE_ONE,
)

__all__ = [
    "FIRE",
    "MAX_CATCHUP_RUNS",
    "QUEUE",
    "SKIP",
    "TickPlan",
    "overlap_decision",
    "plan_ticks",
]

# A run_all catch-up fires at most this many of the latest missed ticks: a
# per-second schedule back from a day off should not flood its target.
MAX_CATCHUP_RUNS = 1000

FIRE = "fire"
QUEUE = "queue"
SKIP = "skip"


@dataclass(frozen=True)
class TickPlan:
    fire: list[datetime]  # ticks to claim and run, oldest first
    missed: int  # ticks within the catch-up window the policy left out
    next_fire_at: datetime  # the first tick after now


def plan_ticks(
    cron: CronSchedule,
    next_fire_at: datetime,
    now: datetime,
    missed_run_policy: str,
    catchup_window: timedelta,
    grace: timedelta,
) -> TickPlan:
    """The ticks in ``[next_fire_at, now]`` to run, by the missed-run policy.

    Walks back from ``now``, so a long outage costs at most ``MAX_CATCHUP_RUNS``
    steps, not one per tick missed; ``missed`` is counted up to that bound.
    """
    # Ticks older than both the window and the grace can never run.
    floor = max(next_fire_at, now - max(catchup_window, grace))
    wanted = {MISSED_RUN_RUN_ALL: MAX_CATCHUP_RUNS, MISSED_RUN_RUN_ONCE: 1}.get(
        missed_run_policy, 0
    )
    on_time: list[datetime] = []
    late: list[datetime] = []
    late_seen = 0
    for tick in cron.iter_before(now):
        if tick < floor or late_seen > MAX_CATCHUP_RUNS:
            break
        if now - tick <= grace:
            on_time.append(tick)
            continue
        late_seen += 1
        if len(late) < wanted:
            late.append(tick)
    return TickPlan(
        fire=late[::-1] + on_time[::-1],
        missed=late_seen - len(late),
        next_fire_at=cron.next_after(now),
    )


def overlap_decision(policy: str, running: bool, queued: bool) -> str:
    """``FIRE``, ``QUEUE`` (run when the current run ends) or ``SKIP``."""
    if not running or policy == OVERLAP_ALLOW:
        return FIRE
    if policy == OVERLAP_QUEUE_ONE and not queued:
        return QUEUE
    return SKIP
