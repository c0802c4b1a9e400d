"""Stand-ins for the conversions and scheduler services, for the web service's unit
and API tests (outside the web's bounded context, so replaced at the boundary).

They answer the published RPC contracts of ``services/conversions/schemas.py`` and
``services/scheduler/schemas.py``, validating with the contracts' own parse
functions, and dispatch the contracts' events. Tests drive jobs and runs through
the extra ``advance`` / ``fail`` methods. State is per process: ``reset()``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from framework.events import EventDispatcher
from framework.rpc import rpc
from services.conversions.exceptions import (
    FileNotFound,
    InvalidOptions,
    JobNotFound,
    JobStateConflict,
    UnsupportedConversion,
)
from services.conversions.schemas import (
    FINISHED_STATES,
    FORMAT_EXTENSIONS,
    formats_payload,
    parse_options,
)
from services.scheduler.exceptions import InvalidSchedule, ScheduleNotFound
from services.scheduler.schemas import (
    parse_changes,
    parse_preview,
    parse_schedule,
)

FILES: dict[str, dict[str, Any]] = {}
JOBS: dict[str, dict[str, Any]] = {}
SCHEDULES: dict[int, dict[str, Any]] = {}
RUNS: dict[int, list[dict[str, Any]]] = {}


def reset() -> None:
    FILES.clear()
    JOBS.clear()
    SCHEDULES.clear()
    RUNS.clear()


def now() -> str:
    return datetime.now(UTC).isoformat()


def detect_format(name: str) -> str:
    lowered = name.lower()
    for ending, fmt in FORMAT_EXTENSIONS.items():
        if lowered.endswith(ending):
            return fmt
    raise UnsupportedConversion(f"cannot tell the format of {name!r} from its name")


class FakeConversions:
    name = "conversions"
    dispatch = EventDispatcher()

    @rpc
    def formats(self) -> dict[str, Any]:
        return formats_payload()

    @rpc(expected_exceptions=UnsupportedConversion)
    def register_file(
        self,
        storage_key: str,
        name: str,
        size: int,
        owner: int | None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        file = {
            "id": str(uuid.uuid4()),
            "name": name,
            "size": size,
            "format": detect_format(name),
            "owner": owner,
            "created_at": now(),
            "storage_key": storage_key,
        }
        FILES[file["id"]] = file
        return {k: v for k, v in file.items() if k != "storage_key"}

    @rpc(expected_exceptions=FileNotFound)
    def get_file(self, file_id: str) -> dict[str, Any]:
        if file_id not in FILES:
            raise FileNotFound(f"no file {file_id}")
        return dict(FILES[file_id])

    @rpc(expected_exceptions=(FileNotFound, UnsupportedConversion, InvalidOptions))
    def start_conversion(
        self,
        file_id: str,
        target_format: str,
        options: dict[str, Any],
        requested_by: int | None,
    ) -> dict[str, Any]:
        file = self.get_file(file_id)
        parsed = parse_options(file["format"], target_format, options)
        job = {
            "id": str(uuid.uuid4()),
            "state": "queued",
            "owner": requested_by,
            "input": {
                "file_id": file["id"],
                "name": file["name"],
                "format": file["format"],
                "size": file["size"],
            },
            "target_format": target_format,
            "options": parsed.model_dump(mode="json", exclude_unset=True),
            "output": None,
            "progress": {"bytes": 0, "rows": None, "percent": 0.0},
            "attempts": 0,
            "heartbeat_at": None,
            "created_at": now(),
            "started_at": None,
            "finished_at": None,
            "error": None,
        }
        JOBS[job["id"]] = job
        self.dispatch("conversion_queued", {"job": job})
        return job

    @rpc(expected_exceptions=JobNotFound)
    def get_job(self, job_id: str) -> dict[str, Any]:
        if job_id not in JOBS:
            raise JobNotFound(f"no job {job_id}")
        return JOBS[job_id]

    @rpc
    def list_jobs(
        self,
        state: str | None = None,
        owner: int | None = None,
        page: int = 1,
        per_page: int = 20,
        after: str | None = None,
    ) -> dict[str, Any]:
        found = [
            job
            for job in reversed(list(JOBS.values()))
            if (state is None or job["state"] == state)
            and (owner is None or job["owner"] == owner)
        ]
        start = (page - 1) * per_page
        if after is not None:
            # This fake's cursor is the id of the last job of the page before.
            ids = [job["id"] for job in found]
            if after not in ids:
                raise InvalidOptions("invalid query", {"after": "not a cursor"})
            start = ids.index(after) + 1
        items = found[start : start + per_page]
        more = start + per_page < len(found)
        return {
            "items": items,
            "total": len(found),
            "page": page,
            "per_page": per_page,
            "next_cursor": items[-1]["id"] if items and more else None,
        }

    @rpc(expected_exceptions=(JobNotFound, JobStateConflict))
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job["state"] in FINISHED_STATES:
            raise JobStateConflict(f"the job is {job['state']}")
        return self._set(job, "cancelled", "conversion_cancelled")

    @rpc(expected_exceptions=(JobNotFound, JobStateConflict))
    def retry_job(self, job_id: str) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job["state"] not in ("failed", "cancelled"):
            raise JobStateConflict(f"the job is {job['state']}")
        job.update(finished_at=None, error=None)
        return self._set(job, "queued", "conversion_queued")

    @rpc(expected_exceptions=JobNotFound)
    def delete_job(self, job_id: str) -> None:
        self.get_job(job_id)
        del JOBS[job_id]

    # -- for tests ------------------------------------------------------------------

    @rpc
    def advance(
        self, job_id: str, state: str, percent: float = 0.0, output_key: str = ""
    ) -> dict[str, Any]:
        job = self.get_job(job_id)
        job["progress"] = {"bytes": 0, "rows": None, "percent": percent}
        if state == "running" and job["started_at"] is None:
            job["started_at"] = now()
        if state == "succeeded":
            job["output"] = {
                "name": job["input"]["name"].rsplit(".", 1)[0]
                + "."
                + job["target_format"],
                "format": job["target_format"],
                "size": 3,
                "rows": 1,
                "storage_key": output_key,
            }
        if state == "failed":
            job["error"] = "the input is not valid CSV"
        event = {
            "running": "conversion_progress",
            "succeeded": "conversion_succeeded",
            "failed": "conversion_failed",
        }[state]
        return self._set(job, state, event)

    def _set(self, job: dict[str, Any], state: str, event: str) -> dict[str, Any]:
        job["state"] = state
        if state in FINISHED_STATES:
            job["finished_at"] = now()
        self.dispatch(event, {"job": job})
        return job


class FakeScheduler:
    name = "scheduler"
    dispatch = EventDispatcher()

    def _detail(self, schedule: dict[str, Any]) -> dict[str, Any]:
        cron = parse_preview(schedule["cron"], schedule["timezone"])
        times = cron.next_times(datetime.now(UTC), 5)
        return {
            **schedule,
            "next_fire_times": [t.isoformat() for t in times],
            "last_runs": RUNS.get(schedule["id"], [])[:10],
        }

    def _get(self, schedule_id: int) -> dict[str, Any]:
        if schedule_id not in SCHEDULES:
            raise ScheduleNotFound(f"no schedule {schedule_id}")
        return SCHEDULES[schedule_id]

    @rpc
    def list_schedules(self, page: int = 1, per_page: int = 50) -> dict[str, Any]:
        items = list(SCHEDULES.values())
        start = (page - 1) * per_page
        return {
            "items": items[start : start + per_page],
            "total": len(items),
            "page": page,
            "per_page": per_page,
        }

    @rpc(expected_exceptions=ScheduleNotFound)
    def get_schedule(self, schedule_id: int) -> dict[str, Any]:
        return self._detail(self._get(schedule_id))

    @rpc(expected_exceptions=InvalidSchedule)
    def create_schedule(self, schedule: dict[str, Any]) -> dict[str, Any]:
        spec = parse_schedule(schedule)
        schedule_id = max(SCHEDULES, default=0) + 1
        stamp = now()
        SCHEDULES[schedule_id] = {
            "id": schedule_id,
            **spec.model_dump(mode="json"),
            "created_at": stamp,
            "updated_at": stamp,
        }
        return SCHEDULES[schedule_id]

    @rpc(expected_exceptions=(ScheduleNotFound, InvalidSchedule))
    def update_schedule(
        self, schedule_id: int, changes: dict[str, Any]
    ) -> dict[str, Any]:
        current = self._get(schedule_id)
        spec = parse_schedule(
            {
                k: v
                for k, v in current.items()
                if k not in ("id", "created_at", "updated_at")
            }
        )
        updated = parse_changes(spec, changes)
        current.update(updated.model_dump(mode="json"), updated_at=now())
        return current

    @rpc(expected_exceptions=ScheduleNotFound)
    def delete_schedule(self, schedule_id: int) -> None:
        self._get(schedule_id)
        del SCHEDULES[schedule_id]
        RUNS.pop(schedule_id, None)

    @rpc(expected_exceptions=ScheduleNotFound)
    def pause(self, schedule_id: int) -> dict[str, Any]:
        schedule = self._get(schedule_id)
        schedule["enabled"] = False
        return schedule

    @rpc(expected_exceptions=ScheduleNotFound)
    def resume(self, schedule_id: int) -> dict[str, Any]:
        schedule = self._get(schedule_id)
        schedule["enabled"] = True
        return schedule

    @rpc(expected_exceptions=ScheduleNotFound)
    def run_now(self, schedule_id: int) -> dict[str, Any]:
        schedule = self._get(schedule_id)
        runs = RUNS.setdefault(schedule_id, [])
        stamp = now()
        run = {
            "id": sum(len(r) for r in RUNS.values()) + 1,
            "schedule_id": schedule_id,
            "scheduled_for": stamp,
            "started_at": stamp,
            "finished_at": None,
            "replica": "fake",
            "outcome": "running",
            "result_summary": None,
            "error": None,
        }
        runs.insert(0, run)
        self.dispatch("schedule_run_started", {"schedule": schedule, "run": dict(run)})
        run.update(outcome="succeeded", finished_at=now(), result_summary="ok")
        self.dispatch("schedule_run_finished", {"schedule": schedule, "run": dict(run)})
        return run

    @rpc(expected_exceptions=ScheduleNotFound)
    def list_runs(
        self, schedule_id: int, page: int = 1, per_page: int = 50
    ) -> dict[str, Any]:
        self._get(schedule_id)
        runs = RUNS.get(schedule_id, [])
        start = (page - 1) * per_page
        return {
            "items": runs[start : start + per_page],
            "total": len(runs),
            "page": page,
            "per_page": per_page,
        }

    @rpc(expected_exceptions=InvalidSchedule)
    def preview(self, cron: str, timezone: str) -> list[str]:
        schedule = parse_preview(cron, timezone)
        return [t.isoformat() for t in schedule.next_times(datetime.now(UTC), 5)]
