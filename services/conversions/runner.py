"""Running one conversion job end to end, in the replica that took its message.

Claim the job (one conditional UPDATE), convert in a child process
(``framework.concurrency.run_in_process``) while this green thread beats the
heartbeat, reports progress and watches for a cancel, then record the result.
The output is written through ``FileStorage.staging_path``: moved into place on
success only, removed on a cancel or a failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from framework import concurrency
from framework.storage import FileStorage
from services.conversions import engine
from services.conversions.models import ConversionJob, utcnow
from services.conversions.schemas import (
    CONVERSION_FAILED,
    CONVERSION_PROGRESS,
    CONVERSION_STARTED,
    CONVERSION_SUCCEEDED,
    STATE_FAILED,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SUCCEEDED,
    dump_job,
)

if TYPE_CHECKING:
    from services.conversions.dependencies import JobRepository

log = logging.getLogger(__name__)

__all__ = ["JobRunner"]


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
            try:
                dispatch(CONVERSION_STARTED, {"job": dump_job(job)})
                self._convert(job, jobs, storage, dispatch)
            except Exception:
                # The message goes back for another try (``requeue_on_error``):
                # give the claim back too, or the retry would wait for our
                # heartbeat to go stale first.
                self._release(job_id, jobs)
                raise

    def _release(self, job_id: str, jobs: JobRepository) -> None:
        try:
            jobs.transition(
                job_id, (STATE_RUNNING,), _runner=self.replica, state=STATE_QUEUED
            )
        except Exception:
            log.warning("could not give a job back", extra={"job_id": job_id})

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
