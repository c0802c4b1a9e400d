"""The scheduler service: cron schedules whose every tick runs once across replicas.

Any number of replicas run together on one database. Each claims due ticks in a
transaction (``ScheduleRepository.claim_due``) and only then calls their targets,
each run in a worker of its own; see ``dependencies.py`` for how the claim works
and ``planning.py`` for the missed-run and overlap policies.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from functools import partial
from typing import Any

from framework import concurrency
from framework.events import EventDispatcher
from framework.rpc import ClusterRpc, rpc
from framework.settings import DEVELOPMENT_DATABASE_SECRET, ProductionSecrets
from services.scheduler.claiming import Launch
from services.scheduler.dependencies import RunLauncher, ScheduleStore
from services.scheduler.entrypoints import run_target, ticker
from services.scheduler.exceptions import InvalidSchedule, ScheduleNotFound
from services.scheduler.models import Base, Run
from services.scheduler.schemas import (
    DEFAULT_PER_PAGE,
    FIRE_TIMES_SHOWN,
    LAST_RUNS_SHOWN,
    OUTCOME_RUNNING,
    SCHEDULE_RUN_FINISHED,
    SCHEDULE_RUN_STARTED,
    SCHEDULER_SERVICE,
    dump_page,
    dump_run,
    dump_schedule,
    parse_backfill,
    parse_changes,
    parse_page,
    parse_preview,
    parse_schedule,
    parse_schedule_id,
    spec_of,
)
from services.scheduler.targets import call_target

log = logging.getLogger(__name__)

NOT_FOUND_OR_INVALID = (ScheduleNotFound, InvalidSchedule)


class SchedulerService:
    name = SCHEDULER_SERVICE

    # ORM objects stay readable after their commit: a run is dumped into an
    # event after the transaction that recorded it.
    secrets = ProductionSecrets(DEVELOPMENT_DATABASE_SECRET)
    schedules = ScheduleStore(Base, session_options={"expire_on_commit": False})
    cluster = ClusterRpc()
    dispatch = EventDispatcher()
    launch = RunLauncher()

    # -- the API --------------------------------------------------------------------------

    @rpc(expected_exceptions=InvalidSchedule)
    def list_schedules(
        self, page: int = 1, per_page: int = DEFAULT_PER_PAGE
    ) -> dict[str, Any]:
        page, per_page = parse_page(page, per_page)
        rows, total = self.schedules.page(page, per_page)
        return dump_page([dump_schedule(row) for row in rows], total, page, per_page)

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def get_schedule(self, schedule_id: int) -> dict[str, Any]:
        schedule = self.schedules.get(parse_schedule_id(schedule_id))
        runs, _ = self.schedules.runs(schedule.id, 1, LAST_RUNS_SHOWN)
        fire_times = (
            spec_of(schedule)
            .cron_schedule()
            .next_times(self.schedules.now(), FIRE_TIMES_SHOWN)
        )
        return {
            **dump_schedule(schedule),
            "next_fire_times": [moment.isoformat() for moment in fire_times],
            "last_runs": [dump_run(run) for run in runs],
        }

    @rpc(expected_exceptions=InvalidSchedule)
    def create_schedule(self, schedule: dict[str, Any]) -> dict[str, Any]:
        created = self.schedules.add(parse_schedule(schedule))
        log.info("schedule created", extra={"schedule_id": created.id})
        return dump_schedule(created)

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def update_schedule(
        self, schedule_id: int, changes: dict[str, Any]
    ) -> dict[str, Any]:
        schedule = self.schedules.get(parse_schedule_id(schedule_id))
        spec = parse_changes(spec_of(schedule), changes)
        return dump_schedule(self.schedules.update(schedule, spec))

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def delete_schedule(self, schedule_id: int) -> None:
        self.schedules.delete(self.schedules.get(parse_schedule_id(schedule_id)))
        log.info("schedule deleted", extra={"schedule_id": schedule_id})

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def pause(self, schedule_id: int) -> dict[str, Any]:
        return self.update_schedule(schedule_id, {"enabled": False})

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def resume(self, schedule_id: int) -> dict[str, Any]:
        """Enable again; ticks that fell while paused are not owed."""
        return self.update_schedule(schedule_id, {"enabled": True})

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def run_now(self, schedule_id: int) -> dict[str, Any]:
        """Run the target once now, paused or not: someone asked for it explicitly."""
        schedule = self.schedules.get(parse_schedule_id(schedule_id))
        run, launch = self.schedules.add_run_now(schedule)
        self.launch(launch)
        return dump_run(run)

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def backfill(
        self,
        schedule_id: int,
        start: str,
        end: str,
        overlap_policy: str | None = None,
    ) -> dict[str, Any]:
        """Run the schedule's ticks in a past range now, each once across replicas.

        A tick that already has a run is not run again. ``overlap_policy``
        (default: the schedule's) applies to the backfilled ticks as to a
        catch-up: ``allow`` runs every one of them at once.
        """
        schedule = self.schedules.get(parse_schedule_id(schedule_id))
        first, last, policy = parse_backfill(start, end, overlap_policy)
        backfilled = self.schedules.backfill(
            schedule, first, last, policy or schedule.overlap_policy
        )
        self.launch.launch_all(backfilled.launches)
        for run in backfilled.skipped:
            self._announce(SCHEDULE_RUN_FINISHED, backfilled.schedule, run)
        log.info(
            "schedule backfilled",
            extra={
                "schedule_id": schedule.id,
                "runs": len(backfilled.runs),
                "skipped": len(backfilled.skipped),
                "already_run": backfilled.already_run,
            },
        )
        return {
            "runs": [dump_run(run) for run in backfilled.runs],
            "skipped": [dump_run(run) for run in backfilled.skipped],
            "already_run": backfilled.already_run,
        }

    @rpc(expected_exceptions=NOT_FOUND_OR_INVALID)
    def list_runs(
        self, schedule_id: int, page: int = 1, per_page: int = DEFAULT_PER_PAGE
    ) -> dict[str, Any]:
        schedule = self.schedules.get(parse_schedule_id(schedule_id))
        page, per_page = parse_page(page, per_page)
        runs, total = self.schedules.runs(schedule.id, page, per_page)
        return dump_page([dump_run(run) for run in runs], total, page, per_page)

    @rpc(expected_exceptions=InvalidSchedule)
    def preview(self, cron: str, timezone: str = "UTC") -> list[str]:
        """The next fire times of an expression, for a form to show as it is typed."""
        fire_times = parse_preview(cron, timezone).next_times(
            self.schedules.now(), FIRE_TIMES_SHOWN
        )
        return [moment.isoformat() for moment in fire_times]

    # -- the engine ---------------------------------------------------------------------

    @ticker
    def claim_due_ticks(self) -> float:
        """Claim what is due, start those runs; the seconds until the next is due."""
        claimed = self.schedules.claim_due()
        # Started before any event goes out: a broker hiccup must not leave
        # claimed runs uncalled (they would end as lost).
        for launch in claimed.launches:
            self.launch(launch)
        for schedule, run in claimed.finished:
            self._announce(SCHEDULE_RUN_FINISHED, schedule, run)
        return claimed.wait

    @run_target
    def run(self, launch: Launch) -> None:
        """Call one claimed run's target at its time and record how it ended."""
        concurrency.sleep(max(launch.call_at - time.monotonic(), 0))
        if time.monotonic() > launch.call_by:
            # This process was stopped (or starved) past the point where other
            # replicas may mark the run lost: calling now could contradict that.
            log.warning(
                "run abandoned: too late to call its target; it will be marked lost",
                extra={"run_id": launch.run_id},
            )
            return
        schedule = launch.schedule
        started: list[datetime] = []
        outcome = call_target(
            self.cluster,
            self.dispatch,
            schedule["target"],
            schedule["timeout_seconds"],
            on_sent=partial(self._started, launch, started),
        )
        finished = self.schedules.finish_run(
            launch.run_id, outcome, schedule, started[0] if started else None
        )
        if finished is None:
            log.warning(
                "run finished after another replica marked it lost",
                extra={"run_id": launch.run_id, "outcome": outcome.outcome},
            )
            return
        run, queued = finished
        if queued is not None:
            self.launch(queued)
        self._announce(SCHEDULE_RUN_FINISHED, schedule, run)

    def _started(self, launch: Launch, started: list[datetime]) -> None:
        # No database round trip here: the start is recorded with the outcome.
        started.append(launch.database_time(time.monotonic()))
        # Runs due at the same instant wake in one pass of the hub; yielding once
        # lets every one of them send its request before any spends CPU on an
        # event, so a tick's calls do not queue behind each other's announcements.
        concurrency.sleep(0)
        run = Run(
            id=launch.run_id,
            schedule_id=launch.schedule["id"],
            scheduled_for=datetime.fromisoformat(launch.scheduled_for),
            claimed_at=datetime.fromisoformat(launch.claimed_at),
            started_at=started[0],
            replica=launch.replica,
            outcome=OUTCOME_RUNNING,
        )
        self._announce(SCHEDULE_RUN_STARTED, launch.schedule, run)

    def _announce(self, event_type: str, schedule: dict[str, Any], run: Run) -> None:
        # The run is recorded whatever happens here; a lost event only delays
        # the admin panel until its next refresh.
        try:
            self.dispatch(event_type, {"schedule": schedule, "run": dump_run(run)})
        except Exception:
            log.warning(
                "run event not dispatched",
                extra={"event_type": event_type, "run_id": run.id},
                exc_info=True,
            )
