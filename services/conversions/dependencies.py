"""The conversions service's own extensions: its tables, its work queue, the runner.

* ``JobStore``: the framework's ``Database`` provider, injecting a ``JobRepository``
  (the queries the service needs, each committing at once);
* ``JOBS_QUEUE`` / ``job_consumer``: the durable work queue, consumed with at most
  ``MAX_CONCURRENT_CONVERSIONS`` messages unacknowledged per replica; a message is
  acknowledged when its job has finished, so a replica killed mid-job gives it back;
* ``ConversionRunner``: injects the replica's ``JobRunner`` (``runner.py``), which
  runs one job end to end: claim, convert in a child process, heartbeat and
  progress, cancel, result.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import kombu
from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.orm import Session

from framework import concurrency
from framework.database import Database
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider
from framework.messaging import Consumer
from services.conversions import engine
from services.conversions.exceptions import FileNotFound, JobNotFound
from services.conversions.models import ConversionJob, StoredFile, utcnow
from services.conversions.runner import JobRunner
from services.conversions.schemas import (
    COUNT_MAX_AGE,
    FINISHED_STATES,
    STATE_QUEUED,
    STATE_RUNNING,
    encode_cursor,
)

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

# -- config keys -----------------------------------------------------------------------
MAX_CONCURRENT_CONVERSIONS_CONFIG_KEY = "MAX_CONCURRENT_CONVERSIONS"
HEARTBEAT_INTERVAL_CONFIG_KEY = "CONVERSION_HEARTBEAT_INTERVAL"
STALE_AFTER_CONFIG_KEY = "CONVERSION_STALE_AFTER"
MAX_LINE_BYTES_CONFIG_KEY = "CONVERSION_MAX_LINE_BYTES"

DEFAULT_HEARTBEAT_INTERVAL = 0.5  # seconds; also the progress events' interval
# A running job whose heartbeat is older than this has lost its replica.
DEFAULT_STALE_AFTER = 30.0

# The work queue: durable, persistent messages, one per job run ({"job_id": ...}).
JOBS_EXCHANGE = kombu.Exchange("conversions.jobs", type="direct", durable=True)
JOBS_QUEUE = kombu.Queue(
    "conversions.jobs", exchange=JOBS_EXCHANGE, routing_key="jobs", durable=True
)


def max_concurrent_conversions(config: dict[str, Any]) -> int:
    value = config.get(MAX_CONCURRENT_CONVERSIONS_CONFIG_KEY) or os.cpu_count() or 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ConfigurationError(
            f"{MAX_CONCURRENT_CONVERSIONS_CONFIG_KEY} must be a whole number, 1 or more"
        )
    return count


# -- the tables ------------------------------------------------------------------------

# The list's order: newest first, ties broken by id, so that every job has one
# place in it and a cursor names that place.
NEWEST_FIRST = (ConversionJob.created_at.desc(), ConversionJob.id.desc())
# Counted totals kept per replica, at most this many filters (then forgotten).
COUNTS_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class JobListing:
    rows: list[Any]
    total: int
    next_cursor: str | None


class JobCounts:
    """The list's totals per filter, counted at most every ``max_age`` seconds.

    Counting every job of a filter on every page was most of a page's cost. A
    total counted by this replica is trusted for ``max_age`` seconds, except that
    a change made through this replica (a job added, deleted or changing state)
    forgets them all at once, so the next page after one's own change is exact,
    and one after another replica's change is exact within ``max_age``. A count
    that ran while a change committed is not kept (the generation moved), so it
    cannot outlive the change either.

    A count kept per (state, owner) in a table, updated with every job change,
    would be exact always, but every state change of every job would then
    update one row per owner and the global one: a hot row that serializes the
    replicas' writes, for a figure people read as "about this many".
    """

    def __init__(
        self,
        max_age: float = COUNT_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._generation = 0
        self._totals: dict[tuple[Any, ...], tuple[int, float]] = {}

    def get(self, key: tuple[Any, ...], count: Callable[[], int]) -> int:
        now = self._clock()
        kept = self._totals.get(key)
        if kept is not None and now - kept[1] < self.max_age:
            return kept[0]
        generation = self._generation
        total = count()
        if generation == self._generation:
            if len(self._totals) >= COUNTS_MAX_ENTRIES:
                self._totals.clear()
            self._totals[key] = (total, now)
        return total

    def changed(self) -> None:
        self._generation += 1
        self._totals.clear()


class JobRepository:
    """One worker's view of the files and jobs tables. Every write commits at once,
    so no transaction stays open across a long conversion."""

    def __init__(self, session: Session, counts: JobCounts | None = None) -> None:
        self.session = session
        self.counts = counts if counts is not None else JobCounts()

    # files
    def add_file(self, row: StoredFile) -> StoredFile:
        self.session.add(row)
        self.session.commit()
        return row

    def get_file(self, file_id: Any) -> StoredFile:
        row = (
            self.session.get(StoredFile, _uuid(file_id)) if _is_uuid(file_id) else None
        )
        if row is None:
            raise FileNotFound(f"no file with id {file_id}")
        return row

    # jobs
    def add_job(self, row: ConversionJob) -> ConversionJob:
        self.session.add(row)
        self.session.commit()
        self.counts.changed()
        return row

    def get_job(self, job_id: Any) -> ConversionJob:
        row = (
            self.session.get(ConversionJob, _uuid(job_id)) if _is_uuid(job_id) else None
        )
        if row is None:
            raise JobNotFound(f"no job with id {job_id}")
        return row

    def fresh(self, job_id: str) -> ConversionJob | None:
        """The row as the database has it now (another replica may have changed it)."""
        self.session.expire_all()
        return self.session.get(ConversionJob, job_id)

    def search(
        self,
        state: str | None,
        owner: int | None,
        page: int,
        per_page: int,
        after: tuple[datetime, str] | None = None,
    ) -> JobListing:
        """A page of the list, newest first (by ``created_at``, then ``id``).

        The page's keys come from the filter's index alone: right after the
        ``after`` key when given, else past ``page - 1`` pages, skipped inside the
        index (no table rows read), so a deep page costs about what the first
        does. Then only that page's rows are read. One more key than the page
        holds tells whether a next page exists.
        """
        filters = []
        if state is not None:
            filters.append(ConversionJob.state == state)
        if owner is not None:
            filters.append(ConversionJob.owner == owner)
        keys = select(ConversionJob.id).where(*filters)
        if after is not None:
            keys = keys.where(
                tuple_(ConversionJob.created_at, ConversionJob.id) < after
            )
        else:
            keys = keys.offset((page - 1) * per_page)
        keys_page = keys.order_by(*NEWEST_FIRST).limit(per_page + 1).subquery()
        # The table's rows as plain tuples, through the session's connection: no
        # ORM objects to build (nor the ORM's statement handling) for a page
        # that is only serialized.
        rows = (
            self.session.connection()
            .execute(
                select(ConversionJob.__table__)
                .join(keys_page, keys_page.c.id == ConversionJob.id)
                .order_by(*NEWEST_FIRST)
            )
            .all()
        )
        next_cursor = None
        if len(rows) > per_page:
            rows = rows[:per_page]
            next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
        total = self.counts.get(
            (state, owner),
            lambda: (
                self.session.scalar(
                    select(func.count()).select_from(ConversionJob).where(*filters)
                )
                or 0
            ),
        )
        return JobListing(list(rows), total, next_cursor)

    def transition(
        self, job_id: str, from_states: tuple[str, ...], **changes: Any
    ) -> bool:
        """Set ``changes`` if the job is in one of ``from_states``; whether it was.

        One conditional UPDATE: of two replicas (or a cancel and a finish) racing
        for the same job, exactly one wins.
        """
        conditions = [ConversionJob.id == job_id, ConversionJob.state.in_(from_states)]
        runner = changes.pop("_runner", None)
        if runner is not None:
            conditions.append(ConversionJob.runner == runner)
        result = self.session.execute(
            update(ConversionJob).where(*conditions).values(**changes)
        )
        self.session.commit()
        if "state" in changes:
            self.counts.changed()
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def claim(self, job_id: str, runner: str, stale_after: float) -> bool:
        """Take the job to run: queued, or running on a replica whose heartbeat
        has gone stale (it died mid-job)."""
        now = utcnow()
        result = self.session.execute(
            update(ConversionJob)
            .where(
                ConversionJob.id == job_id,
                (ConversionJob.state == STATE_QUEUED)
                | (
                    (ConversionJob.state == STATE_RUNNING)
                    & (
                        ConversionJob.heartbeat_at
                        < now - timedelta(seconds=stale_after)
                    )
                ),
            )
            .values(
                state=STATE_RUNNING,
                runner=runner,
                attempts=ConversionJob.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                progress_bytes=0,
                progress_rows=None,
                progress_percent=0.0,
                error=None,
            )
        )
        self.session.commit()
        self.counts.changed()
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def stalled(self, older_than: float) -> list[ConversionJob]:
        cutoff = utcnow() - timedelta(seconds=older_than)
        return list(
            self.session.scalars(
                select(ConversionJob).where(
                    ConversionJob.state == STATE_RUNNING,
                    ConversionJob.heartbeat_at < cutoff,
                )
            )
        )

    def expired(self, older_than: float) -> list[ConversionJob]:
        cutoff = utcnow() - timedelta(seconds=older_than)
        return list(
            self.session.scalars(
                select(ConversionJob).where(
                    ConversionJob.state.in_(FINISHED_STATES),
                    ConversionJob.finished_at < cutoff,
                )
            )
        )

    def delete_job(self, job_id: str) -> None:
        self.session.execute(delete(ConversionJob).where(ConversionJob.id == job_id))
        self.session.commit()
        self.counts.changed()


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _uuid(value: str) -> str:
    return str(uuid.UUID(value))


class JobStore(Database):
    """``Database`` (engine, sessions, teardown) injecting a ``JobRepository``;
    the list's counted totals are the replica's, shared by its workers."""

    def setup(self) -> None:
        super().setup()
        self.counts = JobCounts()

    def get_dependency(self, worker_ctx: WorkerContext) -> JobRepository:  # type: ignore[override]
        return JobRepository(super().get_dependency(worker_ctx).session, self.counts)


# -- the work queue ----------------------------------------------------------------------


class JobConsumer(Consumer):
    """``@consume`` on the jobs queue, taking ``MAX_CONCURRENT_CONVERSIONS`` at once.

    Errors other than a failed conversion (the database unreachable, say) send the
    message back, a bounded number of times, then to the dead-letter queue.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(JOBS_QUEUE, requeue_on_error=True, **kwargs)

    @property
    def prefetch_count(self) -> int:
        # The broker hands this replica no more jobs than it runs at once; the
        # rest wait in the queue for whichever replica frees up first.
        return max_concurrent_conversions(self.container.config)


