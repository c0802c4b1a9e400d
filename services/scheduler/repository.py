"""The schedules and runs tables, as one worker's ``ScheduleRepository``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from services.scheduler.claiming import DueTickClaims, Launch, cron_schedule, utc
from services.scheduler.exceptions import InvalidSchedule, ScheduleNotFound
from services.scheduler.models import Run, Schedule
from services.scheduler.planning import FIRE, QUEUE, overlap_decision
from services.scheduler.schemas import (
    MAX_BACKFILL_TICKS,
    OUTCOME_RUNNING,
    OVERLAP_QUEUE_ONE,
    ScheduleSpec,
    dump_schedule,
)
from services.scheduler.targets import Outcome


@dataclass
class Backfilled:
    """What a backfill claimed: runs to launch, ticks skipped, ticks already run."""

    already_run: int = 0
    runs: list[Run] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)


class ScheduleRepository(DueTickClaims):
    """One worker's view of the schedules and runs. Writes commit at once."""

    # -- schedules --------------------------------------------------------------------

    def get(self, schedule_id: int) -> Schedule:
        schedule = self.session.get(Schedule, schedule_id)
        if schedule is None:
            raise ScheduleNotFound(f"no schedule with id {schedule_id}")
        return schedule

    def page(self, page: int, per_page: int) -> tuple[list[Schedule], int]:
        total = self.session.scalar(select(func.count()).select_from(Schedule))
        rows = self.session.scalars(
            select(Schedule)
            .order_by(Schedule.id)
            .offset((page - 1) * per_page)
            .limit(per_page)
        )
        return list(rows), total or 0

    def add(self, spec: ScheduleSpec) -> Schedule:
        schedule = Schedule(**_columns(spec))
        now = self.now()
        schedule.created_at = schedule.updated_at = now
        schedule.next_fire_at = (
            spec.cron_schedule().next_after(now) if spec.enabled else None
        )
        self.session.add(schedule)
        self.session.commit()
        return schedule

    def update(self, schedule: Schedule, spec: ScheduleSpec) -> Schedule:
        timing = (schedule.cron, schedule.timezone, schedule.enabled)
        for name, value in _columns(spec).items():
            setattr(schedule, name, value)
        now = self.now()
        schedule.updated_at = now
        if (spec.cron, spec.timezone, spec.enabled) != timing:
            # A new timing starts from now: ticks of the old one are not owed.
            schedule.next_fire_at = (
                spec.cron_schedule().next_after(now) if spec.enabled else None
            )
            if not spec.enabled:
                schedule.queued_for = None
        self.session.commit()
        return schedule

    def delete(self, schedule: Schedule) -> None:
        self.session.execute(delete(Run).where(Run.schedule_id == schedule.id))
        self.session.delete(schedule)
        self.session.commit()

    # -- runs ---------------------------------------------------------------------------

    def runs(self, schedule_id: int, page: int, per_page: int) -> tuple[list[Run], int]:
        total = self.session.scalar(
            select(func.count()).select_from(Run).where(Run.schedule_id == schedule_id)
        )
        rows = self.session.scalars(
            select(Run)
            .where(Run.schedule_id == schedule_id)
            .order_by(Run.scheduled_for.desc(), Run.id.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        )
        return list(rows), total or 0

    def add_run_now(self, schedule: Schedule) -> tuple[Run, Launch]:
        """A run of ``schedule`` for now, whatever its timing and overlap policy."""
        now = self.now()
        run, delay = self._new_run(schedule, now, now)
        self.session.flush()
        launch = self._launch(run, schedule, delay)
        self.session.commit()
        return run, launch

    def backfill(
        self,
        schedule: Schedule,
        start: datetime,
        end: datetime,
        overlap_policy: str,
    ) -> Backfilled:
        """Claim a run for each tick of ``schedule`` in ``[start, end]`` (past).

        The claim path of any tick: the schedule row locked, then one run per
        tick that has none yet (a tick already run, or being run, is left
        alone), unique on ``(schedule_id, scheduled_for)``, committed before any
        target is called. Ticks oldest first follow ``overlap_policy`` as a
        catch-up does: ``allow`` runs all of them at once; ``skip`` runs the
        first (if no run is going) and records the others skipped;
        ``queue_one`` queues one more. Raises ``InvalidSchedule`` for a range
        that is not wholly past or holds more than ``MAX_BACKFILL_TICKS`` ticks.
        """
        now = self.now()
        if end > now:
            raise InvalidSchedule(
                "invalid backfill",
                {
                    "end": f"must be in the past (the scheduler's clock: {now.isoformat()})"
                },
            )
        cron = cron_schedule(schedule.cron, schedule.timezone)
        ticks: list[datetime] = []
        for tick in cron.iter_after(start - timedelta(microseconds=1)):
            if tick > end:
                break
            if len(ticks) == MAX_BACKFILL_TICKS:
                raise InvalidSchedule(
                    "invalid backfill",
                    {
                        "end": f"the range holds more than {MAX_BACKFILL_TICKS} ticks "
                        "of the schedule; backfill it in parts"
                    },
                )
            ticks.append(tick.astimezone(UTC))
        # Locked as a claim pass locks it: passes skip it meanwhile, and a
        # concurrent backfill waits, then sees the runs this one made.
        locked = self.session.get(
            Schedule, schedule.id, with_for_update=True, populate_existing=True
        )
        if locked is None:
            raise ScheduleNotFound(f"no schedule with id {schedule.id}")
        done = {
            utc(tick)
            for tick in self.session.scalars(
                select(Run.scheduled_for).where(
                    Run.schedule_id == locked.id,
                    Run.scheduled_for >= start,
                    Run.scheduled_for <= end,
                )
            )
        }
        result = Backfilled(already_run=len(done & set(ticks)))
        running = bool(self._running_among([locked.id]))
        fired: list[tuple[Run, float]] = []
        for tick in ticks:
            if tick in done:
                continue
            decision = overlap_decision(
                overlap_policy, running, locked.queued_for is not None
            )
            if decision == FIRE:
                fired.append(self._new_run(locked, tick, now))
                running = True
            elif decision == QUEUE:
                locked.queued_for = tick
            else:
                result.skipped.append(
                    self._skipped_run(locked, tick, now, overlap_policy)
                )
        # The schedule's own catch-up must not walk these ticks again.
        next_fire_at = utc(locked.next_fire_at)
        if locked.enabled and next_fire_at is not None and next_fire_at <= end:
            locked.next_fire_at = cron.next_after(end)
        self.session.flush()
        payload = dump_schedule(locked)
        for run, delay in fired:
            result.runs.append(run)
            result.launches.append(self._launch(run, locked, delay, payload))
        result.schedule = payload
        self.session.commit()
        return result

    def finish_run(
        self,
        run_id: int,
        outcome: Outcome,
        schedule: dict[str, Any],
        started_at: datetime | None = None,
    ) -> tuple[Run, Launch | None] | None:
        """Record how the run ended, and when its target was called (``started_at``,
        on the database's clock); ``None`` if another replica marked it lost.

        The start is written here, with the end, rather than when the call is
        made: a transaction per call at the tick was most of the CPU a run cost,
        and it delayed the calls of the other runs due in the same second. While
        the run goes, ``schedule_run_started`` carries the start.

        With a tick queued behind this run (``queue_one``), it is claimed in the
        same transaction and returned, to be launched at once.
        """
        run = self.session.scalars(
            update(Run)
            .where(Run.id == run_id, Run.outcome == OUTCOME_RUNNING)
            .values(
                outcome=outcome.outcome,
                started_at=started_at,
                finished_at=self._clock(),
                result_summary=outcome.result_summary,
                error=outcome.error,
            )
            .returning(Run),
            execution_options={"populate_existing": True},
        ).first()
        if run is None:
            self.session.commit()
            return None
        launch = None
        if schedule["overlap_policy"] == OVERLAP_QUEUE_ONE:
            launch = self._launch_queued(run.schedule_id)
        self._trim_history(run.schedule_id, schedule["history_limit"])
        self.session.commit()
        return run, launch

    def _launch_queued(self, schedule_id: int) -> Launch | None:
        schedule = self.session.get(
            Schedule, schedule_id, with_for_update=True, populate_existing=True
        )
        if (
            schedule is None
            or schedule.queued_for is None
            or self._running_among([schedule_id])
        ):
            return None
        now = self.now()
        run, delay = self._new_run(schedule, utc(schedule.queued_for), now)  # type: ignore[arg-type]
        schedule.queued_for = None
        self.session.flush()
        return self._launch(run, schedule, delay)

    def _trim_history(self, schedule_id: int, history_limit: int) -> None:
        # Everything at or below the (limit + 1)th newest run goes, in one
        # statement walking the (schedule_id, id) index. Trimmed rows were claims
        # too; their ticks are behind next_fire_at, which only moves forward, so
        # none can be claimed again.
        oldest_kept = (
            select(Run.id)
            .where(Run.schedule_id == schedule_id)
            .order_by(Run.id.desc())
            .offset(history_limit)
            .limit(1)
            .scalar_subquery()
        )
        self.session.execute(
            delete(Run)
            .where(
                Run.schedule_id == schedule_id,
                Run.outcome != OUTCOME_RUNNING,
                Run.id <= oldest_kept,
            )
            .execution_options(synchronize_session=False)
        )


def _columns(spec: ScheduleSpec) -> dict[str, Any]:
    values = spec.model_dump(mode="json")
    return values
