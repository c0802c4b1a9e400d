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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from framework import concurrency
from framework.cron import CronSchedule, InvalidCronExpression
from framework.database import EngineProvider, database_url, normalise_url
from framework.exceptions import RemoteError, RpcTimeout, UnknownService
from framework.extensions import DependencyProvider, Entrypoint
from services.scheduler.exceptions import ScheduleNotFound
from services.scheduler.models import Run, Schedule
from services.scheduler.planning import (
    FIRE,
    QUEUE,
    TickPlan,
    overlap_decision,
    plan_ticks,
)
from services.scheduler.schemas import (
    OUTCOME_FAILED,
    OUTCOME_LOST,
    OUTCOME_RUNNING,
    OUTCOME_SKIPPED,
    OUTCOME_SUCCEEDED,
    OVERLAP_ALLOW,
    OVERLAP_QUEUE_ONE,
    RUN_ID_CONTEXT_KEY,
    SCHEDULE_ID_CONTEXT_KEY,
    SCHEDULED_FOR_CONTEXT_KEY,
    TARGET_RPC,
    ScheduleSpec,
    dump_schedule,
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
# Due schedules claimed per transaction; more are claimed by the next pass, at
# once. Small enough that a burst is shared: while one replica claims and starts
# its batch, the others lock the next ones (SKIP LOCKED) instead of idling.
CLAIM_BATCH = 50
# Ticks are claimed this far ahead, and their runs wait for the exact time: the
# claim's cost is paid before the tick, not added to its latency.
CLAIM_AHEAD_SECONDS = 0.5
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
    schedule: dict[str, Any]  # its payload when claimed: target, timeout, policies
    scheduled_for: str  # ISO 8601, UTC
    # On this process's monotonic clock: when to call the target (the tick, it
    # was claimed ahead, plus jitter), and the last moment it may still be called
    # (after that the run may be marked lost: a process that was stopped that
    # long leaves the run to be marked lost rather than call the target late).
    call_at: float
    call_by: float


@dataclass
class Claimed:
    launches: list[Launch] = field(default_factory=list)
    # Runs that ended without being called (skipped by overlap policy, lost),
    # with their schedule's payload.
    finished: list[tuple[dict[str, Any], Run]] = field(default_factory=list)
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
        # The local monotonic clock when ``now()`` last read the database's.
        self._now_read_at = time.monotonic()

    def now(self) -> datetime:
        """The database's clock (PostgreSQL), shared by every replica."""
        if self.session.get_bind().dialect.name == "postgresql":
            now = self.session.scalar(select(func.statement_timestamp()))
        else:
            now = datetime.now(UTC)
        self._now_read_at = time.monotonic()
        return now  # type: ignore[return-value]

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

    def _clock(self) -> Any:
        """Now, as a value in a statement: the database's clock on PostgreSQL."""
        if self.session.get_bind().dialect.name == "postgresql":
            return func.statement_timestamp()
        return datetime.now(UTC)

    def start_run(self, run_id: int) -> Run | None:
        """Record that the target is being called; ``None`` if the run was lost."""
        run = self.session.scalars(
            update(Run)
            .where(
                Run.id == run_id,
                Run.outcome == OUTCOME_RUNNING,
                Run.started_at.is_(None),
            )
            .values(started_at=self._clock())
            .returning(Run),
            execution_options={"populate_existing": True},
        ).first()
        self.session.commit()
        return run

    def finish_run(
        self, run_id: int, outcome: Outcome, schedule: dict[str, Any]
    ) -> tuple[Run, Launch | None] | None:
        """Record how the run ended; ``None`` if another replica marked it lost.

        With a tick queued behind this run (``queue_one``), it is claimed in the
        same transaction and returned, to be launched at once.
        """
        run = self.session.scalars(
            update(Run)
            .where(Run.id == run_id, Run.outcome == OUTCOME_RUNNING)
            .values(
                outcome=outcome.outcome,
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
        )


@lru_cache(maxsize=4096)
def cron_schedule(expression: str, timezone: str) -> CronSchedule:
    """Parsed once per expression and zone: a claim pass may meet hundreds."""
    return CronSchedule(expression, timezone)


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
            (launch,),
            {},
            context_data={
                RUN_ID_CONTEXT_KEY: launch.run_id,
                SCHEDULE_ID_CONTEXT_KEY: launch.schedule["id"],
                SCHEDULED_FOR_CONTEXT_KEY: launch.scheduled_for,
            },
        )


ticker: Callable[..., Any] = Ticker.decorator
run_target: Callable[..., Any] = RunTarget.decorator


# -- calling a target ------------------------------------------------------------------


def call_target(
    cluster: Any,
    dispatch: Callable[..., None],
    target: dict[str, Any],
    timeout: float,
    on_sent: Callable[[], None],
) -> Outcome:
    """Call or dispatch ``target``; every failure becomes a failed ``Outcome``.

    ``on_sent`` runs once the request (or event) is on its way, before the reply
    is awaited: what it does (announcing the run) adds nothing to the latency.
    """
    if target["kind"] == TARGET_RPC:
        name = f"{target['service']}.{target['method']}"
        try:
            proxy = cluster[target["service"]].with_timeout(timeout)
            reply = getattr(proxy, target["method"]).call_async(
                **target.get("kwargs", {})
            )
            on_sent()
            result = reply.result()
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
                    f"{name} failed: {type(exc).__name__}: {exc}", ERROR_MAX_LENGTH
                ),
            )
        return Outcome(OUTCOME_SUCCEEDED, result_summary=_summary(result))
    try:
        dispatch(target["event_type"], target.get("payload", {}))
        on_sent()
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
