"""``@cron(expr, tz=..., cluster_once=False, overlap=...)``: run a method on a calendar.

The expression is parsed by croniter: five fields (minute hour day month weekday),
six with a leading seconds field (``"*/10 * * * * *"``: every ten seconds), or an
alias (``@hourly``, ``@daily``, ``@midnight``, ``@weekly``, ``@monthly``,
``@yearly``, ``@annually``). Times are computed in ``tz`` (an IANA name), so a
``"30 2 * * *"`` job in ``Europe/Paris`` runs at half past two Paris time all year.

Daylight saving time, as Vixie cron does it:

* on the day clocks skip 02:00-03:00, a 02:30 job fires once, at 03:00 (the first
  instant after the gap);
* on the day clocks repeat 02:00-03:00, a job whose hour is fixed fires once, at the
  first 02:30; a job that fires every hour or more often (hour field ``*``) follows
  elapsed time and fires in both passes, as its period promises.

``CronSchedule`` is the expression alone (used by the scheduler service too);
``Cron`` is the entrypoint.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy
import sqlalchemy.exc
from croniter import croniter
from croniter.croniter import CroniterError
from sqlalchemy.engine import Engine

from framework import concurrency
from framework.contextdata import ContextDataProvider
from framework.database import create_engine, database_url, engine_options
from framework.exceptions import ConfigurationError, ContainerBeingKilled
from framework.extensions import Entrypoint, SharedExtension
from framework.utils import sanitize_url

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = [
    "Clock",
    "Cron",
    "CronLock",
    "ManualClock",
    "ScheduledFor",
    "SCHEDULED_FOR_CONTEXT_KEY",
    "SystemClock",
    "cron",
    "CronSchedule",
    "InvalidCronExpression",
    "OVERLAP_ALLOW",
    "OVERLAP_POLICIES",
    "OVERLAP_QUEUE_ONE",
    "OVERLAP_SKIP",
]

# What a tick does when the previous run of the same entrypoint is still going.
OVERLAP_SKIP = "skip"  # drop this tick (logged)
OVERLAP_ALLOW = "allow"  # run it alongside
OVERLAP_QUEUE_ONE = "queue_one"  # run it when the current one ends; later ones drop
OVERLAP_POLICIES = (OVERLAP_SKIP, OVERLAP_ALLOW, OVERLAP_QUEUE_ONE)

# The worker's context data carries the tick it runs (ISO 8601, UTC), which is also
# the key of its cluster claim; ``ScheduledFor()`` injects it.
SCHEDULED_FOR_CONTEXT_KEY = "cron_scheduled_for"

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class InvalidCronExpression(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


class CronSchedule:
    """A cron expression in a time zone: its fire times, DST handled.

    ``CronSchedule("30 2 * * *", "Europe/Paris").next_after(moment)`` is the first
    fire time strictly after ``moment`` (an aware datetime), in the schedule's zone.
    Raises ``InvalidCronExpression`` at construction for a bad expression or zone.
    """

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidCronExpression("a cron expression must be a non-empty string")
        self.expression = " ".join(expression.split())
        self.tz_name = tz
        self.tz = _zone(tz)
        fields = ALIASES.get(self.expression.lower(), self.expression).split()
        if len(fields) not in (5, 6):
            raise InvalidCronExpression(
                f"{expression!r} has {len(fields)} fields; a cron expression has 5 "
                "(minute hour day month weekday), 6 with a leading seconds field, "
                f"or is one of {', '.join(ALIASES)}"
            )
        self.has_seconds = len(fields) == 6
        self._fields = " ".join(fields)
        try:
            croniter(
                self._fields,
                datetime(2000, 1, 1, tzinfo=self.tz),
                second_at_beginning=self.has_seconds,
            )
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidCronExpression(
                f"{expression!r} is not a valid cron expression: {exc}"
            ) from None
        hour_field = fields[2] if self.has_seconds else fields[1]
        # With a fixed hour, the second pass of a repeated hour is the same wall
        # clock time again: Vixie cron (and people) expect it once.
        self._wall_clock = hour_field != "*"

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, {self.tz_name!r})"

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment`` (aware), in ``self.tz``."""
        return next(self.iter_after(moment))

    def iter_after(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``moment``, in order, forever."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        # croniter counts from the start of the current second (or minute), so
        # start from a whole one and drop anything not strictly later.
        # Aware datetimes sharing a tzinfo compare by wall time, ignoring ``fold``:
        # in a repeated hour that is wrong, so compare in UTC.
        floor = moment.astimezone(UTC)
        iterator = croniter(
            self._fields,
            moment.astimezone(self.tz),
            second_at_beginning=self.has_seconds,
        )
        while True:
            candidate = iterator.get_next(datetime)
            if candidate.astimezone(UTC) <= floor:
                continue
            if self._wall_clock and _second_pass(candidate):
                continue
            yield candidate

    def iter_before(self, moment: datetime) -> Iterator[datetime]:
        """Fire times at or before ``moment``, latest first, forever."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        ceiling = moment.astimezone(UTC)
        # croniter's get_prev is strictly before its start: start just after.
        iterator = croniter(
            self._fields,
            (moment + timedelta(microseconds=1)).astimezone(self.tz),
            second_at_beginning=self.has_seconds,
        )
        while True:
            candidate = iterator.get_prev(datetime)
            if candidate.astimezone(UTC) > ceiling:
                continue
            if self._wall_clock and _second_pass(candidate):
                continue
            yield candidate

    def next_times(self, moment: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``moment``."""
        times = self.iter_after(moment)
        return [next(times) for _ in range(count)]

    def between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Fire times in ``(start, end]``."""
        ceiling = end.astimezone(UTC)
        for moment in self.iter_after(start):
            if moment.astimezone(UTC) > ceiling:
                return
            yield moment


def _zone(name: Any) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise InvalidCronExpression("a time zone must be an IANA name such as UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidCronExpression(
            f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'"
        ) from None


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; the lock only stores UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _second_pass(moment: datetime) -> bool:
    """Whether ``moment`` is the later of two instants with the same wall time."""
    naive = moment.replace(tzinfo=None)
    tz = moment.tzinfo
    first = naive.replace(tzinfo=tz, fold=0).utcoffset()
    second = naive.replace(tzinfo=tz, fold=1).utcoffset()
    return first != second and moment.utcoffset() == second and first != second


# -- clocks: the seam tests turn by hand -------------------------------------------------


class Clock:
    """Wall-clock time for cron, and a way to wait for it.

    Cron follows the wall clock, not a monotonic one: a job at 02:30 must fire at
    02:30 even after NTP stepped the clock. Tests pass a ``ManualClock``.
    """

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        raise NotImplementedError

    def sleep_until(self, moment: datetime, stopping: Any) -> bool:
        """Wait until ``moment``; ``False`` if the ``stopping`` event fired first."""
        raise NotImplementedError


class SystemClock(Clock):
    # Waits in slices so that a step of the wall clock (NTP, a suspended VM) is
    # noticed within a second instead of after the whole computed delay.
    slice_seconds = 1.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep_until(self, moment: datetime, stopping: Any) -> bool:
        while True:
            remaining = (moment - self.now()).total_seconds()
            if remaining <= 0:
                return not stopping.ready()
            with concurrency.Timeout(min(remaining, self.slice_seconds), False):
                stopping.wait()
            if stopping.ready():
                return False


class ManualClock(Clock):
    """A clock that moves only when told: ``clock.advance(seconds=60)``.

    Sleepers wake when the time they wait for is reached, so a test drives a month
    of ticks in milliseconds.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._now = start.astimezone(UTC)
        self._moved = concurrency.Event()

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        self._now = moment.astimezone(UTC)
        moved, self._moved = self._moved, concurrency.Event()
        moved.send(None)
        # Let the woken sleepers run before the caller moves the clock again.
        concurrency.sleep(0)

    def advance(self, **delta: float) -> None:
        self.set(self._now + timedelta(**delta))

    def sleep_until(self, moment: datetime, stopping: Any) -> bool:
        while self._now < moment:
            if stopping.ready():
                return False
            moved = self._moved
            with concurrency.Timeout(0.05, False):
                moved.wait()
        return not stopping.ready()


SYSTEM_CLOCK = SystemClock()


# -- the cluster lock ----------------------------------------------------------------------

CLAIMS_TABLE = "framework_cron_claims"
# One row per cluster-once entrypoint whose overlap policy is not "allow": the
# run going in the cluster (its tick, replica and lease) and the tick queued
# behind it, so that the overlap decision is the cluster's, not one replica's.
RUNNING_TABLE = "framework_cron_running"
# Claims older than this are deleted; a tick is never claimed again that late.
CLAIM_RETENTION = timedelta(days=2)

# What a cluster-wide claim decided for a tick.
CLAIM_RUN = "run"  # this replica runs it
CLAIM_QUEUED = "queued"  # it runs when the run going ends (queue_one)
CLAIM_SKIPPED = "skipped"  # a run is going (skip; or queue_one with one waiting)
CLAIM_TAKEN = "taken"  # another replica claimed this tick


class CronLock(SharedExtension):
    """Claims ``(name, scheduled_for)`` in the service's database; one winner.

    The claim is a row in ``framework_cron_claims`` under a primary key on both
    columns: the first replica to insert it runs the tick, the others get a
    unique violation and skip it. Replica clocks that differ by a second do not
    matter, since the key is the tick's nominal time, not when it was noticed.
    The table is created at start if missing (it is the framework's, like
    ``alembic_version``). The database is the one the service's ``Database``
    provider uses (``DATABASE_URL``).
    """

    # A run going holds its entrypoint's row this long past its last renewal;
    # its replica renews it every third of that while the run goes. A replica
    # that died mid-run blocks the next ticks at most this long.
    lease = timedelta(seconds=30)

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._last_purge: datetime | None = None
        metadata = sqlalchemy.MetaData()
        self.running = sqlalchemy.Table(
            RUNNING_TABLE,
            metadata,
            sqlalchemy.Column("name", sqlalchemy.String(255), primary_key=True),
            # NULL when no run is going.
            sqlalchemy.Column("scheduled_for", sqlalchemy.DateTime(timezone=True)),
            sqlalchemy.Column("replica", sqlalchemy.String(255)),
            sqlalchemy.Column("lease_until", sqlalchemy.DateTime(timezone=True)),
            sqlalchemy.Column("queued_for", sqlalchemy.DateTime(timezone=True)),
        )
        self.claims = sqlalchemy.Table(
            CLAIMS_TABLE,
            metadata,
            sqlalchemy.Column("name", sqlalchemy.String(255), primary_key=True),
            sqlalchemy.Column(
                "scheduled_for", sqlalchemy.DateTime(timezone=True), primary_key=True
            ),
            sqlalchemy.Column("replica", sqlalchemy.String(255), nullable=False),
            sqlalchemy.Column(
                "claimed_at", sqlalchemy.DateTime(timezone=True), nullable=False
            ),
        )
        super().__init__()

    def require(self) -> None:
        """Connect and create the claims table; called by each cluster-once cron."""
        if self.engine is not None:
            return
        config = self.container.config
        url = database_url(config, self.container.service_name)
        self.engine = create_engine(url, engine_options(config))
        try:
            self.claims.metadata.create_all(self.engine, checkfirst=True)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise ConfigurationError(
                f"@cron(cluster_once=True) needs the service's database "
                f"({sanitize_url(url)}): {type(exc).__name__}"
            ) from None

    def claim(self, name: str, scheduled_for: datetime) -> bool:
        """Whether this replica won the tick. Raises if the database is unreachable."""
        assert self.engine is not None
        now = datetime.now(UTC)
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    self.claims.insert().values(
                        name=name,
                        scheduled_for=scheduled_for.astimezone(UTC),
                        replica=self.replica,
                        claimed_at=now,
                    )
                )
        except sqlalchemy.exc.IntegrityError:
            return False
        # Relative to the tick, not to this machine's clock (which may be off, or a
        # test's): only claims far older than any tick still being fired go.
        if self._last_purge is None or now - self._last_purge > timedelta(hours=1):
            self._last_purge = now
            with self.engine.begin() as connection:
                connection.execute(
                    self.claims.delete().where(
                        self.claims.c.scheduled_for < scheduled_for - CLAIM_RETENTION
                    )
                )
        return True

    def register(self, name: str) -> None:
        """Create ``name``'s row of the running table (once, by any replica)."""
        assert self.engine is not None
        try:
            with self.engine.begin() as connection:
                exists = connection.execute(
                    sqlalchemy.select(self.running.c.name).where(
                        self.running.c.name == name
                    )
                ).first()
                if exists is None:
                    connection.execute(self.running.insert().values(name=name))
        except sqlalchemy.exc.IntegrityError:
            pass  # another replica registered it first

    def claim_exclusive(self, name: str, scheduled_for: datetime, overlap: str) -> str:
        """Claim the tick and decide, for the whole cluster, whether it runs now.

        One transaction: the claim row (a unique violation means another replica
        has the tick), then ``name``'s running row, locked: a run going whose
        lease has not expired makes the tick queue or skip by ``overlap``;
        otherwise this replica takes the row for the tick. Returns one of
        ``CLAIM_RUN``, ``CLAIM_QUEUED``, ``CLAIM_SKIPPED``, ``CLAIM_TAKEN``.
        """
        assert self.engine is not None
        now = datetime.now(UTC)
        tick = scheduled_for.astimezone(UTC)
        running = self.running
        try:
            with self.engine.begin() as connection:
                # The claim first: on SQLite this write is what serialises replicas.
                connection.execute(
                    self.claims.insert().values(
                        name=name,
                        scheduled_for=tick,
                        replica=self.replica,
                        claimed_at=now,
                    )
                )
                row = connection.execute(
                    sqlalchemy.select(running)
                    .where(running.c.name == name)
                    .with_for_update()
                ).first()
                lease_until = None if row is None else _aware(row.lease_until)
                busy = (
                    row is not None
                    and row.scheduled_for is not None
                    and lease_until is not None
                    and lease_until > now
                )
                if row is None or not busy:
                    values = {
                        "scheduled_for": tick,
                        "replica": self.replica,
                        "lease_until": now + self.lease,
                        "queued_for": None,
                    }
                    if row is None:
                        connection.execute(running.insert().values(name=name, **values))
                    else:
                        connection.execute(
                            running.update()
                            .where(running.c.name == name)
                            .values(**values)
                        )
                    return CLAIM_RUN
                if overlap == OVERLAP_QUEUE_ONE and row.queued_for is None:
                    connection.execute(
                        running.update()
                        .where(running.c.name == name)
                        .values(queued_for=tick)
                    )
                    return CLAIM_QUEUED
                return CLAIM_SKIPPED
        except sqlalchemy.exc.IntegrityError:
            return CLAIM_TAKEN

    def renew(self, name: str, scheduled_for: datetime) -> None:
        """Extend the lease of this replica's run of ``scheduled_for``."""
        assert self.engine is not None
        running = self.running
        with self.engine.begin() as connection:
            connection.execute(
                running.update()
                .where(
                    running.c.name == name,
                    running.c.scheduled_for == scheduled_for.astimezone(UTC),
                    running.c.replica == self.replica,
                )
                .values(lease_until=datetime.now(UTC) + self.lease)
            )

    def release(
        self, name: str, scheduled_for: datetime, take_queued: bool
    ) -> datetime | None:
        """The run of ``scheduled_for`` ended: free ``name``'s row, or hand it to
        the tick queued behind (returned, for this replica to run at once).

        Nothing changes if the row is no longer this run's (its lease expired and
        another replica's run took it).
        """
        assert self.engine is not None
        running = self.running
        tick = scheduled_for.astimezone(UTC)
        with self.engine.begin() as connection:
            row = connection.execute(
                sqlalchemy.select(running)
                .where(running.c.name == name)
                .with_for_update()
            ).first()
            if row is None or _aware(row.scheduled_for) != tick:
                return None
            queued = _aware(row.queued_for) if take_queued else None
            connection.execute(
                running.update()
                .where(running.c.name == name)
                .values(
                    scheduled_for=queued,
                    replica=self.replica if queued else None,
                    lease_until=datetime.now(UTC) + self.lease if queued else None,
                    queued_for=None,
                )
            )
            return queued

    def stop(self) -> None:
        self._dispose()

    def kill(self) -> None:
        self._dispose()

    def _dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


