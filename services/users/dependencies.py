"""The users service's own extensions: its table, password hashing, the first admin.

* ``UserStore``: the framework's ``Database`` provider, injecting a
  ``UserRepository`` (the queries the service needs) instead of a bare session;
* ``PasswordHasher``: argon2id hashing, run off the eventlet hub;
* ``AdminSettings``: the first admin account's configuration, checked at setup.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import argon2
import argon2.exceptions
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from framework import concurrency
from framework.database import EngineProvider, transaction_retry
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider
from services.users.exceptions import (
    EmailAlreadyRegistered,
    InvalidUserData,
    UserNotFound,
)
from services.users.models import User
from services.users.schemas import (
    MAX_USER_ID,
    ROLE_ADMIN,
    UserQuery,
    normalise_email,
    parse_new_user,
    parse_user_id,
)

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

# -- config keys ---------------------------------------------------------------------
ADMIN_EMAIL_CONFIG_KEY = "ADMIN_EMAIL"
ADMIN_PASSWORD_CONFIG_KEY = "ADMIN_PASSWORD"
ADMIN_DISPLAY_NAME_CONFIG_KEY = "ADMIN_DISPLAY_NAME"
# A mapping of argon2 parameters: time_cost, memory_cost (KiB), parallelism.
PASSWORD_HASHING_CONFIG_KEY = "PASSWORD_HASHING"

DEFAULT_ADMIN_DISPLAY_NAME = "Administrator"

# The development defaults compose.yaml and the one-process mode start with, so that
# the application runs with no settings at all. With ENVIRONMENT=production the
# service refuses to start while any of them is still in use (framework.settings).
# For the database URL only the password inside it counts.
DEVELOPMENT_ADMIN_PASSWORD = "admin-dev-password"
DEVELOPMENT_DATABASE_PASSWORD = "postgres-dev-password"
DEVELOPMENT_SECRETS = {
    ADMIN_PASSWORD_CONFIG_KEY: DEVELOPMENT_ADMIN_PASSWORD,
    "DATABASE_URL": f"postgresql://postgres:{DEVELOPMENT_DATABASE_PASSWORD}@postgres/users",
}
PASSWORD_HASHING_PARAMETERS = ("time_cost", "memory_cost", "parallelism")

EMAIL_INDEX_NAME = "uq_users_email_lower"


# -- the users table -----------------------------------------------------------------


class UserRepository:
    """One worker's view of the users table. Writes commit at once."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # Reads are safe to run again, so they retry on a connection the server dropped.
    @transaction_retry(session=operator.attrgetter("session"))
    def get(self, user_id: Any) -> User:
        user_id = parse_user_id(user_id)
        # Out of the key's range PostgreSQL would fail the query instead of
        # finding nothing.
        in_range = 1 <= user_id <= MAX_USER_ID
        user = self.session.get(User, user_id) if in_range else None
        if user is None:
            raise UserNotFound(f"no user with id {user_id}")
        return user

    @transaction_retry(session=operator.attrgetter("session"))
    def find_by_email(self, email: Any) -> User | None:
        if not isinstance(email, str):
            return None
        statement = select(User).where(
            func.lower(User.email) == normalise_email(email).lower()
        )
        return self.session.scalars(statement).one_or_none()

    @transaction_retry(session=operator.attrgetter("session"))
    def active_admin_exists(self) -> bool:
        statement = (
            select(User.id).where(User.role == ROLE_ADMIN, User.is_active).limit(1)
        )
        return self.session.scalars(statement).first() is not None

    @transaction_retry(session=operator.attrgetter("session"))
    def search(self, query: UserQuery) -> tuple[list[User], int]:
        """One page of matching users, oldest first, and how many match in all."""
        statement = select(User)
        if query.text is not None:
            pattern = f"%{_escape_like(query.text)}%"
            statement = statement.where(
                or_(
                    User.email.ilike(pattern, escape="\\"),
                    User.display_name.ilike(pattern, escape="\\"),
                )
            )
        if query.role is not None:
            statement = statement.where(User.role == query.role)
        total = self.session.scalar(
            select(func.count()).select_from(statement.subquery())
        )
        page = statement.order_by(User.id).offset(query.offset).limit(query.per_page)
        return list(self.session.scalars(page)), total or 0

    def add(self, user: User) -> User:
        self.session.add(user)
        self.save()
        return user

    def save(self) -> None:
        """Commit; a clash on the email index becomes ``EmailAlreadyRegistered``."""
        try:
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            # Both PostgreSQL and SQLite name the violated index in the message.
            if EMAIL_INDEX_NAME in str(exc.orig):
                raise EmailAlreadyRegistered(
                    "this email is already registered"
                ) from None
            raise

    def delete(self, user: User) -> None:
        self.session.delete(user)
        self.session.commit()


