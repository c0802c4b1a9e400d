"""The scheduling rules, as pure functions of a schedule, its due ticks and the time.

Kept apart from the database so each policy is tested on its own, with any clock:

* ``plan_ticks``: which of the ticks that came due since ``next_fire_at`` run
  (the missed-run policy, within the catch-up window) and the next one to wait for;
* ``overlap_decision``: what a tick does while a run of its schedule is going.

A tick at most ``grace`` late is on time and always runs; older ones were missed
(no replica was up, or the schedule's replicas were all busy) and follow the policy.
"""

from __future__ import annotations

from collections import deque
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
    """The ticks in ``[next_fire_at, now]`` to run, by the missed-run policy."""
    # Ticks older than both the window and the grace can never run: start there
    # instead of walking a long outage tick by tick.
    horizon = now - max(catchup_window, grace)
    start = max(next_fire_at, horizon) - timedelta(microseconds=1)
    late: deque[datetime] = deque(maxlen=MAX_CATCHUP_RUNS)
    on_time: list[datetime] = []
    late_count = 0
    for tick in cron.between(start, now):
        if now - tick <= grace:
            on_time.append(tick)
        else:
            late.append(tick)
            late_count += 1
    if missed_run_policy == MISSED_RUN_RUN_ALL:
        chosen = list(late)
    elif missed_run_policy == MISSED_RUN_RUN_ONCE:
        chosen = list(late)[-1:]
    else:
        chosen = []
    return TickPlan(
        fire=chosen + on_time,
        missed=late_count - len(chosen),
        next_fire_at=cron.next_after(now),
    )


def overlap_decision(policy: str, running: bool, queued: bool) -> str:
    """``FIRE``, ``QUEUE`` (run when the current run ends) or ``SKIP``."""
    if not running or policy == OVERLAP_ALLOW:
        return FIRE
    if policy == OVERLAP_QUEUE_ONE and not queued:
        return QUEUE
    return SKIP