# -- the entrypoint ----------------------------------------------------------------------


class Cron(Entrypoint):
    """Runs the method at each fire time of a cron expression in a time zone.

    * Per instance by default, like ``@timer``; ``cluster_once=True`` claims each
      tick in the service's database first, so exactly one replica runs it.
    * ``overlap``: what a tick does while the previous run is still going:
      ``"skip"`` (default) drops it, ``"allow"`` runs it alongside,
      ``"queue_one"`` runs it as soon as the current one ends (one at most waits).
      With ``cluster_once`` the previous run is the cluster's, wherever it runs:
      the lock's running row holds it under a lease its replica renews, so a
      replica that died mid-run blocks the next ticks for ``CronLock.lease`` at
      most.
    * Ticks missed while the process could not run (suspended, hub blocked) are
      coalesced: the latest one fires, the others are logged as missed.
    * A bad expression, time zone or policy stops the service at start.
    * Stopping stops the schedule; a running tick is an in-flight worker, which the
      container drains within its deadline.
    """

    lock = CronLock()

    def __init__(
        self,
        expression: str,
        tz: str = "UTC",
        cluster_once: bool = False,
        overlap: str = OVERLAP_SKIP,
        clock: Clock | None = None,
        **kwargs: Any,
    ) -> None:
        self.expression = expression
        self.tz = tz
        self.cluster_once = cluster_once
        self.overlap = overlap
        self.clock = clock or SYSTEM_CLOCK
        self.schedule: CronSchedule | None = None
        self._stopping = concurrency.Event()
        self._thread: Any = None
        self._running = 0
        self._queued: datetime | None = None
        # Cluster-once with an overlap policy: the database decides overlaps for
        # the whole cluster; ``_leases`` are the ticks this replica runs for it.
        self._exclusive = cluster_once and overlap != OVERLAP_ALLOW
        self._leases: set[datetime] = set()
        super().__init__(**kwargs)

    @property
    def name(self) -> str:
        return f"{self.container.service_name}.{self.method_name}"

    def setup(self) -> None:
        where = f"@cron on {self.name}"
        try:
            self.schedule = CronSchedule(self.expression, self.tz)
        except InvalidCronExpression as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        if self.overlap not in OVERLAP_POLICIES:
            raise ConfigurationError(
                f"{where}: overlap must be one of {', '.join(OVERLAP_POLICIES)}, "
                f"not {self.overlap!r}"
            )
        if self.cluster_once:
            self.lock.require()
        if self._exclusive:
            self.lock.register(self.name)

    def start(self) -> None:
        # Counted from the start, not from when the thread first runs: a tick due
        # in between must not be lost.
        self._thread = self.container.spawn_managed_thread(
            partial(self._run, self.clock.now()), identifier=f"cron[{self.method_name}]"
        )
        if self._exclusive:
            # Managed: it outlives stop() until the running ticks are drained.
            self.container.spawn_managed_thread(
                self._keep_leases, identifier=f"cron-lease[{self.method_name}]"
            )

    def stop(self) -> None:
        if not self._stopping.ready():
            self._stopping.send(True)

    def kill(self) -> None:
        if self._thread is not None:
            concurrency.kill(self._thread)

    def _run(self, last: datetime) -> None:
        assert self.schedule is not None
        while True:
            due = self.schedule.next_after(last)
            if not self.clock.sleep_until(due, self._stopping):
                return
            # Woken late (process suspended, hub blocked): fire the latest tick
            # that has passed, not a burst of stale ones.
            missed = list(self.schedule.between(due, self.clock.now()))
            if missed:
                log.warning(
                    "cron ticks missed",
                    extra={
                        "entrypoint": self.name,
                        "missed": len(missed),
                        "from": due.isoformat(),
                    },
                )
                due = missed[-1]
            last = due
            self._tick(due)

    def _tick(self, due: datetime) -> None:
        if self._exclusive:
            self._fire_exclusive(due)
            return
        if self._running and self.overlap != OVERLAP_ALLOW:
            if self.overlap == OVERLAP_QUEUE_ONE and self._queued is None:
                self._queued = due
                return
            log.warning(
                "cron tick skipped: the previous run is still going",
                extra={"entrypoint": self.name, "scheduled_for": due.isoformat()},
            )
            return
        self._fire(due)

    def _fire(self, due: datetime) -> None:
        if self.cluster_once:
            try:
                won = self.lock.claim(self.name, due)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # Without the lock, running could mean running on every replica;
                # a tick lost is the smaller harm, and it is logged.
                self._log_claim_failed(due, exc)
                return
            if not won:
                return
        self._running += 1
        try:
            self.container.spawn_worker(
                self,
                (),
                {},
                context_data={
                    SCHEDULED_FOR_CONTEXT_KEY: due.astimezone(UTC).isoformat()
                },
                handle_result=self._finished,
            )
        except ContainerBeingKilled:
            self._running -= 1

    def _log_claim_failed(self, due: datetime, exc: BaseException) -> None:
        log.error(
            "cron tick not run: its claim failed",
            extra={
                "entrypoint": self.name,
                "scheduled_for": due.isoformat(),
                "error": type(exc).__name__,
            },
        )

    def _fire_exclusive(self, due: datetime) -> None:
        """Cluster-once with an overlap policy: the claim decides for every replica."""
        try:
            decision = self.lock.claim_exclusive(self.name, due, self.overlap)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            self._log_claim_failed(due, exc)
            return
        if decision == CLAIM_SKIPPED:
            log.warning(
                "cron tick skipped: the previous run is still going in the cluster",
                extra={"entrypoint": self.name, "scheduled_for": due.isoformat()},
            )
        elif decision == CLAIM_RUN:
            self._spawn_leased(due)

    def _spawn_leased(self, due: datetime) -> None:
        self._leases.add(due)
        try:
            self.container.spawn_worker(
                self,
                (),
                {},
                context_data={
                    SCHEDULED_FOR_CONTEXT_KEY: due.astimezone(UTC).isoformat()
                },
                handle_result=partial(self._finished_leased, due),
            )
        except ContainerBeingKilled:
            # The lease is left to expire: no other replica runs the next tick
            # before then, as if this one had died mid-run.
            self._leases.discard(due)

    def _finished_leased(
        self, due: datetime, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        # In a thread of its own: a database round trip must not hold up this
        # worker's teardown; a graceful stop waits for it like for a worker.
        self.container.spawn_worker_related(self._release, due)
        return result, exc_info

    def _release(self, due: datetime) -> None:
        try:
            queued = self.lock.release(
                self.name, due, take_queued=not self._stopping.ready()
            )
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # The lease expires by itself; until then the next ticks skip.
            log.error(
                "cron run end not recorded",
                extra={"entrypoint": self.name, "error": type(exc).__name__},
            )
            queued = None
        finally:
            self._leases.discard(due)
        if queued is not None:
            self._spawn_leased(queued)

    def _keep_leases(self) -> None:
        interval = self.lock.lease.total_seconds() / 3
        while True:
            concurrency.sleep(interval)
            for due in list(self._leases):
                try:
                    self.lock.renew(self.name, due)
                except sqlalchemy.exc.SQLAlchemyError as exc:
                    log.warning(
                        "cron lease not renewed",
                        extra={"entrypoint": self.name, "error": type(exc).__name__},
                    )

    def _finished(
        self, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        self._running -= 1
        queued, self._queued = self._queued, None
        if queued is not None and not self._stopping.ready():
            # In a thread of its own: this is still the finishing worker, and a
            # claim or a full pool must not hold up its teardown.
            concurrency.spawn_n(self._fire, queued)
        return result, exc_info


class ScheduledFor(ContextDataProvider):
    """Injects the tick a cron worker runs for (ISO 8601, UTC), else ``None``."""

    context_key = SCHEDULED_FOR_CONTEXT_KEY


cron: Callable[..., Any] = Cron.decorator
