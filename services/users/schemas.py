"""What goes in and out of the users service: its published contract.

Payloads are plain JSON types (timestamps are ISO 8601 strings in UTC), so any
caller, nameko included, reads them without our kombu's type markers. The
``parse_*`` functions validate what callers send and raise ``InvalidUserData``
listing every bad field at once, not just the first.

A password hash never appears in any payload or event.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

from services.users.exceptions import InvalidUserData

__all__ = [
    "DEFAULT_PER_PAGE",
    "MAX_PER_PAGE",
    "ROLES",
    "ROLE_ADMIN",
    "ROLE_MEMBER",
    "UPDATABLE_FIELDS",
    "USER_CREATED",
    "USER_DELETED",
    "USER_UPDATED",
    "NewUser",
    "UserCreatedEvent",
    "UserDeletedEvent",
    "UserPage",
    "UserPayload",
    "UserQuery",
    "UserUpdatedEvent",
    "dump_page",
    "dump_user",
    "normalise_email",
    "parse_changes",
    "parse_new_user",
    "parse_password",
    "parse_query",
    "parse_user_id",
    "reject_malformed_text",
]

ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
ROLES = (ROLE_ADMIN, ROLE_MEMBER)

# Event types, dispatched from the ``users.events`` exchange.
USER_CREATED = "user_created"
USER_UPDATED = "user_updated"
USER_DELETED = "user_deleted"

EMAIL_MAX_LENGTH = 254  # RFC 5321's limit on a forward path
DISPLAY_NAME_MAX_LENGTH = 100
PASSWORD_MIN_LENGTH = 8
# argon2 would hash a megabyte happily, slowly: a cap keeps a login request from
# being a way to burn our CPU.
PASSWORD_MAX_LENGTH = 1024

# User ids are PostgreSQL ``integer`` keys; anything beyond cannot name a user.
MAX_USER_ID = 2**31 - 1

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
# Past this page nothing can be found (there are at most MAX_USER_ID users), and
# the row offset of a larger one overflows PostgreSQL's bigint.
MAX_PAGE = MAX_USER_ID

# What ``update_user`` may change; the password has its own methods
# (``change_password``, which checks the old one, and the admins' ``reset_password``).
UPDATABLE_FIELDS = ("email", "display_name", "role", "is_active")

# Deliberately loose: one @, something on both sides, a dot in the domain, no
# spaces. Whether the address works is for a confirmation email to find out.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


# -- payloads ------------------------------------------------------------------------


class UserPayload(TypedDict):
    id: int
    email: str
    display_name: str
    role: str  # one of ROLES
    is_active: bool
    created_at: str  # ISO 8601, UTC
    updated_at: str  # ISO 8601, UTC


class UserPage(TypedDict):
    items: list[UserPayload]
    total: int  # matching users on all pages
    page: int
    per_page: int
    pages: int  # number of pages; 0 when nothing matches


class UserCreatedEvent(TypedDict):
    user: UserPayload


class UserUpdatedEvent(TypedDict):
    user: UserPayload  # as it is after the change
    changed: list[str]  # sorted field names; "password" for a password change
    # Only in ``reset_password``'s event, always True: an admin replaced the
    # password, so whatever the old one opened (API tokens too) should end.
    reset: NotRequired[bool]


class UserDeletedEvent(TypedDict):
    user: UserPayload  # as it was before the deletion


def dump_user(user: Any) -> UserPayload:
    """The payload of a user row (anything with the model's attributes)."""
    return {
        "id": user.id,
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role,
        "is_active": user.is_active,
        "created_at": _timestamp(user.created_at),
        "updated_at": _timestamp(user.updated_at),
    }


def dump_page(users: list[Any], total: int, query: UserQuery) -> UserPage:
    return {
        "items": [dump_user(user) for user in users],
        "total": total,
        "page": query.page,
        "per_page": query.per_page,
        "pages": math.ceil(total / query.per_page),
    }


def _timestamp(value: datetime) -> str:
    # SQLite hands back naive datetimes even for timezone-aware columns; we only
    # ever store UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


# -- validated input ---------------------------------------------------------------


@dataclass(frozen=True)
class NewUser:
    email: str
    password: str
    display_name: str
    role: str


@dataclass(frozen=True)
class UserQuery:
    page: int
    per_page: int
    text: str | None
    role: str | None

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


def normalise_email(email: str) -> str:
    """An email's identity: how it is stored, compared and looked up.

    The one place emails are normalised: surrounding whitespace dropped, then
    Unicode NFKC and full case folding (NFKC again after folding, as Unicode's
    NFKC_Casefold does). Lower-casing is not enough: Python's ``lower()`` and
    PostgreSQL's ``lower()`` disagree on letters such as final sigma (ΣΑΣ is
    "σας" to one, "σασ" to the other) and dotted İ, so an account registered as
    ``ΣΑΣ@example.com`` could not be found by the same string, and its
    lower-case twin registered as a second account. Folded once, here, both
    sides compare plain stored strings.
    """
    folded = unicodedata.normalize("NFKC", email.strip()).casefold()
    return unicodedata.normalize("NFKC", folded)


def reject_malformed_text(**fields: Any) -> None:
    """``InvalidUserData`` for any string that no column can store (a NUL
    character, a lone surrogate); other values are left to their own checks."""
    errors: dict[str, str] = {}
    for field, value in fields.items():
        if isinstance(value, str):
            _check(errors, field, _string, value)
    if errors:
        raise InvalidUserData("invalid text", errors)


def parse_new_user(email: Any, password: Any, display_name: Any, role: Any) -> NewUser:
    errors: dict[str, str] = {}
    checked = {
        "email": _check(errors, "email", _email, email),
        "password": _check(errors, "password", _password, password),
        "display_name": _check(errors, "display_name", _display_name, display_name),
        "role": _check(errors, "role", _role, role),
    }
    if errors:
        raise InvalidUserData("invalid user data", errors)
    return NewUser(**checked)


def parse_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The validated subset of ``update_user``'s keyword arguments."""
    errors: dict[str, str] = {}
    checks = {
        "email": _email,
        "display_name": _display_name,
        "role": _role,
        "is_active": _flag,
    }
    checked = {}
    for field, value in changes.items():
        if field == "password":
            errors[field] = (
                "cannot be changed here; use change_password or reset_password"
            )
        elif field not in checks:
            errors[field] = (
                f"unknown field; updatable fields are {', '.join(UPDATABLE_FIELDS)}"
            )
        else:
            checked[field] = _check(errors, field, checks[field], value)
    if errors:
        raise InvalidUserData("invalid changes", errors)
    return checked


def parse_password(password: Any, field: str = "password") -> str:
    errors: dict[str, str] = {}
    checked = _check(errors, field, _password, password)
    if errors:
        raise InvalidUserData("invalid password", errors)
    return checked


def parse_user_id(user_id: Any) -> int:
    errors: dict[str, str] = {}
    checked = _check(errors, "user_id", _integer, user_id)
    if errors:
        raise InvalidUserData("invalid user id", errors)
    return checked


def parse_query(page: Any, per_page: Any, text: Any, role: Any) -> UserQuery:
    errors: dict[str, str] = {}
    checked = {
        "page": _check(errors, "page", _page_number, page),
        "per_page": _check(errors, "per_page", _per_page, per_page),
        "text": _check(errors, "text", _search_text, text),
        "role": None if role is None else _check(errors, "role", _role, role),
    }
    if errors:
        raise InvalidUserData("invalid query", errors)
    return UserQuery(**checked)


# -- field checks: each returns the cleaned value or raises ValueError(reason) --------


def _check(errors: dict[str, str], field: str, check: Any, value: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        errors[field] = str(exc)
        return None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    # PostgreSQL text cannot hold NUL, and a lone surrogate cannot be encoded
    # as UTF-8 (for the database, argon2, or a JSON reply).
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _email(value: Any) -> str:
    email = normalise_email(_string(value))
    if len(email) > EMAIL_MAX_LENGTH:
        raise ValueError(f"must be at most {EMAIL_MAX_LENGTH} characters")
    if not _EMAIL.match(email):
        raise ValueError("not an email address")
    return email


def _password(value: Any) -> str:
    password = _string(value)
    if len(password) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"must be at least {PASSWORD_MIN_LENGTH} characters")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise ValueError(f"must be at most {PASSWORD_MAX_LENGTH} characters")
    return password


def _display_name(value: Any) -> str:
    name = _string(value).strip()
    if not name:
        raise ValueError("must not be empty")
    if len(name) > DISPLAY_NAME_MAX_LENGTH:
        raise ValueError(f"must be at most {DISPLAY_NAME_MAX_LENGTH} characters")
    return name


def _role(value: Any) -> str:
    if value not in ROLES:
        raise ValueError(f"must be one of {', '.join(ROLES)}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _integer(value: Any) -> int:
    # bool is an int in Python; page=True is a caller's bug, not page 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    return value


def _page_number(value: Any) -> int:
    page = _integer(value)
    if not 1 <= page <= MAX_PAGE:
        raise ValueError(f"must be between 1 and {MAX_PAGE}")
    return page


def _per_page(value: Any) -> int:
    per_page = _integer(value)
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"must be between 1 and {MAX_PER_PAGE}")
    return per_page


def _search_text(value: Any) -> str | None:
    if value is None:
        return None
    text = _string(value).strip()
    return text or None
