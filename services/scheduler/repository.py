"""The schedules and runs tables, as one worker's ``ScheduleRepository``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from services.scheduler.claiming import DueTickClaims, Launch, utc
from services.scheduler.exceptions import ScheduleNotFound
from services.scheduler.models import Run, Schedule
from services.scheduler.schemas import OUTCOME_RUNNING, OVERLAP_QUEUE_ONE, ScheduleSpec
from services.scheduler.targets import Outcome


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
