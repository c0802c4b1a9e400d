"""The errors the web service answers with, and how every error becomes a response.

Each HTTP-facing failure is a ``WebError`` with its status. ``problem_for`` maps any
exception (ours, the other services' published ones, pydantic's validation errors,
werkzeug's) to an RFC 9457 problem: a status, a title, a detail safe to show, and
per-field ``errors`` where there are some. Anything unexpected is a 500 whose
body says nothing about what went wrong; the details go to the log only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from framework.exceptions import RpcTimeout, UnknownService
from services.conversions.exceptions import (
    FileNotFound,
    InvalidOptions,
    JobNotFound,
    JobStateConflict,
    UnsupportedConversion,
)
from services.scheduler.exceptions import InvalidSchedule, ScheduleNotFound
from services.users.exceptions import (
    AuthenticationFailed,
    EmailAlreadyRegistered,
    InvalidUserData,
    UserNotFound,
)

log = logging.getLogger(__name__)

__all__ = [
    "BadRequest",
    "CsrfFailed",
    "Forbidden",
    "NotAuthenticated",
    "NotFound",
    "PayloadTooLarge",
    "Problem",
    "TooManyAttempts",
    "Unprocessable",
    "WebError",
    "problem_for",
]


class WebError(Exception):
    """A failure the caller caused or may see; ``status`` is its HTTP status."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str = "", errors: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = dict(errors or {})


class BadRequest(WebError):
    status = 400
    title = "Bad request"


class NotAuthenticated(WebError):
    status = 401
    title = "Authentication required"


class Forbidden(WebError):
    status = 403
    title = "Forbidden"


class CsrfFailed(Forbidden):
    title = "CSRF check failed"


class NotFound(WebError):
    status = 404
    title = "Not found"


class Conflict(WebError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(WebError):
    status = 413
    title = "Payload too large"


class Unprocessable(WebError):
    status = 422
    title = "Invalid input"


class TooManyAttempts(WebError):
    status = 429
    title = "Too many attempts"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after} seconds")
        self.retry_after = retry_after


class ServiceUnavailable(WebError):
    status = 503
    title = "Service unavailable"


@dataclass
class Problem:
    """An RFC 9457 problem: what the API sends as ``application/problem+json``."""

    status: int
    title: str
    detail: str
    errors: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


# The other services' published errors, by the status they mean at the edge.
_STATUS: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((UserNotFound, JobNotFound, FileNotFound, ScheduleNotFound), 404, "Not found"),
    ((EmailAlreadyRegistered, JobStateConflict), 409, "Conflict"),
    (
        (InvalidUserData, InvalidOptions, InvalidSchedule, UnsupportedConversion),
        422,
        "Invalid input",
    ),
    ((AuthenticationFailed,), 401, "Authentication failed"),
    ((RpcTimeout, UnknownService), 503, "Service unavailable"),
)


# What routes expect to fail with: answered with its own status and message, and
# not logged as an error of the service.
EXPECTED_EXCEPTIONS: tuple[type[BaseException], ...] = (
    WebError,
    ValidationError,
    *(error for types, _, _ in _STATUS for error in types),
)


def problem_for(exc: BaseException) -> Problem:
    """The problem to answer ``exc`` with; never leaks an unexpected error's text."""
    if isinstance(exc, TooManyAttempts):
        return Problem(
            exc.status,
            exc.title,
            exc.detail,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, WebError):
        return Problem(exc.status, exc.title, exc.detail, exc.errors)
    if isinstance(exc, ValidationError):
        return Problem(422, "Invalid input", "the request was refused", _fields(exc))
    if isinstance(exc, HTTPException):
        code = exc.code or 500
        return Problem(code, exc.name, exc.description or exc.name)
    for types, status, title in _STATUS:
        if isinstance(exc, types):
            if status == 503:
                return Problem(status, title, "a service did not answer; try again")
            errors = getattr(exc, "errors", None)
            message = getattr(exc, "message", None) or str(exc)
            return Problem(
                status, title, message, dict(errors) if isinstance(errors, dict) else {}
            )
    return Problem(500, "Internal error", "an internal error occurred")


def _fields(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "body"
        errors.setdefault(name, error["msg"])
    return errors
