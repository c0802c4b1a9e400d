"""Fixtures for the scheduler's tests.

Unit tests (``test_schemas``, ``test_planning``) need neither broker nor database:
the policies are pure functions of a schedule and the time. Integration tests use
the real RabbitMQ (a fresh vhost per test, ``rabbit_config``) and the real
PostgreSQL (a fresh database per module, migrated with the service's revisions,
emptied between tests). Targets are real services in the same vhost; the only
thing replaced is time, by moving ``next_fire_at`` into the past as an outage would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

import services.scheduler
from framework.migrations import ServiceMigrations

SERVICE_DIR = Path(services.scheduler.__file__).parent
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


def migrate(url: str) -> None:
    ServiceMigrations.find(SERVICE_DIR, config={"DATABASE_URL": url}).upgrade()


def create_database(prefix: str = "scheduler_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    run_on_server(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[-1]
    run_on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_on_server(statement: str) -> None:
    connection = psycopg2.connect(f"{PG_SERVER}/postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database for the module, at the newest revision."""
    url = create_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def pg_scheduler(pg_url: str) -> Iterator[str]:
    """``pg_url`` with no schedules (the built-ins removed) for each test."""
    query(pg_url, "TRUNCATE runs, schedules RESTART IDENTITY")
    yield pg_url


@pytest.fixture
def config(rabbit_config: dict[str, Any], pg_scheduler: str) -> dict[str, Any]:
    return {**rabbit_config, "DATABASE_URL": pg_scheduler}
