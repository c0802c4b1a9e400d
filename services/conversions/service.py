"""The conversions service: data files converted in the background.

Files live in the shared storage (``STORAGE_URL``); this service keeps their
records and the jobs. ``start_conversion`` records a queued job and puts a message
on the durable ``conversions.jobs`` queue; a replica takes it (``run_job``), runs
the conversion in a child process, and acknowledges the message only once the job
has finished, so a replica killed mid-job gives the job to another.

Events are dispatched after the change is committed.
"""

from __future__ import annotations

import csv
import io
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from framework.events import EventDispatcher
from framework.messaging import Publisher
from framework.rpc import RpcProxy, rpc
from framework.settings import DEVELOPMENT_DATABASE_SECRET, ProductionSecrets
from framework.storage import FileStorage, InvalidStorageKey, Storage
from services.conversions.dependencies import (
    JOBS_EXCHANGE,
    JOBS_QUEUE,
    ConversionRunner,
    JobRepository,
    JobStore,
    job_consumer,
)
from services.conversions.exceptions import (
    FileNotFound,
    InvalidOptions,
    JobNotFound,
    JobStateConflict,
    UnsupportedConversion,
)
from services.conversions.models import Base, ConversionJob, StoredFile, utcnow
from services.conversions.runner import JobRunner
from services.conversions.schemas import (
    CONVERSION_CANCELLED,
    CONVERSION_QUEUED,
    DEFAULT_PER_PAGE,
    FORMAT_EXTENSIONS,
    STATE_CANCELLED,
    STATE_FAILED,
    STATE_QUEUED,
    STATE_RUNNING,
    clean_name,
    detect_format,
    dump_file,
    dump_job,
    formats_payload,
    output_name,
    parse_cursor,
    parse_options,
    parse_owner,
    parse_page,
    parse_seconds,
)

log = logging.getLogger(__name__)

EXPORT_PAGE_SIZE = 100
EXPORT_COLUMNS = ("id", "email", "display_name", "role", "is_active", "created_at")
# Temporary files of writers killed mid-write are cleared once this old.
PARTIAL_FILES_MAX_AGE = 3600.0


