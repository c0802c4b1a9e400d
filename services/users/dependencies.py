"""The users service's own extensions: its table, password hashing, the first admin.

* ``UserStore``: the framework's ``Database`` provider, injecting a
  ``UserRepository`` (the queries the service needs) instead of a bare session;
* ``PasswordHasher``: argon2id hashing, run off the eventlet hub;
* ``AdminSettings``: the first admin account's configuration, checked at setup.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

EMAIL_INDEX_NAME = "uq_users_email"

# Enough of an argon2 PHC string ("$argon2id$v=19$m=65536,t=3,p=4$salt$hash") to
# hold its parameters whatever their values.
HASH_PARAMETERS_PREFIX_LENGTH = 64
# How long the parameters of the stand-in hash are trusted before being looked up
# again (one grouping query over the table).
STAND_IN_REFRESH_SECONDS = 60.0


def hash_parameters(password_hash: str) -> str | None:
    """The parameters of an argon2id hash (``m=65536,t=3,p=4``), from its PHC
    string or a prefix of it holding them; ``None`` for anything else."""
    parts = password_hash.split("$")
    if len(parts) < 5 or parts[1] != "argon2id" or not parts[3].startswith("m="):
        return None
    return parts[3]


# Transient database failures (a lost connection, a serialization failure, a
# deadlock) re-run the whole transaction: at most twice more, after 50 ms then
# 100 ms (jittered).
transactional = transaction_retry(
    session=operator.attrgetter("users.session"), total=2, backoff_factor=0.05
)
"""Decorates a service method that is one transaction over ``self.users``."""


# -- the users table -----------------------------------------------------------------


class UserRepository:
    """One worker's view of the users table, over the worker's session.

    Reads run in the worker's transaction; writes are only flushed. A change
    is committed by ``transaction()``, so one call's several steps (check the
    email, insert the row, record its event in the outbox) commit together or
    not at all.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit what the block did, or roll it all back if it raises.

        A clash on the email index at commit becomes ``EmailAlreadyRegistered``.
        """
        try:
            yield
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            if _is_email_clash(exc):
                raise EmailAlreadyRegistered(
                    "this email is already registered"
                ) from None
            raise
        except BaseException:
            self.session.rollback()
            raise

    # Reads are safe to run again, so on their own (outside a transaction) they
    # retry a transient failure.
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
        statement = select(User).where(User.email == normalise_email(email))
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

    @transaction_retry(session=operator.attrgetter("session"))
    def usual_hash_parameters(self) -> str | None:
        """The argon2 parameters most stored hashes were made with
        (``m=65536,t=3,p=4``), or ``None`` while there are no users."""
        prefix = func.substr(User.password_hash, 1, HASH_PARAMETERS_PREFIX_LENGTH)
        statement = (
            select(prefix, func.count())
            .group_by(prefix)
            .order_by(func.count().desc(), prefix)
        )
        counts: dict[str, int] = {}
        for stored_prefix, count in self.session.execute(statement):
            parameters = hash_parameters(stored_prefix)
            if parameters is not None:
                counts[parameters] = counts.get(parameters, 0) + count
        if not counts:
            return None
        return max(sorted(counts), key=counts.__getitem__)

    def add(self, user: User) -> User:
        """Insert ``user``, flushed so that it has its id (and a clash on the email
        index surfaces here, inside ``transaction()``, which reports it)."""
        self.session.add(user)
        self.session.flush()
        return user

    def flush(self) -> None:
        """Send the changes made to loaded users (so the row is updated and
        locked now, and ``updated_at`` is set); committed by ``transaction()``."""
        self.session.flush()

    def delete(self, user: User) -> None:
        self.session.delete(user)
        self.session.flush()


def _is_email_clash(exc: IntegrityError) -> bool:
    # PostgreSQL names the violated index; SQLite names the column.
    message = str(exc.orig)
    return EMAIL_INDEX_NAME in message or "users.email" in message


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
        # Stand-in hashes by parameters: verified against when there is no
        # account, so that "no such email" costs what "wrong password" costs.
        self._stand_ins: dict[str, str] = {}
        self._current_parameters = (
            f"m={hasher.memory_cost},t={hasher.time_cost},p={hasher.parallelism}"
        )
        self._usual: tuple[float, str | None] | None = None

    def hash(self, password: str) -> str:
        # argon2 spends tens of milliseconds of CPU on purpose; in an OS thread,
        # since the C code releases the GIL, the hub keeps serving other workers.
        return concurrency.run_in_thread(self._hasher.hash, password)

    def verify(self, password_hash: str | None, password: Any) -> bool:
        """Whether ``password`` matches; ``password_hash=None`` is never a match
        (it is verified against a stand-in, so that it costs the same)."""
        if not isinstance(password, str):
            return False
        try:
            concurrency.run_in_thread(
                self._hasher.verify,
                password_hash or self._stand_in(self._current_parameters),
                password,
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

    def stand_in_hash(self, usual_parameters: Callable[[], str | None]) -> str:
        """The hash to verify a password against when no account has the email.

        Made with the parameters most stored hashes have (``usual_parameters``,
        looked up at most once a minute), not the configured ones: after the
        cost is raised, most accounts keep their old hash until their next
        login, and a stand-in at the new cost would make "no such email" slower
        than "wrong password", telling which emails have accounts.
        """
        now = time.monotonic()
        if self._usual is None or now - self._usual[0] > STAND_IN_REFRESH_SECONDS:
            self._usual = (now, usual_parameters())
        return self._stand_in(self._usual[1] or self._current_parameters)

    def _stand_in(self, parameters: str) -> str:
        stand_in = self._stand_ins.get(parameters)
        if stand_in is None:
            hasher = _hasher_with(parameters, self._hasher)
            stand_in = self._stand_ins[parameters] = concurrency.run_in_thread(
                hasher.hash, STAND_IN_PASSWORD
            )
        return stand_in

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than the current ones."""
        return self._hasher.check_needs_rehash(password_hash)


STAND_IN_PASSWORD = "no account has this password"


def _hasher_with(parameters: str, like: argon2.PasswordHasher) -> argon2.PasswordHasher:
    """A hasher making hashes with ``parameters`` (``m=...,t=...,p=...``)."""
    values = dict(item.split("=", 1) for item in parameters.split(","))
    return argon2.PasswordHasher(
        time_cost=int(values["t"]),
        memory_cost=int(values["m"]),
        parallelism=int(values["p"]),
        hash_len=like.hash_len,
        salt_len=like.salt_len,
    )


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
