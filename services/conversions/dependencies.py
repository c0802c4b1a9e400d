"""The conversions service's own extensions: its tables, its work queue, the runner.

* ``JobStore``: the framework's ``Database`` provider, injecting a ``JobRepository``
  (the queries the service needs, each committing at once);
* ``JOBS_QUEUE`` / ``job_consumer``: the durable work queue, consumed with at most
  ``MAX_CONCURRENT_CONVERSIONS`` messages unacknowledged per replica; a message is
  acknowledged when its job has finished, so a replica killed mid-job gives it back;
* ``ConversionRunner``: runs one job end to end (claim, convert in a child process,
  heartbeat and progress, cancel, result), injected as a ``JobRunner``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import kombu
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from framework import concurrency
from framework.database import Database
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider
from framework.messaging import Consumer
from framework.storage import FileStorage
from services.conversions import engine
from services.conversions.exceptions import FileNotFound, JobNotFound
from services.conversions.models import ConversionJob, StoredFile
from services.conversions.schemas import (
    CONVERSION_FAILED,
    CONVERSION_PROGRESS,
    CONVERSION_STARTED,
    CONVERSION_SUCCEEDED,
    FINISHED_STATES,
    STATE_FAILED,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SUCCEEDED,
    JobPayload,
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


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; we store UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _timestamp(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.astimezone(UTC).isoformat() if value is not None else None


def dump_file(row: StoredFile, with_key: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "size": row.size,
        "format": row.format,
        "owner": row.owner,
        "created_at": _timestamp(row.created_at),
    }
    if with_key:
        payload["storage_key"] = row.storage_key
    return payload


def dump_job(row: ConversionJob) -> dict[str, Any]:
    output = None
    if row.state == STATE_SUCCEEDED:
        output = {
            "name": row.output_name,
            "format": row.target_format,
            "size": row.output_size or 0,
            "rows": row.output_rows,
            "storage_key": row.output_key,
        }
    payload = {
        "id": row.id,
        "state": row.state,
        "owner": row.owner,
        "input": {
            "file_id": row.file_id,
            "name": row.input_name,
            "format": row.input_format,
            "size": row.input_size,
        },
        "target_format": row.target_format,
        "options": row.options or {},
        "output": output,
        "progress": {
            "bytes": row.progress_bytes or 0,
            "rows": row.progress_rows,
            "percent": row.progress_percent,
        },
        "attempts": row.attempts or 0,
        "heartbeat_at": _timestamp(row.heartbeat_at),
        "created_at": _timestamp(row.created_at),
        "started_at": _timestamp(row.started_at),
        "finished_at": _timestamp(row.finished_at),
        "error": row.error,
    }
    # Validated against the published shape: a drift fails here, not in a caller.
    return JobPayload.model_validate(payload).model_dump(mode="json")


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


# -- running a job -------------------------------------------------------------------------


class JobRunner:
    """Runs one job: what ``ConversionRunner`` injects."""

    def __init__(
        self,
        replica: str,
        heartbeat_interval: float,
        stale_after: float,
        slots: Any,
        max_line_bytes: int = engine.MAX_RECORD_BYTES,
    ) -> None:
        self.replica = replica
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.max_line_bytes = max_line_bytes
        self._slots = slots

    def run(
        self,
        job_id: str,
        jobs: JobRepository,
        storage: FileStorage,
        dispatch: Callable[[str, Any], None],
    ) -> None:
        """Run the job unless it finished already or runs elsewhere. Never raises
        for a bad file (the job fails); raises for infrastructure trouble."""
        # The slot first, then the claim: a claimed job must beat at once, or a
        # replica waiting for a slot would look dead to the others.
        with self._slots:
            if not self._claim(job_id, jobs):
                return
            job = jobs.fresh(job_id)
            if job is None:
                return
            dispatch(CONVERSION_STARTED, {"job": dump_job(job)})
            self._convert(job, jobs, storage, dispatch)

    def _claim(self, job_id: str, jobs: JobRepository) -> bool:
        """Claim the job, waiting out a previous runner's heartbeat if need be.

        A message comes back from a replica killed mid-job at once, while that
        replica's last heartbeat still looks fresh: we wait until it is stale
        (the job is then ours to run again) or the job moves on (another live
        replica is running it, and holds its own message).
        """
        deadline = concurrency.Deadline(self.stale_after * 2 + self.heartbeat_interval)
        last_heartbeat = None
        while True:
            if jobs.claim(job_id, self.replica, self.stale_after):
                return True
            job = jobs.fresh(job_id)
            if job is None:
                log.info("job deleted before it ran", extra={"job_id": job_id})
                return False
            if job.state != STATE_RUNNING:
                # Finished already (a redelivery), or cancelled: nothing to do.
                log.info(
                    "job not runnable; skipped",
                    extra={"job_id": job_id, "state": job.state},
                )
                return False
            if last_heartbeat is not None and job.heartbeat_at != last_heartbeat:
                if deadline.expired():
                    log.info(
                        "job is running on a live replica; skipped",
                        extra={"job_id": job_id, "runner": job.runner},
                    )
                    return False
            last_heartbeat = job.heartbeat_at
            concurrency.sleep(self.heartbeat_interval)

    def _convert(
        self,
        job: ConversionJob,
        jobs: JobRepository,
        storage: FileStorage,
        dispatch: Callable[[str, Any], None],
    ) -> None:
        job_id = job.id
        source = jobs.get_file(job.file_id)
        scratch = tempfile.mkdtemp(prefix="conversion-")
        watch = _Watch(self, job_id, jobs, dispatch, job.input_size)
        try:
            if job.attempts > 1:
                # An earlier run died mid-write (kill -9): its temporary output
                # is garbage now, and nobody else is writing this key.
                storage.remove_partials(job.output_key)
            input_path = self._input_path(storage, source.storage_key, scratch)
            with storage.staging_path(job.output_key) as output_path:
                spec = {
                    "input_path": input_path,
                    "source_format": job.input_format,
                    "output_path": output_path,
                    "target_format": job.target_format,
                    "options": job.options or {},
                    "scratch_dir": scratch,
                    "input_size": job.input_size,
                    "max_record_bytes": self.max_line_bytes,
                }
                result = concurrency.run_in_process(
                    engine.convert,
                    spec,
                    on_message=watch.progress,
                    should_stop=watch.should_stop,
                    poll_interval=min(self.heartbeat_interval, 0.25),
                )
        except concurrency.ProcessCancelled:
            log.info("conversion stopped", extra={"job_id": job_id})
            return
        except engine.ConversionFailed as exc:
            self._fail(job_id, str(exc), jobs, dispatch)
            return
        except concurrency.ChildProcessDied as exc:
            log.error(
                "conversion process died",
                extra={"job_id": job_id, "exitcode": exc.exitcode},
            )
            self._fail(
                job_id,
                "the conversion process ended abruptly (out of memory?)",
                jobs,
                dispatch,
            )
            return
        except StorageMissing:
            self._fail(job_id, "the input file is gone from storage", jobs, dispatch)
            return
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._succeed(job_id, result, jobs, storage, dispatch)

    @staticmethod
    def _input_path(storage: FileStorage, key: str, scratch: str) -> str:
        if not storage.exists(key):
            raise StorageMissing(key)
        path = storage.local_path(key)
        if path is not None:
            return path
        # Not on this machine (S3...): a local copy, streamed, in the scratch folder.
        local = os.path.join(scratch, "input")
        with storage.open_read(key) as source, open(local, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        return local

    def _succeed(
        self,
        job_id: str,
        result: dict[str, Any],
        jobs: JobRepository,
        storage: FileStorage,
        dispatch: Callable[[str, Any], None],
    ) -> None:
        job = jobs.fresh(job_id)
        output_key = job.output_key if job is not None else None
        size = storage.size(output_key) if output_key else 0
        done = jobs.transition(
            job_id,
            (STATE_RUNNING,),
            _runner=self.replica,
            state=STATE_SUCCEEDED,
            output_size=size,
            output_rows=result.get("rows"),
            progress_percent=100.0,
            progress_rows=result.get("rows"),
            finished_at=utcnow(),
        )
        if not done:
            # Cancelled or deleted while the output was being moved into place.
            if output_key:
                storage.delete(output_key)
            return
        job = jobs.fresh(job_id)
        if job is not None:
            log.info(
                "conversion succeeded",
                extra={
                    "job_id": job_id,
                    "rows": result.get("rows"),
                    "peak_rss": result.get("peak_rss"),
                },
            )
            dispatch(CONVERSION_SUCCEEDED, {"job": dump_job(job)})

    def _fail(
        self,
        job_id: str,
        message: str,
        jobs: JobRepository,
        dispatch: Callable[[str, Any], None],
    ) -> None:
        done = jobs.transition(
            job_id,
            (STATE_RUNNING,),
            _runner=self.replica,
            state=STATE_FAILED,
            error=message,
            finished_at=utcnow(),
        )
        job = jobs.fresh(job_id)
        if done and job is not None:
            log.info("conversion failed", extra={"job_id": job_id, "reason": message})
            dispatch(CONVERSION_FAILED, {"job": dump_job(job)})


class StorageMissing(Exception):
    """The job's input is not in storage any more."""


