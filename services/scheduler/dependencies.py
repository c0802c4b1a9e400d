"""The scheduler's own extensions: its tables, its loop, and calling a target.

* ``ScheduleStore``: the framework's engine provider injecting a
  ``ScheduleRepository`` (the schedules API and the claim of due ticks);
* ``ticker``: an entrypoint calling its method over and over, waiting as long as
  the method says (until the next tick is due);
* ``run_target`` and ``RunLauncher``: a claimed run is called in a worker of its
  own, started from any other worker with ``self.launch(launch)``;
* ``call_target``: an RPC call (with the run's timeout) or an event dispatch,
  turned into an outcome with a reason, never an exception.

Exactly once: a tick becomes a ``runs`` row, unique on ``(schedule_id,
scheduled_for)``, in the same transaction that moves the schedule's
``next_fire_at`` past it, with the schedule row locked ``FOR UPDATE SKIP LOCKED``
so replicas share due schedules instead of queueing on them. Only after that
commit is the target called. Due-ness is judged by the database's clock, so
replicas whose own clocks disagree by a second still agree on what is due.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from framework import concurrency
from framework.cron import CronSchedule, InvalidCronExpression
from framework.database import EngineProvider, database_url, normalise_url
from framework.exceptions import RemoteError, RpcTimeout, UnknownService
from framework.extensions import DependencyProvider, Entrypoint
from services.scheduler.exceptions import ScheduleNotFound
from services.scheduler.models import Run, Schedule
from services.scheduler.planning import FIRE, QUEUE, overlap_decision, plan_ticks
from services.scheduler.schemas import (
    OUTCOME_FAILED,
    OUTCOME_LOST,
    OUTCOME_RUNNING,
    OUTCOME_SKIPPED,
    OUTCOME_SUCCEEDED,
    RUN_ID_CONTEXT_KEY,
    SCHEDULE_ID_CONTEXT_KEY,
    SCHEDULED_FOR_CONTEXT_KEY,
    TARGET_RPC,
    ScheduleSpec,
)

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

# -- config keys ---------------------------------------------------------------------
REPLICA_CONFIG_KEY = "SCHEDULER_REPLICA"
MISFIRE_GRACE_CONFIG_KEY = "SCHEDULER_MISFIRE_GRACE_SECONDS"
LOST_AFTER_CONFIG_KEY = "SCHEDULER_LOST_AFTER_SECONDS"

DEFAULT_MISFIRE_GRACE_SECONDS = 5.0
DEFAULT_LOST_AFTER_SECONDS = 10.0
# The loop looks again at least this often: a schedule created or resumed on
# another replica is picked up within it.
MAX_WAIT_SECONDS = 1.0
# After the claim failed (database down), before trying again.
ERROR_WAIT_SECONDS = 1.0
# Due schedules claimed per transaction; more wait for the next pass (at once).
CLAIM_BATCH = 500
# A replica stopped (SIGSTOP, a VM paused) inside a claim transaction holds its
# schedules' row locks; PostgreSQL ends such a session after this long, its claim
# rolls back, and the other replicas take over those schedules.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 2000
SUMMARY_MAX_LENGTH = 500
ERROR_MAX_LENGTH = 1000


@dataclass(frozen=True)
class SchedulerSettings:
    replica: str
    misfire_grace: timedelta
    lost_after: timedelta


@dataclass(frozen=True)
class Launch:
    """A claimed run to call: what ``RunLauncher`` needs to start its worker."""

    run_id: int
    schedule_id: int
    scheduled_for: str  # ISO 8601, UTC
    delay: float  # jitter, seconds


@dataclass
class Claimed:
    launches: list[Launch] = field(default_factory=list)
    # Runs that ended without being called (skipped by overlap policy, lost).
    finished: list[tuple[Schedule, Run]] = field(default_factory=list)
    wait: float = MAX_WAIT_SECONDS  # seconds until the next tick is due


@dataclass(frozen=True)
class Outcome:
    outcome: str  # OUTCOME_SUCCEEDED or OUTCOME_FAILED
    result_summary: str | None = None
    error: str | None = None


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; we only ever store UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


# -- the tables ------------------------------------------------------------------------


class ScheduleRepository:
    """One worker's view of the schedules and runs. Writes commit at once."""

    def __init__(self, session: Session, settings: SchedulerSettings) -> None:
        self.session = session
        self.settings = settings

    def now(self) -> datetime:
        """The database's clock (PostgreSQL), shared by every replica."""
        if self.session.get_bind().dialect.name == "postgresql":
            return self.session.scalar(select(func.statement_timestamp()))  # type: ignore[return-value]
        return datetime.now(UTC)

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
        run, launch = self._new_run(schedule, now, now)
        self.session.commit()
        return run, launch

    def start_run(self, run_id: int) -> tuple[Schedule, Run] | None:
        """Record that the target is being called; ``None`` if the run was lost."""
        now = self.now()
        started = self.session.execute(
            update(Run)
            .where(
                Run.id == run_id,
                Run.outcome == OUTCOME_RUNNING,
                Run.started_at.is_(None),
            )
            .values(started_at=now)
            .execution_options(synchronize_session=False)
        )
        if started.rowcount == 0:  # type: ignore[attr-defined]
            self.session.commit()
            return None
        run = self.session.get(Run, run_id, populate_existing=True)
        assert run is not None
        schedule = self.get(run.schedule_id)
        self.session.commit()
        return schedule, run

    def finish_run(
        self, run_id: int, outcome: Outcome
    ) -> tuple[Schedule, Run, Launch | None] | None:
        """Record how the run ended; ``None`` if another replica marked it lost.

        With a tick queued behind this run (``queue_one``), it is claimed in the
        same transaction and returned, to be launched at once.
        """
        now = self.now()
        finished = self.session.execute(
            update(Run)
            .where(Run.id == run_id, Run.outcome == OUTCOME_RUNNING)
            .values(
                outcome=outcome.outcome,
                finished_at=now,
                result_summary=outcome.result_summary,
                error=outcome.error,
            )
            .execution_options(synchronize_session=False)
        )
        if finished.rowcount == 0:  # type: ignore[attr-defined]
            self.session.commit()
            return None
        run = self.session.get(Run, run_id, populate_existing=True)
        assert run is not None
        schedule = self.session.get(
            Schedule, run.schedule_id, with_for_update=True, populate_existing=True
        )
        assert schedule is not None
        launch = None
        if schedule.queued_for is not None and not self._has_running(schedule.id):
            launch = self._new_run(schedule, utc(schedule.queued_for), now)[1]  # type: ignore[arg-type]
            schedule.queued_for = None
        self._trim_history(schedule)
        self.session.commit()
        return schedule, run, launch

    def _trim_history(self, schedule: Schedule) -> None:
        kept = (
            select(Run.id)
            .where(Run.schedule_id == schedule.id)
            .order_by(Run.id.desc())
            .limit(schedule.history_limit)
        )
        # Trimmed rows were claims too; their ticks are behind next_fire_at,
        # which only moves forward, so none can be claimed again.
        self.session.execute(
            delete(Run)
            .where(
                Run.schedule_id == schedule.id,
                Run.outcome != OUTCOME_RUNNING,
                Run.id.not_in(kept.scalar_subquery()),
            )
            .execution_options(synchronize_session=False)
        )

    # -- the claim ----------------------------------------------------------------------

    def claim_due(self) -> Claimed:
        """Claim every due tick (or mark it skipped), mark lost runs; one commit."""
        claimed = Claimed()
        try:
            now = self.now()
            self._mark_lost(now, claimed)
            self._initialise(now)
            due = self.session.scalars(
                select(Schedule)
                .where(Schedule.enabled, Schedule.next_fire_at <= now)
                .order_by(Schedule.next_fire_at)
                .limit(CLAIM_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            for schedule in due:
                self._claim_schedule(schedule, now, claimed)
            self._claim_queued(now, claimed)
            self.session.flush()
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
        claimed.wait = 0 if len(due) == CLAIM_BATCH else self._wait()
        return claimed

    def _wait(self) -> float:
        earliest = self.session.scalar(
            select(func.min(Schedule.next_fire_at)).where(Schedule.enabled)
        )
        now = self.now()
        self.session.commit()
        if earliest is None:
            return MAX_WAIT_SECONDS
        seconds = (utc(earliest) - now).total_seconds()  # type: ignore[operator]
        return min(max(seconds, 0.0), MAX_WAIT_SECONDS)

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
            claimed.finished.append((self.get(run.schedule_id), run))
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
            return CronSchedule(schedule.cron, schedule.timezone)
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
        self, schedule: Schedule, now: datetime, claimed: Claimed
    ) -> None:
        cron = self._cron(schedule)
        if cron is None:
            return
        plan = plan_ticks(
            cron,
            utc(schedule.next_fire_at),  # type: ignore[arg-type]
            now,
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
        running = self._has_running(schedule.id)
        if schedule.queued_for is not None and not running:
            # Its run ended without launching it (lost): the queued tick goes first.
            queued = utc(schedule.queued_for)
            schedule.queued_for = None
            claimed.launches.append(self._new_run(schedule, queued, now)[1])  # type: ignore[arg-type]
            running = True
        for tick in plan.fire:
            decision = overlap_decision(
                schedule.overlap_policy, running, schedule.queued_for is not None
            )
            if decision == FIRE:
                claimed.launches.append(self._new_run(schedule, tick, now)[1])
                running = True
            elif decision == QUEUE:
                schedule.queued_for = tick
            else:
                run = Run(
                    schedule_id=schedule.id,
                    scheduled_for=tick,
                    claimed_at=now,
                    finished_at=now,
                    deadline_at=now,
                    replica=self.settings.replica,
                    outcome=OUTCOME_SKIPPED,
                    error="not run: the previous run was still going "
                    f"(overlap policy {schedule.overlap_policy})",
                )
                self.session.add(run)
                claimed.finished.append((schedule, run))
        schedule.next_fire_at = plan.next_fire_at

    def _claim_queued(self, now: datetime, claimed: Claimed) -> None:
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
            claimed.launches.append(self._new_run(schedule, tick, now)[1])  # type: ignore[arg-type]

    def _has_running(self, schedule_id: int) -> bool:
        return bool(
            self.session.scalar(
                select(
                    exists().where(
                        Run.schedule_id == schedule_id, Run.outcome == OUTCOME_RUNNING
                    )
                )
            )
        )

    def _new_run(
        self, schedule: Schedule, tick: datetime, now: datetime
    ) -> tuple[Run, Launch]:
        delay = (
            random.uniform(0, schedule.jitter_seconds)
            if schedule.jitter_seconds
            else 0.0
        )
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
        self.session.flush()  # the id, and the unique claim checked now
        launch = Launch(
            run_id=run.id,
            schedule_id=schedule.id,
            scheduled_for=tick.astimezone(UTC).isoformat(),
            delay=delay,
        )
        return run, launch


def _columns(spec: ScheduleSpec) -> dict[str, Any]:
    values = spec.model_dump(mode="json")
    return values


class ScheduleStore(EngineProvider[ScheduleRepository]):
    """The engine provider injecting a ``ScheduleRepository``, with the replica's settings."""

    settings: SchedulerSettings

    def setup(self) -> None:
        config = self.container.config
        url = normalise_url(
            database_url(
                config, self.container.service_name, self.declarative_base_name
            )
        )
        if url.get_backend_name() == "postgresql":
            connect_args = dict(self.engine_options.get("connect_args") or {})
            connect_args.setdefault(
                "options",
                f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
            )
            self.engine_options = {**self.engine_options, "connect_args": connect_args}
        self.settings = SchedulerSettings(
            replica=config.get(REPLICA_CONFIG_KEY)
            or f"{socket.gethostname()}:{os.getpid()}",
            misfire_grace=timedelta(
                seconds=float(
                    config.get(MISFIRE_GRACE_CONFIG_KEY, DEFAULT_MISFIRE_GRACE_SECONDS)
                )
            ),
            lost_after=timedelta(
                seconds=float(
                    config.get(LOST_AFTER_CONFIG_KEY, DEFAULT_LOST_AFTER_SECONDS)
                )
            ),
        )
        super().setup()

    def get_dependency(self, worker_ctx: WorkerContext) -> ScheduleRepository:
        return ScheduleRepository(
            self.worker_database(worker_ctx).session, self.settings
        )


# -- the loop ----------------------------------------------------------------------------


class Ticker(Entrypoint):
    """Calls the method in a worker, waits the seconds it returns, and again.

    One call at a time per replica. A call that raises (database down) is logged
    and retried after ``ERROR_WAIT_SECONDS``. Stopping ends the loop; a call in
    progress is an in-flight worker, drained by the container.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._stopping = concurrency.Event()
        self._thread: Any = None
        super().__init__(**kwargs)

    def start(self) -> None:
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier=f"ticker[{self.method_name}]"
        )

    def stop(self) -> None:
        if not self._stopping.ready():
            self._stopping.send(True)

    def kill(self) -> None:
        if self._thread is not None:
            concurrency.kill(self._thread)

    def _run(self) -> None:
        while not self._stopping.ready():
            done = concurrency.Event()
            self.container.spawn_worker(
                self, (), {}, handle_result=partial(self._finished, done)
            )
            wait = done.wait()
            with concurrency.Timeout(wait, False):
                self._stopping.wait()

    @staticmethod
    def _finished(
        done: Any, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        if exc_info is not None or not isinstance(result, int | float):
            done.send(ERROR_WAIT_SECONDS)
        else:
            done.send(min(max(float(result), 0.0), MAX_WAIT_SECONDS))
        return result, exc_info


class RunTarget(Entrypoint):
    """Marks the method that calls one claimed run's target (``RunLauncher`` starts it)."""


class RunLauncher(DependencyProvider[Callable[[Launch], None]]):
    """Injects ``launch(launch)``: call a claimed run's target in a worker of its own.

    The run's tick, id and schedule travel in the worker's context data, hence in
    the headers of the RPC request or event, for the target to read.
    """

    def setup(self) -> None:
        found = [e for e in self.container.entrypoints if isinstance(e, RunTarget)]
        if len(found) != 1:
            raise RuntimeError("RunLauncher needs exactly one @run_target method")
        self.entrypoint = found[0]

    def get_dependency(self, worker_ctx: WorkerContext) -> Callable[[Launch], None]:
        return self.launch

    def launch(self, launch: Launch) -> None:
        self.container.spawn_worker(
            self.entrypoint,
            (launch.run_id, launch.delay),
            {},
            context_data={
                RUN_ID_CONTEXT_KEY: launch.run_id,
                SCHEDULE_ID_CONTEXT_KEY: launch.schedule_id,
                SCHEDULED_FOR_CONTEXT_KEY: launch.scheduled_for,
            },
        )


ticker: Callable[..., Any] = Ticker.decorator
run_target: Callable[..., Any] = RunTarget.decorator


# -- calling a target ------------------------------------------------------------------


def call_target(
    cluster: Any, dispatch: Callable[..., None], target: dict[str, Any], timeout: float
) -> Outcome:
    """Call or dispatch ``target``; every failure becomes a failed ``Outcome``."""
    if target["kind"] == TARGET_RPC:
        name = f"{target['service']}.{target['method']}"
        try:
            proxy = cluster[target["service"]].with_timeout(timeout)
            result = getattr(proxy, target["method"])(**target.get("kwargs", {}))
        except RpcTimeout:
            return Outcome(
                OUTCOME_FAILED, error=f"{name} did not answer within {timeout}s"
            )
        except UnknownService:
            return Outcome(
                OUTCOME_FAILED,
                error=f"service {target['service']} is not running (nothing consumes its queue)",
            )
        except RemoteError as exc:
            return Outcome(
                OUTCOME_FAILED,
                error=_clip(
                    f"{name} raised {exc.exc_type}: {exc.value}", ERROR_MAX_LENGTH
                ),
            )
        except Exception as exc:
            # Registered exception types come back as themselves (MethodNotFound...).
            log.warning(
                "target call failed",
                extra={"target": name, "error": type(exc).__name__},
            )
            return Outcome(
                OUTCOME_FAILED,
                error=_clip(
                    f"{name} raised {type(exc).__name__}: {exc}", ERROR_MAX_LENGTH
                ),
            )
        return Outcome(OUTCOME_SUCCEEDED, result_summary=_summary(result))
    try:
        dispatch(target["event_type"], target.get("payload", {}))
    except Exception as exc:
        log.warning(
            "event dispatch failed",
            extra={"event_type": target["event_type"], "error": type(exc).__name__},
        )
        return Outcome(
            OUTCOME_FAILED,
            error=f"dispatching {target['event_type']} failed: {type(exc).__name__}",
        )
    return Outcome(
        OUTCOME_SUCCEEDED, result_summary=f"dispatched {target['event_type']}"
    )


def _summary(result: Any) -> str:
    try:
        text = json.dumps(result, default=str, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(result)
    return _clip(text, SUMMARY_MAX_LENGTH)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