job_consumer: Callable[..., Any] = JobConsumer.decorator


class ConversionRunner(DependencyProvider):
    """Injects the replica's ``JobRunner``; preloads the engine for child processes."""

    runner: JobRunner

    def setup(self) -> None:
        config = self.container.config
        limit = max_concurrent_conversions(config)
        try:
            heartbeat = float(
                config.get(HEARTBEAT_INTERVAL_CONFIG_KEY) or DEFAULT_HEARTBEAT_INTERVAL
            )
            stale_after = float(
                config.get(STALE_AFTER_CONFIG_KEY) or DEFAULT_STALE_AFTER
            )
            max_line = int(
                config.get(MAX_LINE_BYTES_CONFIG_KEY) or engine.MAX_RECORD_BYTES
            )
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{HEARTBEAT_INTERVAL_CONFIG_KEY} and {STALE_AFTER_CONFIG_KEY} "
                "are numbers of seconds"
            ) from None
        if stale_after <= heartbeat * 2:
            raise ConfigurationError(
                f"{STALE_AFTER_CONFIG_KEY} must be more than twice "
                f"{HEARTBEAT_INTERVAL_CONFIG_KEY}"
            )
        if self.container.max_workers <= limit:
            log.warning(
                "max_workers leaves no worker for RPC calls while every conversion "
                "slot is busy",
                extra={"max_workers": self.container.max_workers, "conversions": limit},
            )
        # The children are forked from a server that imported the engine (polars,
        # pyarrow) once, so each conversion starts in milliseconds.
        concurrency.preload_for_processes([engine.__name__])
        replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.runner = JobRunner(
            replica, heartbeat, stale_after, concurrency.Semaphore(limit), max_line
        )

    def start(self) -> None:
        # Starting the forkserver (a fresh interpreter importing polars) takes a
        # second or more: done now, not in the first user's job.
        self.container.spawn_managed_thread(self._warm_up)

    def _warm_up(self) -> None:
        try:
            concurrency.run_in_process(engine.warm_up)
        except Exception:
            log.warning("could not start the conversion process server", exc_info=True)

    def get_dependency(self, worker_ctx: WorkerContext) -> JobRunner:
        return self.runner
