"""Fixtures for the users service's tests.

Unit tests (``test_schemas``, ``test_service``, ``test_dependencies``) run the
service's methods through ``worker_factory`` on a SQLite file migrated with the
service's own alembic revisions; only the event dispatcher is a mock, because
who hears an event is outside the service. Integration tests use the real
RabbitMQ (a fresh vhost per test, ``rabbit_config``) and the real PostgreSQL (a
fresh database per module, migrated with ``framework.migrations``, dropped after).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2
import psycopg2
import pytest
import sqlalchemy.orm

import services.users
from framework.database import Session, create_engine
from framework.migrations import ServiceMigrations
from framework.testing.services import worker_factory
from services.users.dependencies import (
    PASSWORD_HASHING_CONFIG_KEY,
    Passwords,
    UserRepository,
)
from services.users.service import UsersService

SERVICE_DIR = Path(services.users.__file__).parent
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"

# argon2 at its cheapest: the tests are about behaviour, not about hash strength.
FAST_HASHING = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the service's newest revision."""
    ServiceMigrations.find(SERVICE_DIR, config={"DATABASE_URL": url}).upgrade()


@pytest.fixture
def passwords() -> Passwords:
    return Passwords(
        argon2.PasswordHasher(
            time_cost=FAST_HASHING["time_cost"],
            memory_cost=FAST_HASHING["memory_cost"],
            parallelism=FAST_HASHING["parallelism"],
        )
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    migrate(url)
    return url


@pytest.fixture
def db_session(sqlite_url: str) -> Iterator[sqlalchemy.orm.Session]:
    engine = create_engine(sqlite_url)
    session = sqlalchemy.orm.sessionmaker(bind=engine, class_=Session)()
    yield session
    session.close()
    engine.dispose()


@pytest.fixture
def repository(db_session: sqlalchemy.orm.Session) -> UserRepository:
    return UserRepository(db_session)


@pytest.fixture
def make_service(repository: UserRepository, passwords: Passwords) -> Any:
    """``make_service(**dependencies)``: a ``UsersService`` worker on the SQLite file.

    Defaults: the repository and fast password hashing for real, no first admin
    configured, and a ``MagicMock`` dispatcher.
    """

    def make(**dependencies: Any) -> Any:
        defaults = {"users": repository, "passwords": passwords, "first_admin": None}
        return worker_factory(UsersService, **{**defaults, **dependencies})

    return make


@pytest.fixture
def service(make_service: Any) -> Any:
    return make_service()


# -- PostgreSQL ------------------------------------------------------------------------


def create_database(prefix: str = "users_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _run_on_server(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[-1]
    # FORCE: a connection a killed container left open must not keep it alive.
    _run_on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_on_server(statement: str) -> None:
    connection = psycopg2.connect(f"{PG_SERVER}/postgres")
    try:
        connection.autocommit = True  # CREATE/DROP DATABASE refuse a transaction
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, at the newest revision."""
    url = create_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def pg_users(pg_url: str) -> Iterator[str]:
    """``pg_url`` with an empty users table (ids restart at 1) for each test."""
    yield pg_url
    connection = psycopg2.connect(pg_url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("TRUNCATE users RESTART IDENTITY")
    finally:
        connection.close()


@pytest.fixture
def config(rabbit_config: dict[str, Any], pg_users: str) -> dict[str, Any]:
    """The service's config for a test: its own vhost and the module's database."""
    return {
        **rabbit_config,
        "DATABASE_URL": pg_users,
        PASSWORD_HASHING_CONFIG_KEY: FAST_HASHING,
    }


# -- the service as a process --------------------------------------------------------------

PROJECT_DIR = SERVICE_DIR.parent.parent
FRAMEWORK = str(Path(sys.executable).parent / "framework")
ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "root password"
START_TIMEOUT = 60  # seconds for the process to answer RPC
STOP_TIMEOUT = 30  # seconds for it to exit after SIGTERM


@pytest.fixture
def empty_database() -> Iterator[str]:
    url = create_database("users_e2e")
    yield url
    drop_database(url)


@pytest.fixture
def environment(rabbit_config: dict[str, Any], empty_database: str) -> dict[str, str]:
    """What an operator would set: the config.yaml reads all of it."""
    return {
        **os.environ,
        "AMQP_URI": rabbit_config["AMQP_URI"],
        "DATABASE_URL": empty_database,
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "ARGON2_TIME_COST": "1",
        "ARGON2_MEMORY_COST": "8",
        "ARGON2_PARALLELISM": "1",
    }


def framework(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Output to a file, not a pipe: nobody reads a pipe while the service runs,
    # and a full one would block its logging.
    with open(log, "ab") as output:
        return subprocess.Popen(
            [FRAMEWORK, *args],
            cwd=PROJECT_DIR,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
