"""The JSON API's request and response bodies, as pydantic v2 models.

These are the one declaration of each shape: routes validate with them, and the
OpenAPI document (``openapi.py``) is generated from them. Shapes the other services
publish (jobs, files, schedules, runs) are theirs, imported from their
``schemas.py``, so the API cannot drift from what it forwards.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.conversions.schemas import (
    CURSOR_MAX_LENGTH,
    FormatsPayload,
    JobPage,
    JobPayload,
    JobState,
)
from services.conversions.schemas import MAX_PER_PAGE as MAX_JOBS_PER_PAGE
from services.scheduler.schemas import (
    Run,
    RunPage,
    Schedule,
    ScheduleChanges,
    ScheduleDetail,
    SchedulePage,
    ScheduleSpec,
)
from services.users.schemas import (
    DISPLAY_NAME_MAX_LENGTH,
    EMAIL_MAX_LENGTH,
    PASSWORD_MAX_LENGTH,
)
from services.users.schemas import (
    MAX_PER_PAGE as MAX_USERS_PER_PAGE,
)

__all__ = [
    "ConversionQuery",
    "ConversionRequest",
    "FileCreated",
    "FormatsPayload",
    "JobPage",
    "JobPayload",
    "PasswordReset",
    "Problem",
    "Run",
    "RunPage",
    "RunQuery",
    "Schedule",
    "ScheduleChanges",
    "ScheduleDetail",
    "SchedulePage",
    "ScheduleQuery",
    "ScheduleSpec",
    "SystemStatus",
    "TokenCreated",
    "TokenInfo",
    "TokenRequest",
    "UploadQuery",
    "UserChanges",
    "UserCreate",
    "UserOut",
    "UserPage",
    "UserQuery",
]

TOKEN_NAME_MAX_LENGTH = 100
FILE_NAME_MAX_LENGTH = 255


class _Input(BaseModel):
    # Unknown fields are refused, not ignored: a typo must not silently do nothing.
    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------


class Problem(BaseModel):
    """An RFC 9457 problem (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: dict[str, str] | None = Field(
        default=None, description="the reason for each refused field"
    )


# -- tokens ---------------------------------------------------------------------------


class TokenRequest(_Input):
    email: str = Field(max_length=EMAIL_MAX_LENGTH)
    password: str = Field(max_length=PASSWORD_MAX_LENGTH)
    name: str = Field(min_length=1, max_length=TOKEN_NAME_MAX_LENGTH)


class TokenInfo(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="the token's first characters, to tell it apart")
    created_at: str
    last_used_at: str | None


class TokenCreated(TokenInfo):
    token: str = Field(description="the bearer token; shown this once, never again")


# -- files and conversions ------------------------------------------------------------


class UploadQuery(_Input):
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=FILE_NAME_MAX_LENGTH,
        description="the file's name (for a raw body; multipart bodies carry it)",
    )


class FileCreated(BaseModel):
    id: str
    name: str
    size: int
    format: str
    owner: int | None
    created_at: str


class ConversionRequest(_Input):
    file_id: str = Field(min_length=1, max_length=64)
    target_format: str = Field(min_length=1, max_length=32)
    options: dict[str, Any] = Field(default_factory=dict)


class ConversionQuery(_Input):
    state: JobState | None = None
    page: int = Field(default=1, ge=1, le=1_000_000)
    per_page: int = Field(default=20, ge=1, le=MAX_JOBS_PER_PAGE)
    # A page's next_cursor: the next page starts right after its last job, even
    # if newer jobs arrived meanwhile (``page`` is then only echoed back).
    after: str | None = Field(default=None, min_length=1, max_length=CURSOR_MAX_LENGTH)


# -- users ----------------------------------------------------------------------------


class UserOut(BaseModel):
    id: int
    email: str
    display_name: str
    role: Literal["admin", "member"]
    is_active: bool
    created_at: str
    updated_at: str


class UserPage(BaseModel):
    items: list[UserOut]
    total: int
    page: int
    per_page: int
    pages: int


class UserQuery(_Input):
    page: int = Field(default=1, ge=1, le=1_000_000)
    per_page: int = Field(default=20, ge=1, le=MAX_USERS_PER_PAGE)
    text: str | None = Field(default=None, max_length=200)


class UserCreate(_Input):
    email: str = Field(max_length=EMAIL_MAX_LENGTH)
    password: str = Field(max_length=PASSWORD_MAX_LENGTH)
    display_name: str = Field(max_length=DISPLAY_NAME_MAX_LENGTH)
    role: Literal["admin", "member"] = "member"


class UserChanges(_Input):
    email: str | None = Field(default=None, max_length=EMAIL_MAX_LENGTH)
    display_name: str | None = Field(default=None, max_length=DISPLAY_NAME_MAX_LENGTH)
    role: Literal["admin", "member"] | None = None
    is_active: bool | None = None


class PasswordReset(_Input):
    # The rules (length...) are the users service's, checked there: one place.
    password: str = Field(max_length=PASSWORD_MAX_LENGTH)


# -- schedules ------------------------------------------------------------------------


class ScheduleQuery(_Input):
    page: int = Field(default=1, ge=1, le=1_000_000)
    per_page: int = Field(default=50, ge=1, le=200)


class RunQuery(ScheduleQuery):
    pass


# -- system ---------------------------------------------------------------------------


class ServiceHealth(BaseModel):
    name: str
    ready: bool
    detail: str


class QueueInfo(BaseModel):
    name: str
    messages: int
    consumers: int


class DeadLetterInfo(BaseModel):
    queue: str = Field(description="the queue whose messages were dead-lettered")
    messages: int


class SystemStatus(BaseModel):
    services: list[ServiceHealth]
    queues: list[QueueInfo]
    dead_letters: list[DeadLetterInfo]
    broker_error: str | None = None
