"""Claiming due ticks: how a replica turns the schedules' next fire times into runs.

Exactly once: a tick becomes a ``runs`` row, unique on ``(schedule_id,
scheduled_for)``, in the same transaction that moves the schedule's
``next_fire_at`` past it, with the schedule row locked ``FOR UPDATE SKIP LOCKED``
so replicas share due schedules instead of queueing on them. Only after that
commit is the target called. Due-ness is judged by the database's clock, so
replicas whose own clocks disagree by a second still agree on what is due.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import exists, func, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from framework.cron import CronSchedule, InvalidCronExpression
from services.scheduler.models import Run, Schedule
from services.scheduler.planning import (
    FIRE,
    QUEUE,
    TickPlan,
    overlap_decision,
    plan_ticks,
)
from services.scheduler.schemas import (
    OUTCOME_LOST,
    OUTCOME_RUNNING,
    OUTCOME_SKIPPED,
    OVERLAP_ALLOW,
    dump_schedule,
)

log = logging.getLogger(__name__)

# The loop looks again at least this often: a schedule created or resumed on
# another replica is picked up within it.
MAX_WAIT_SECONDS = 1.0
# Due schedules claimed per transaction; more are claimed by the next pass, at
# once. Small enough that a burst is shared: while one replica claims and starts
# its batch, the others lock the next ones (SKIP LOCKED) instead of idling.
CLAIM_BATCH = 50
# Ticks are claimed this far ahead, and their runs wait for the exact time: the
# claim's cost is paid before the tick, not added to its latency.
CLAIM_AHEAD_SECONDS = 0.5


@dataclass(frozen=True)
class SchedulerSettings:
    replica: str
    misfire_grace: timedelta
    lost_after: timedelta


@dataclass(frozen=True)
class Launch:
    """A claimed run to call: what ``RunLauncher`` needs to start its worker."""

    run_id: int
    schedule: dict[str, Any]  # its payload when claimed: target, timeout, policies
    scheduled_for: str  # ISO 8601, UTC
    # On this process's monotonic clock: when to call the target (the tick, it
    # was claimed ahead, plus jitter), and the last moment it may still be called
    # (after that the run may be marked lost: a process that was stopped that
    # long leaves the run to be marked lost rather than call the target late).
    call_at: float
    call_by: float
    # The database's clock as read by the claim, and this process's monotonic
    # clock at that moment: a time measured here (the call) is stated on the
    # database's clock, like every other time of the run, without asking it.
    clock_at: datetime
    clock_read_at: float
    claimed_at: str  # ISO 8601, UTC
    replica: str

    def database_time(self, monotonic: float) -> datetime:
        """``monotonic`` (this process's ``time.monotonic()``) on the database's clock."""
        return self.clock_at + timedelta(seconds=monotonic - self.clock_read_at)


@dataclass
class Claimed:
    launches: list[Launch] = field(default_factory=list)
    # Runs that ended without being called (skipped by overlap policy, lost),
    # with their schedule's payload.
    finished: list[tuple[dict[str, Any], Run]] = field(default_factory=list)
    wait: float = MAX_WAIT_SECONDS  # seconds until the next tick is due


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; we only ever store UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@lru_cache(maxsize=4096)
def cron_schedule(expression: str, timezone: str) -> CronSchedule:
    """Parsed once per expression and zone: a claim pass may meet hundreds."""
    return CronSchedule(expression, timezone)


class DueTickClaims:
    """The claim of due ticks over one worker's session (``ScheduleRepository``
    adds the schedules and runs API on top). Writes commit at once."""

    def __init__(self, session: Session, settings: SchedulerSettings) -> None:
        self.session = session
        self.settings = settings
        # The database's clock as ``now()`` last read it, and the local monotonic
        # clock at that moment.
        self._now_read = datetime.now(UTC)
        self._now_read_at = time.monotonic()

    def now(self) -> datetime:
        """The database's clock (PostgreSQL), shared by every replica."""
        if self.session.get_bind().dialect.name == "postgresql":
            now = self.session.scalar(select(func.statement_timestamp()))
        else:
            now = datetime.now(UTC)
        self._now_read_at = time.monotonic()
        self._now_read = utc(now)  # type: ignore[assignment]
        return now  # type: ignore[return-value]

    def _clock(self) -> Any:
        """Now, as a value in a statement: the database's clock on PostgreSQL."""
        if self.session.get_bind().dialect.name == "postgresql":
            return func.statement_timestamp()
        return datetime.now(UTC)

    # -- the claim ----------------------------------------------------------------------

    def claim_due(self) -> Claimed:
        """Claim every tick due within ``CLAIM_AHEAD_SECONDS``; one commit.

        A constant number of statements whatever the number of due schedules:
        one select of the due rows (locked, skipping rows another replica holds),
        one of which have a run going, one batched insert of the runs, batched
        updates of ``next_fire_at``. Lost runs are marked in the same pass.
        """
        claimed = Claimed()
        try:
            now = self.now()
            horizon = now + timedelta(seconds=CLAIM_AHEAD_SECONDS)
            self._mark_lost(now, claimed)
            self._initialise(now)
            due = self.session.scalars(
                select(Schedule)
                .where(Schedule.enabled, Schedule.next_fire_at <= horizon)
                .order_by(Schedule.next_fire_at)
                .limit(CLAIM_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            running = self._running_among([schedule.id for schedule in due])
            new_runs: list[tuple[Run, Schedule, float]] = []
            deferred: dict[int, datetime] = {}
            # Schedules sharing an expression, zone, policy and due tick (a burst,
            # a spread of hundreds) share one plan: computing it is most of the
            # pass's CPU.
            plans: dict[tuple[Any, ...], TickPlan] = {}
            for schedule in due:
                next_fire_at = utc(schedule.next_fire_at)
                if (
                    schedule.id in running
                    and schedule.overlap_policy != OVERLAP_ALLOW
                    and next_fire_at > now  # type: ignore[operator]
                ):
                    # Whether it overlaps depends on the run going now ending
                    # before the tick: decide at the tick, not ahead of it.
                    deferred[schedule.id] = next_fire_at  # type: ignore[assignment]
                    continue
                waiting = self._claim_schedule(
                    schedule,
                    now,
                    horizon,
                    schedule.id in running,
                    new_runs,
                    claimed,
                    plans,
                )
                if waiting is not None:
                    deferred[schedule.id] = waiting
            self._claim_queued(now, new_runs)
            self.session.flush()  # one batched INSERT ... RETURNING for the runs
            payloads: dict[int, dict[str, Any]] = {}
            for run, schedule, delay in new_runs:
                if schedule.id not in payloads:
                    payloads[schedule.id] = dump_schedule(schedule)
                claimed.launches.append(
                    self._launch(run, schedule, delay, payloads[schedule.id])
                )
            self.session.commit()
        except IntegrityError:
            # Another replica claimed one of these ticks first: only possible if
            # a row lock was bypassed, and the unique index is why it is harmless.
            self.session.rollback()
            log.warning("tick claim clashed with another replica's; retrying")
            return Claimed(wait=0)
        except BaseException:
            self.session.rollback()
            raise
        if len(due) == CLAIM_BATCH:
            claimed.wait = 0
        else:
            claimed.wait = self._wait(deferred)
        return claimed

    def _wait(self, deferred: dict[int, datetime]) -> float:
        """Seconds until the next claim is due (a deferred tick: at its time)."""
        postgresql = self.session.get_bind().dialect.name == "postgresql"
        later = Schedule.id.not_in(list(deferred)) if deferred else true()
        earliest, now = self.session.execute(
            select(
                func.min(Schedule.next_fire_at).filter(Schedule.enabled, later),
                func.statement_timestamp() if postgresql else func.current_timestamp(),
            )
        ).one()
        self.session.commit()
        if not postgresql:
            now = datetime.now(UTC)
        now = utc(now)
        candidates = [MAX_WAIT_SECONDS]
        if earliest is not None:
            candidates.append(
                (utc(earliest) - now).total_seconds() - CLAIM_AHEAD_SECONDS  # type: ignore[operator]
            )
        if deferred:
            candidates.append((min(deferred.values()) - now).total_seconds())  # type: ignore[operator]
        return max(min(candidates), 0.0)

    def _mark_lost(self, now: datetime, claimed: Claimed) -> None:
        lost = self.session.scalars(
            select(Run)
            .where(Run.outcome == OUTCOME_RUNNING, Run.deadline_at < now)
            .with_for_update(skip_locked=True)
        ).all()
        for run in lost:
            run.outcome = OUTCOME_LOST
            run.finished_at = now
            run.error = (
                f"replica {run.replica} recorded no outcome by the run's deadline "
                "(it stopped or lost its database); the run is not fired again"
            )
            claimed.finished.append((dump_schedule(self.get(run.schedule_id)), run))
            log.warning(
                "run marked lost",
                extra={"run_id": run.id, "schedule_id": run.schedule_id},
            )

    def _initialise(self, now: datetime) -> None:
        fresh = self.session.scalars(
            select(Schedule)
            .where(Schedule.enabled, Schedule.next_fire_at.is_(None))
            .with_for_update(skip_locked=True)
        ).all()
        for schedule in fresh:
            cron = self._cron(schedule)
            if cron is not None:
                schedule.next_fire_at = cron.next_after(now)

    def _cron(self, schedule: Schedule) -> CronSchedule | None:
        try:
            return cron_schedule(schedule.cron, schedule.timezone)
        except InvalidCronExpression as exc:
            # Only a hand-edited row gets here (the API validates): pause it
            # rather than fail every pass over the others.
            log.error(
                "schedule paused: its cron expression cannot be used",
                extra={"schedule_id": schedule.id, "reason": str(exc)},
            )
            schedule.enabled = False
            return None

    def _claim_schedule(
        self,
        schedule: Schedule,
        now: datetime,
        horizon: datetime,
        running: bool,
        new_runs: list[tuple[Run, Schedule, float]],
        claimed: Claimed,
        plans: dict[tuple[Any, ...], TickPlan],
    ) -> datetime | None:
        """Claim the schedule's due ticks; the tick left for later, if any."""
        cron = self._cron(schedule)
        if cron is None:
            return None
        # Ticks up to the horizon are claimed now and called on time; lateness
        # is judged against the horizon too (a grace of up to one claim-ahead).
        key = (
            schedule.cron,
            schedule.timezone,
            schedule.next_fire_at,
            schedule.missed_run_policy,
            schedule.catchup_window_seconds,
        )
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = plan_ticks(
                cron,
                utc(schedule.next_fire_at),  # type: ignore[arg-type]
                horizon,
                schedule.missed_run_policy,
                timedelta(seconds=schedule.catchup_window_seconds),
                self.settings.misfire_grace,
            )
        if plan.missed:
            log.warning(
                "ticks missed, not run by the schedule's missed-run policy",
                extra={
                    "schedule_id": schedule.id,
                    "missed": plan.missed,
                    "policy": schedule.missed_run_policy,
                },
            )
        if schedule.queued_for is not None and not running:
            # Its run ended without launching it (lost): the queued tick goes first.
            queued = utc(schedule.queued_for)
            schedule.queued_for = None
            new_runs.append((*self._new_run(schedule, queued, now), schedule))  # type: ignore[arg-type]
            running = True
        for tick in plan.fire:
            if tick > now and running and schedule.overlap_policy != OVERLAP_ALLOW:
                # A tick ahead, behind a run that may end before it: decided
                # at its time (see claim_due).
                schedule.next_fire_at = tick
                return tick
            decision = overlap_decision(
                schedule.overlap_policy, running, schedule.queued_for is not None
            )
            if decision == FIRE:
                run, delay = self._new_run(schedule, tick, now)
                new_runs.append((run, schedule, delay))
                running = True
            elif decision == QUEUE:
                schedule.queued_for = tick
            else:
                run = self._skipped_run(schedule, tick, now, schedule.overlap_policy)
                claimed.finished.append((dump_schedule(schedule), run))
        schedule.next_fire_at = plan.next_fire_at
        return None

    def _claim_queued(
        self, now: datetime, new_runs: list[tuple[Run, Schedule, float]]
    ) -> None:
        """Queued ticks whose blocking run ended as lost (nobody launched them)."""
        running = exists().where(
            Run.schedule_id == Schedule.id, Run.outcome == OUTCOME_RUNNING
        )
        waiting = self.session.scalars(
            select(Schedule)
            .where(Schedule.enabled, Schedule.queued_for.is_not(None), ~running)
            .with_for_update(skip_locked=True)
        ).all()
        for schedule in waiting:
            tick = utc(schedule.queued_for)
            schedule.queued_for = None
            run, delay = self._new_run(schedule, tick, now)  # type: ignore[arg-type]
            new_runs.append((run, schedule, delay))

    def _running_among(self, schedule_ids: list[int]) -> set[int]:
        if not schedule_ids:
            return set()
        return set(
            self.session.scalars(
                select(Run.schedule_id)
                .where(
                    Run.schedule_id.in_(schedule_ids), Run.outcome == OUTCOME_RUNNING
                )
                .distinct()
            )
        )

    def _new_run(
        self, schedule: Schedule, tick: datetime, now: datetime
    ) -> tuple[Run, float]:
        """A run for ``tick``, and how long to wait before calling its target."""
        jitter = (
            random.uniform(0, schedule.jitter_seconds) if schedule.jitter_seconds else 0
        )
        delay = max((tick - now).total_seconds(), 0.0) + jitter
        run = Run(
            schedule_id=schedule.id,
            scheduled_for=tick,
            claimed_at=now,
            deadline_at=now
            + timedelta(seconds=delay + schedule.timeout_seconds)
            + self.settings.lost_after,
            replica=self.settings.replica,
            outcome=OUTCOME_RUNNING,
        )
        self.session.add(run)
        return run, delay

    def _skipped_run(
        self, schedule: Schedule, tick: datetime, now: datetime, policy: str
    ) -> Run:
        """A run recording that ``tick`` was skipped by the overlap policy."""
        run = Run(
            schedule_id=schedule.id,
            scheduled_for=tick,
            claimed_at=now,
            finished_at=now,
            deadline_at=now,
            replica=self.settings.replica,
            outcome=OUTCOME_SKIPPED,
            error=f"not run: the previous run was still going (overlap policy {policy})",
        )
        self.session.add(run)
        return run

    def _launch(
        self,
        run: Run,
        schedule: Schedule,
        delay: float,
        payload: dict[str, Any] | None = None,
    ) -> Launch:
        # Counted from when the database's clock was read, so the time the claim
        # itself took is not added to the wait.
        call_at = self._now_read_at + delay
        return Launch(
            run_id=run.id,
            schedule=payload or dump_schedule(schedule),
            scheduled_for=utc(run.scheduled_for).astimezone(UTC).isoformat(),  # type: ignore[union-attr]
            call_at=call_at,
            # Half the margin: a call made by then and timing out still records
            # its outcome well before anyone may mark the run lost.
            call_by=call_at + self.settings.lost_after.total_seconds() / 2,
            clock_at=self._now_read,
            clock_read_at=self._now_read_at,
            claimed_at=utc(run.claimed_at).astimezone(UTC).isoformat(),  # type: ignore[union-attr]
            replica=self.settings.replica,
        )
