"""What goes in and out of the scheduler service: its published contract.

Payloads are plain JSON (timestamps are ISO 8601 strings in UTC; fire times in
``next_fire_times`` are in the schedule's own time zone, with their offset). The
pydantic models below are the one declaration of each shape: the service validates
with them and the web service's OpenAPI document is generated from them.

``parse_*`` functions validate what callers send and raise ``InvalidSchedule``
listing every bad field at once (dotted for nested ones: ``target.method``).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from framework.cron import (
    OVERLAP_ALLOW,
    OVERLAP_QUEUE_ONE,
    OVERLAP_SKIP,
    CronSchedule,
    InvalidCronExpression,
)
from services.scheduler.exceptions import InvalidSchedule

__all__ = [
    "DEFAULT_PER_PAGE",
    "FIRE_TIMES_SHOWN",
    "LAST_RUNS_SHOWN",
    "MAX_BACKFILL_TICKS",
    "MAX_PER_PAGE",
    "MISSED_RUN_POLICIES",
    "MISSED_RUN_RUN_ALL",
    "MISSED_RUN_RUN_ONCE",
    "MISSED_RUN_SKIP",
    "OUTCOMES",
    "OUTCOME_FAILED",
    "OUTCOME_LOST",
    "OUTCOME_RUNNING",
    "OUTCOME_SKIPPED",
    "OUTCOME_SUCCEEDED",
    "OVERLAP_ALLOW",
    "OVERLAP_POLICIES",
    "OVERLAP_QUEUE_ONE",
    "OVERLAP_SKIP",
    "RUN_ID_CONTEXT_KEY",
    "SCHEDULED_FOR_CONTEXT_KEY",
    "SCHEDULE_ID_CONTEXT_KEY",
    "SCHEDULE_RUN_FINISHED",
    "SCHEDULE_RUN_STARTED",
    "SCHEDULER_SERVICE",
    "TARGET_EVENT",
    "TARGET_RPC",
    "EventTarget",
    "Run",
    "RunPage",
    "RpcTarget",
    "Schedule",
    "ScheduleChanges",
    "ScheduleDetail",
    "SchedulePage",
    "ScheduleRunEvent",
    "ScheduleSpec",
    "Target",
    "dump_run",
    "dump_schedule",
    "parse_backfill",
    "parse_changes",
    "parse_page",
    "parse_preview",
    "parse_schedule",
    "parse_schedule_id",
]

SCHEDULER_SERVICE = "scheduler"

# Event types, dispatched from the ``scheduler.events`` exchange, body
# ``{"schedule": Schedule, "run": Run}``.
SCHEDULE_RUN_STARTED = "schedule_run_started"
SCHEDULE_RUN_FINISHED = "schedule_run_finished"

# What happens to ticks that passed while no replica was running (or the schedule
# was paused): none run, the latest one runs, or every one within the catch-up
# window runs, oldest first.
MISSED_RUN_SKIP = "skip"
MISSED_RUN_RUN_ONCE = "run_once"
MISSED_RUN_RUN_ALL = "run_all"
MISSED_RUN_POLICIES = (MISSED_RUN_SKIP, MISSED_RUN_RUN_ONCE, MISSED_RUN_RUN_ALL)

# A tick due while the previous run is still going (the same values as @cron's).
OVERLAP_POLICIES = (OVERLAP_SKIP, OVERLAP_ALLOW, OVERLAP_QUEUE_ONE)

TARGET_RPC = "rpc"
TARGET_EVENT = "event"

# Context data of a run's RPC request or event (headers ``nameko.<key>``), so a
# target knows which tick it serves: e.g. to make its work idempotent per tick.
RUN_ID_CONTEXT_KEY = "scheduler_run_id"
SCHEDULE_ID_CONTEXT_KEY = "scheduler_schedule_id"
SCHEDULED_FOR_CONTEXT_KEY = "scheduler_scheduled_for"  # ISO 8601, UTC

# How a run ended. ``lost``: its replica died mid-run, and another marked it after
# the timeout (it is never re-fired). ``skipped``: not fired, by overlap policy.
OUTCOME_RUNNING = "running"
OUTCOME_SUCCEEDED = "succeeded"
OUTCOME_FAILED = "failed"
OUTCOME_LOST = "lost"
OUTCOME_SKIPPED = "skipped"
OUTCOMES = (
    OUTCOME_RUNNING,
    OUTCOME_SUCCEEDED,
    OUTCOME_FAILED,
    OUTCOME_LOST,
    OUTCOME_SKIPPED,
)

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200
FIRE_TIMES_SHOWN = 5  # ``next_fire_times`` in get_schedule and preview
LAST_RUNS_SHOWN = 10  # ``last_runs`` in get_schedule

NAME_MAX_LENGTH = 200
MAX_JITTER_SECONDS = 3600
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_CATCHUP_WINDOW_SECONDS = 31 * 24 * 3600
MAX_HISTORY_LIMIT = 10_000
# Arguments and payloads are stored and sent as JSON; a cap keeps a schedule from
# being a way to fill the database.
MAX_JSON_BYTES = 64 * 1024

# Schedule ids are PostgreSQL ``integer`` keys.
MAX_SCHEDULE_ID = 2**31 - 1
# A backfill runs at most this many ticks (its range is refused otherwise).
MAX_BACKFILL_TICKS = 1000

# Service, method and event type names as nameko routes them.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EVENT_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

MissedRunPolicy = Literal["skip", "run_once", "run_all"]
OverlapPolicy = Literal["skip", "allow", "queue_one"]
Outcome = Literal["running", "succeeded", "failed", "lost", "skipped"]


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be plain JSON: {exc}") from None
    if len(encoded.encode()) > MAX_JSON_BYTES:
        raise ValueError(f"must be at most {MAX_JSON_BYTES} bytes as JSON")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- targets ---------------------------------------------------------------------------


class RpcTarget(_Strict):
    """Call ``service.method(**kwargs)`` over RPC; the run waits for the reply."""

    kind: Literal["rpc"] = TARGET_RPC
    service: str = Field(max_length=100)
    method: str = Field(max_length=100)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("service", "method")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a Python identifier (letters, digits, _)")
        return value

    @field_validator("kwargs")
    @classmethod
    def _kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _json_object(value)


class EventTarget(_Strict):
    """Dispatch ``event_type`` with ``payload`` from the scheduler's exchange.

    Handlers listen with ``@event_handler("scheduler", event_type)``.
    """

    kind: Literal["event"] = TARGET_EVENT
    event_type: str = Field(max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        if not _EVENT_TYPE.match(value):
            raise ValueError("must be letters, digits, _ . or -")
        return value

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _json_object(value)


Target = Annotated[RpcTarget | EventTarget, Field(discriminator="kind")]


# -- schedules: input --------------------------------------------------------------------


class ScheduleSpec(_Strict):
    """A schedule as created (everything but its id and timestamps)."""

    name: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)
    cron: str = Field(min_length=1, max_length=200)
    timezone: str = "UTC"
    target: Target
    enabled: bool = True
    missed_run_policy: MissedRunPolicy = MISSED_RUN_SKIP
    catchup_window_seconds: int = Field(
        default=3600, ge=0, le=MAX_CATCHUP_WINDOW_SECONDS
    )
    overlap_policy: OverlapPolicy = OVERLAP_SKIP
    jitter_seconds: int = Field(default=0, ge=0, le=MAX_JITTER_SECONDS)
    timeout_seconds: int = Field(default=60, ge=1, le=MAX_TIMEOUT_SECONDS)
    history_limit: int = Field(default=100, ge=1, le=MAX_HISTORY_LIMIT)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:
            return CronSchedule(value).expression
        except InvalidCronExpression as exc:
            raise ValueError(str(exc)) from None

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            CronSchedule("* * * * *", value.strip())
        except InvalidCronExpression as exc:
            raise ValueError(str(exc)) from None
        return value.strip()

    def cron_schedule(self) -> CronSchedule:
        return CronSchedule(self.cron, self.timezone)


class ScheduleChanges(_Strict):
    """What ``update_schedule`` may change: any field of a schedule."""

    name: str | None = None
    cron: str | None = None
    timezone: str | None = None
    target: Target | None = None
    enabled: bool | None = None
    missed_run_policy: MissedRunPolicy | None = None
    catchup_window_seconds: int | None = None
    overlap_policy: OverlapPolicy | None = None
    jitter_seconds: int | None = None
    timeout_seconds: int | None = None
    history_limit: int | None = None


class _CronField(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def _cron_schedule(cron: str, timezone: str) -> CronSchedule:
    try:
        return CronSchedule(cron, timezone)
    except InvalidCronExpression as exc:
        field = "timezone" if "time zone" in str(exc) else "cron"
        raise _CronField(field, str(exc)) from None


# -- payloads ----------------------------------------------------------------------------


class Schedule(BaseModel):
    id: int
    name: str
    cron: str
    timezone: str
    target: Target
    enabled: bool
    missed_run_policy: MissedRunPolicy
    catchup_window_seconds: int
    overlap_policy: OverlapPolicy
    jitter_seconds: int
    timeout_seconds: int
    history_limit: int
    created_at: str  # ISO 8601, UTC
    updated_at: str  # ISO 8601, UTC


class Run(BaseModel):
    id: int
    schedule_id: int
    scheduled_for: str  # the tick (ISO 8601, UTC); a run_now gets the time it was asked
    started_at: str | None  # when the target was called
    finished_at: str | None
    replica: str | None  # the scheduler replica that claimed it
    outcome: Outcome
    result_summary: str | None  # a short text of what the target returned
    error: str | None  # why it failed, was lost or skipped


class ScheduleDetail(Schedule):
    next_fire_times: list[str]  # the next FIRE_TIMES_SHOWN, in the schedule's zone
    last_runs: list[Run]  # the latest LAST_RUNS_SHOWN, newest first


class SchedulePage(BaseModel):
    items: list[Schedule]
    total: int
    page: int
    per_page: int


class RunPage(BaseModel):
    items: list[Run]  # newest first
    total: int
    page: int
    per_page: int


class ScheduleRunEvent(BaseModel):
    """The body of ``schedule_run_started`` and ``schedule_run_finished``."""

    schedule: Schedule
    run: Run


# -- parsing -----------------------------------------------------------------------------


def parse_schedule(data: Any) -> ScheduleSpec:
    if not isinstance(data, dict):
        raise InvalidSchedule("invalid schedule", {"schedule": "must be an object"})
    return _validate(ScheduleSpec, data, "invalid schedule")


def parse_changes(current: ScheduleSpec, changes: Any) -> ScheduleSpec:
    """``current`` with ``changes`` applied, the whole schedule validated again."""
    if not isinstance(changes, dict):
        raise InvalidSchedule("invalid changes", {"changes": "must be an object"})
    errors = {
        str(field): "unknown field; a schedule has "
        + ", ".join(ScheduleChanges.model_fields)
        for field in changes
        if field not in ScheduleChanges.model_fields
    }
    merged = current.model_dump(mode="json")
    merged.update((k, v) for k, v in changes.items() if k not in errors)
    try:
        spec = ScheduleSpec.model_validate(merged)
    except ValidationError as exc:
        errors.update(_field_errors(exc))
    if errors:
        raise InvalidSchedule("invalid changes", errors)
    return spec


def parse_preview(cron: Any, timezone: Any) -> CronSchedule:
    errors: dict[str, str] = {}
    if not isinstance(cron, str):
        errors["cron"] = "must be a string"
    if not isinstance(timezone, str):
        errors["timezone"] = "must be a string"
    if not errors:
        try:
            return _cron_schedule(cron, timezone)
        except _CronField as exc:
            errors[exc.field] = str(exc)
    raise InvalidSchedule("invalid cron expression", errors)


def parse_backfill(
    start: Any, end: Any, overlap_policy: Any
) -> tuple[datetime, datetime, str | None]:
    """A backfill's range (aware ISO 8601 datetimes, ``start <= end``) and its
    overlap policy (``None``: the schedule's). Whether the range is in the past
    and how many ticks it holds are checked against the schedule."""
    errors: dict[str, str] = {}
    moments: dict[str, datetime] = {}
    for field_name, value in (("start", start), ("end", end)):
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            errors[field_name] = (
                "must be an ISO 8601 date and time with its offset, "
                "such as 2026-01-31T02:30:00+00:00"
            )
        else:
            moments[field_name] = moment.astimezone(UTC)
    if len(moments) == 2 and moments["end"] < moments["start"]:
        errors["end"] = "must not be before start"
    if overlap_policy is not None and overlap_policy not in OVERLAP_POLICIES:
        errors["overlap_policy"] = f"must be one of {', '.join(OVERLAP_POLICIES)}"
    if errors:
        raise InvalidSchedule("invalid backfill", errors)
    return moments["start"], moments["end"], overlap_policy


def parse_schedule_id(schedule_id: Any) -> int:
    if (
        not isinstance(schedule_id, int)
        or isinstance(schedule_id, bool)
        or not 1 <= schedule_id <= MAX_SCHEDULE_ID
    ):
        raise InvalidSchedule(
            "invalid schedule id", {"schedule_id": "must be a positive integer"}
        )
    return schedule_id


def parse_page(page: Any, per_page: Any) -> tuple[int, int]:
    errors: dict[str, str] = {}
    if not isinstance(page, int) or isinstance(page, bool) or page < 1:
        errors["page"] = "must be an integer, 1 or more"
    if (
        not isinstance(per_page, int)
        or isinstance(per_page, bool)
        or not 1 <= per_page <= MAX_PER_PAGE
    ):
        errors["per_page"] = f"must be an integer between 1 and {MAX_PER_PAGE}"
    if errors:
        raise InvalidSchedule("invalid page", errors)
    return page, per_page


def dump_schedule(schedule: Any) -> dict[str, Any]:
    """The payload of a schedule row (anything with the model's attributes)."""
    return {
        "id": schedule.id,
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "target": dict(schedule.target),
        "enabled": schedule.enabled,
        "missed_run_policy": schedule.missed_run_policy,
        "catchup_window_seconds": schedule.catchup_window_seconds,
        "overlap_policy": schedule.overlap_policy,
        "jitter_seconds": schedule.jitter_seconds,
        "timeout_seconds": schedule.timeout_seconds,
        "history_limit": schedule.history_limit,
        "created_at": timestamp(schedule.created_at),
        "updated_at": timestamp(schedule.updated_at),
    }


def dump_run(run: Any) -> dict[str, Any]:
    return {
        "id": run.id,
        "schedule_id": run.schedule_id,
        "scheduled_for": timestamp(run.scheduled_for),
        "started_at": timestamp(run.started_at),
        "finished_at": timestamp(run.finished_at),
        "replica": run.replica,
        "outcome": run.outcome,
        "result_summary": run.result_summary,
        "error": run.error,
    }


def dump_page(
    items: list[dict[str, Any]], total: int, page: int, per_page: int
) -> dict[str, Any]:
    """One page of a list: its items and where it sits in the whole."""
    return {"items": items, "total": total, "page": page, "per_page": per_page}


def spec_of(schedule: Any) -> ScheduleSpec:
    """A stored schedule as the input it was made from (for ``parse_changes``)."""
    payload = dump_schedule(schedule)
    return ScheduleSpec.model_validate(
        {name: payload[name] for name in ScheduleSpec.model_fields}
    )


def timestamp(value: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes, always stored as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _validate(model: type[BaseModel], data: dict[str, Any], message: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidSchedule(message, _field_errors(exc)) from None


def _field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _CronField):
            errors.setdefault(cause.field, str(cause))
            continue
        # Drop the union tag pydantic adds inside a discriminated target.
        location = [
            str(part) for part in error["loc"] if part not in (TARGET_RPC, TARGET_EVENT)
        ]
        field = ".".join(location) or "schedule"
        reason = error["msg"].removeprefix("Value error, ")
        errors.setdefault(field, reason)
    return errors