def _escape_like(text: str) -> str:
    # A user searching for "50%" means the characters, not a wildcard.
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class UserStore(EngineProvider[UserRepository]):
    """The framework's engine provider (engine, sessions, teardown) injecting a
    ``UserRepository`` over the worker's session."""

    def get_dependency(self, worker_ctx: WorkerContext) -> UserRepository:
        return UserRepository(self.worker_database(worker_ctx).session)


# -- passwords ------------------------------------------------------------------------


class Passwords:
    """argon2id hashing and verification (what ``PasswordHasher`` injects)."""

    def __init__(self, hasher: argon2.PasswordHasher) -> None:
        self._hasher = hasher
        # Verified against when there is no account, so that "no such email" takes
        # as long as "wrong password" and response times do not reveal accounts.
        self._stand_in_hash = hasher.hash("no account has this password")

    def hash(self, password: str) -> str:
        # argon2 spends tens of milliseconds of CPU on purpose; in an OS thread,
        # since the C code releases the GIL, the hub keeps serving other workers.
        return concurrency.run_in_thread(self._hasher.hash, password)

    def verify(self, password_hash: str | None, password: Any) -> bool:
        """Whether ``password`` matches; ``password_hash=None`` is never a match."""
        if not isinstance(password, str):
            return False
        try:
            concurrency.run_in_thread(
                self._hasher.verify, password_hash or self._stand_in_hash, password
            )
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (
            argon2.exceptions.VerificationError,
            argon2.exceptions.InvalidHashError,
        ):
            log.warning("stored password hash cannot be verified", exc_info=True)
            return False
        return password_hash is not None

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than the current ones."""
        return self._hasher.check_needs_rehash(password_hash)


class PasswordHasher(DependencyProvider[Passwords]):
    """Injects ``Passwords``, with argon2 parameters from ``PASSWORD_HASHING``.

    Without that key argon2-cffi's defaults apply (RFC 9106's low-memory profile).
    Hashes record their parameters, so changing them later is safe: old hashes
    still verify and are upgraded at the next successful login.
    """

    passwords: Passwords

    def setup(self) -> None:
        parameters = self.container.config.get(PASSWORD_HASHING_CONFIG_KEY) or {}
        unknown = set(parameters) - set(PASSWORD_HASHING_PARAMETERS)
        if unknown:
            raise ConfigurationError(
                f"{PASSWORD_HASHING_CONFIG_KEY} has unknown keys {sorted(unknown)}; "
                f"it takes {', '.join(PASSWORD_HASHING_PARAMETERS)}"
            )
        self.passwords = Passwords(argon2.PasswordHasher(**parameters))

    def get_dependency(self, worker_ctx: WorkerContext) -> Passwords:
        return self.passwords


# -- the first admin -------------------------------------------------------------------


@dataclass(frozen=True)
class FirstAdmin:
    email: str
    password: str
    display_name: str


class AdminSettings(DependencyProvider[FirstAdmin | None]):
    """Injects the configured first admin (``FirstAdmin``), or ``None`` if unset.

    ``ADMIN_EMAIL`` without a valid ``ADMIN_PASSWORD`` stops the service at setup,
    with the reason, rather than at the first login attempt.
    """

    admin: FirstAdmin | None

    def setup(self) -> None:
        config = self.container.config
        email = config.get(ADMIN_EMAIL_CONFIG_KEY)
        if not email:
            self.admin = None
            return
        display_name = (
            config.get(ADMIN_DISPLAY_NAME_CONFIG_KEY) or DEFAULT_ADMIN_DISPLAY_NAME
        )
        password = config.get(ADMIN_PASSWORD_CONFIG_KEY)
        try:
            new = parse_new_user(email, password, display_name, ROLE_ADMIN)
        except InvalidUserData as exc:
            fields = {
                "email": ADMIN_EMAIL_CONFIG_KEY,
                "password": ADMIN_PASSWORD_CONFIG_KEY,
                "display_name": ADMIN_DISPLAY_NAME_CONFIG_KEY,
            }
            reasons = "; ".join(
                f"{fields[field]} {reason}" for field, reason in exc.errors.items()
            )
            raise ConfigurationError(
                f"invalid first admin settings: {reasons}"
            ) from None
        self.admin = FirstAdmin(new.email, new.password, new.display_name)

    def get_dependency(self, worker_ctx: WorkerContext) -> FirstAdmin | None:
        return self.admin