class _Watch:
    """The parent's side of a running conversion: heartbeat, progress, cancel."""

    def __init__(
        self,
        runner: JobRunner,
        job_id: str,
        jobs: JobRepository,
        dispatch: Callable[[str, Any], None],
        total: int,
    ) -> None:
        self.runner = runner
        self.job_id = job_id
        self.jobs = jobs
        self.dispatch = dispatch
        self.total = total
        self.bytes = 0
        self.rows: int | None = None
        self._next_beat = 0.0

    def progress(self, message: dict[str, Any]) -> None:
        self.bytes = int(message.get("bytes") or 0)
        self.rows = message.get("rows")

    def should_stop(self) -> bool:
        """Heartbeat and progress, at most once per interval; true once the job
        is no longer ours to run (cancelled, deleted, claimed by another)."""
        now = time.monotonic()
        if now < self._next_beat:
            return False
        self._next_beat = now + self.runner.heartbeat_interval
        percent = None
        if self.total:
            # Never 100 before it is done: the last step (moving the output into
            # place, counting rows) comes after the last byte is read.
            percent = round(min(self.bytes / self.total * 100, 99.0), 1)
        alive = self.jobs.transition(
            self.job_id,
            (STATE_RUNNING,),
            _runner=self.runner.replica,
            heartbeat_at=utcnow(),
            progress_bytes=self.bytes,
            progress_rows=self.rows,
            progress_percent=percent,
        )
        if not alive:
            return True
        job = self.jobs.fresh(self.job_id)
        if job is None:
            return True
        self.dispatch(CONVERSION_PROGRESS, {"job": dump_job(job)})
        return False


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