class ConversionsService:
    name = "conversions"

    secrets = ProductionSecrets(DEVELOPMENT_DATABASE_SECRET)
    jobs: JobRepository = JobStore(Base)  # type: ignore[assignment]
    storage: FileStorage = Storage()  # type: ignore[assignment]
    runner: JobRunner = ConversionRunner()  # type: ignore[assignment]
    dispatch: Callable[[str, Any], None] = EventDispatcher()  # type: ignore[assignment]
    queue_job: Callable[..., None] = Publisher(  # type: ignore[assignment]
        exchange=JOBS_EXCHANGE, queue=JOBS_QUEUE
    )
    users: Any = RpcProxy("users")

    # -- formats and files -----------------------------------------------------------

    @rpc
    def formats(self) -> dict[str, Any]:
        return formats_payload()

    @rpc(expected_exceptions=(FileNotFound, InvalidOptions))
    def register_file(
        self,
        storage_key: str,
        name: str,
        size: int,
        owner: int | None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        name = clean_name(name)
        owner = parse_owner(owner)
        try:
            exists = self.storage.exists(storage_key)
        except InvalidStorageKey:
            raise InvalidOptions(
                "invalid file", {"storage_key": "not a storage key"}
            ) from None
        if not exists:
            raise FileNotFound(f"nothing is stored under key {storage_key}")
        with self.storage.open_read(storage_key) as stream:
            head = stream.read(4096)
        row = self.jobs.add_file(
            StoredFile(
                id=str(uuid.uuid4()),
                name=name,
                # What is stored, not what the caller says: the bytes are the truth.
                size=self.storage.size(storage_key),
                format=detect_format(name, head, content_type),
                content_type=content_type,
                owner=owner,
                storage_key=storage_key,
            )
        )
        return dump_file(row)

    @rpc(expected_exceptions=FileNotFound)
    def get_file(self, file_id: str) -> dict[str, Any]:
        return dump_file(self.jobs.get_file(file_id), with_key=True)

    # -- jobs ------------------------------------------------------------------------

    @rpc(expected_exceptions=(FileNotFound, UnsupportedConversion, InvalidOptions))
    def start_conversion(
        self,
        file_id: str,
        target_format: str,
        options: dict[str, Any] | None = None,
        requested_by: int | None = None,
    ) -> dict[str, Any]:
        source = self.jobs.get_file(file_id)
        parsed = parse_options(source.format, target_format, options)
        owner = parse_owner(requested_by, "requested_by")
        suffix = next(
            ext for ext, fmt in FORMAT_EXTENSIONS.items() if fmt == target_format
        )
        job = self.jobs.add_job(
            ConversionJob(
                id=str(uuid.uuid4()),
                state=STATE_QUEUED,
                owner=owner,
                file_id=source.id,
                input_name=source.name,
                input_format=source.format,
                input_size=source.size,
                target_format=target_format,
                options=parsed.model_dump(exclude_unset=True, mode="json"),
                # Chosen now, so that every run of this job writes the same one output.
                output_key=self.storage.new_key(suffix),
                output_name=output_name(source.name, target_format),
                progress_bytes=0,
                attempts=0,
                created_at=utcnow(),
            )
        )
        return self._queue(job)

    @rpc(expected_exceptions=JobNotFound)
    def get_job(self, job_id: str) -> dict[str, Any]:
        return dump_job(self.jobs.get_job(job_id))

    @rpc(expected_exceptions=InvalidOptions)
    def list_jobs(
        self,
        state: str | None = None,
        owner: int | None = None,
        page: int = 1,
        per_page: int = DEFAULT_PER_PAGE,
        after: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: page ``page``, or the one right after the
        job the ``after`` cursor names (``page`` is then only echoed back)."""
        page, per_page = parse_page(page, per_page, state)
        owner = parse_owner(owner)
        listing = self.jobs.search(state, owner, page, per_page, parse_cursor(after))
        return {
            "items": [dump_job(row) for row in listing.rows],
            "total": listing.total,
            "page": page,
            "per_page": per_page,
            "next_cursor": listing.next_cursor,
        }

    @rpc(expected_exceptions=(JobNotFound, JobStateConflict))
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get_job(job_id)
        # The replica running it sees the new state at its next heartbeat (well
        # under a second), kills the conversion and removes the partial output.
        if not self.jobs.transition(
            job.id,
            (STATE_QUEUED, STATE_RUNNING),
            state=STATE_CANCELLED,
            finished_at=utcnow(),
        ):
            raise JobStateConflict(f"job {job.id} has finished already; not cancelled")
        payload = dump_job(self.jobs.get_job(job.id))
        self.dispatch(CONVERSION_CANCELLED, {"job": payload})
        return payload

    @rpc(expected_exceptions=(JobNotFound, JobStateConflict))
    def retry_job(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get_job(job_id)
        if not self.jobs.transition(
            job.id,
            (STATE_FAILED, STATE_CANCELLED),
            state=STATE_QUEUED,
            runner=None,
            error=None,
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            progress_bytes=0,
            progress_rows=None,
            progress_percent=None,
        ):
            raise JobStateConflict(
                f"job {job.id} is {job.state}; only failed or cancelled jobs are retried"
            )
        return self._queue(self.jobs.get_job(job.id))

    @rpc(expected_exceptions=JobNotFound)
    def delete_job(self, job_id: str) -> None:
        job = self.jobs.get_job(job_id)
        output_key = job.output_key
        # A running job notices at its next heartbeat that its row is gone and
        # stops; an output it moves into place after this is removed by it.
        self.jobs.delete_job(job.id)
        self.storage.delete(output_key)

    @rpc(expected_exceptions=InvalidOptions)
    def purge_expired(self, older_than_seconds: float) -> dict[str, int]:
        """Delete finished jobs (and their outputs) finished that long ago."""
        older_than = parse_seconds(older_than_seconds, "older_than_seconds")
        purged = 0
        for job in self.jobs.expired(older_than):
            output_key = job.output_key
            self.jobs.delete_job(job.id)
            self.storage.delete(output_key)
            purged += 1
        partials = self.storage.remove_stale_partials(
            max(older_than, PARTIAL_FILES_MAX_AGE)
        )
        log.info("purged expired jobs", extra={"jobs": purged, "partials": partials})
        return {"jobs": purged, "partial_files": partials}

    @rpc(expected_exceptions=InvalidOptions)
    def requeue_stalled(self, heartbeat_older_than_seconds: float) -> dict[str, Any]:
        """Queue again the running jobs whose replica stopped beating."""
        older_than = parse_seconds(
            heartbeat_older_than_seconds, "heartbeat_older_than_seconds"
        )
        requeued = []
        for job in self.jobs.stalled(older_than):
            if self.jobs.transition(
                job.id, (STATE_RUNNING,), state=STATE_QUEUED, runner=None
            ):
                self._queue(self.jobs.get_job(job.id))
                requeued.append(job.id)
        return {"requeued": requeued}

    @rpc(expected_exceptions=(UnsupportedConversion, InvalidOptions))
    def export_users(self, target_format: str = "csv") -> dict[str, Any]:
        """Every user as a file in ``target_format``: a normal job owned by nobody."""
        parse_options("csv", target_format, {})
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(EXPORT_COLUMNS)
        page = 1
        while True:
            result = self.users.list_users(page=page, per_page=EXPORT_PAGE_SIZE)
            for user in result["items"]:
                writer.writerow([user.get(column) for column in EXPORT_COLUMNS])
            if page >= (result.get("pages") or 0):
                break
            page += 1
        key = self.storage.new_key(".csv")
        self.storage.write_bytes(key, text.getvalue().encode("utf-8"))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        registered = self.register_file(key, f"users-{stamp}.csv", 0, None, "text/csv")
        return self.start_conversion(registered["id"], target_format, {}, None)

    # -- the work ------------------------------------------------------------------

    @job_consumer
    def run_job(self, message: dict[str, Any]) -> None:
        job_id = message.get("job_id") if isinstance(message, dict) else None
        if not isinstance(job_id, str):
            log.error("job message without a job id; dropped")
            return
        self.runner.run(job_id, self.jobs, self.storage, self.dispatch)

    def _queue(self, job: ConversionJob) -> dict[str, Any]:
        payload = dump_job(job)
        self.queue_job(
            {"job_id": job.id}, routing_key=JOBS_QUEUE.routing_key, delivery_mode=2
        )
        self.dispatch(CONVERSION_QUEUED, {"job": payload})
        return payload
