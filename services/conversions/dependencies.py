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
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import kombu
from sqlalchemy import delete, func, select, update
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
    FINISHED_STATES,
    STATE_QUEUED,
    STATE_RUNNING,
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


class JobRepository:
    """One worker's view of the files and jobs tables. Every write commits at once,
    so no transaction stays open across a long conversion."""

    def __init__(self, session: Session) -> None:
        self.session = session

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
        self, state: str | None, owner: int | None, page: int, per_page: int
    ) -> tuple[list[ConversionJob], int]:
        statement = select(ConversionJob)
        if state is not None:
            statement = statement.where(ConversionJob.state == state)
        if owner is not None:
            statement = statement.where(ConversionJob.owner == owner)
        total = self.session.scalar(
            select(func.count()).select_from(statement.subquery())
        )
        rows = self.session.scalars(
            statement.order_by(ConversionJob.created_at.desc(), ConversionJob.id)
            .offset((page - 1) * per_page)
            .limit(per_page)
        )
        return list(rows), total or 0

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
    """``Database`` (engine, sessions, teardown) injecting a ``JobRepository``."""

    def get_dependency(self, worker_ctx: WorkerContext) -> JobRepository:  # type: ignore[override]
        return JobRepository(super().get_dependency(worker_ctx).session)


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
