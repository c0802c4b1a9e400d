"""The web service's migrations build exactly its models, on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from framework.migrations import assert_migrations_match_models
from services.web.models import Base

from .conftest import WEB_DIR

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"

pytestmark = pytest.mark.integration


def _run_on_server(statement: str) -> None:
    connection = psycopg2.connect(f"{PG_SERVER}/postgres")
    try:
        connection.autocommit = True  # CREATE/DROP DATABASE refuse a transaction
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture
def pg_empty_database() -> Iterator[str]:
    name = f"web_drift_{uuid.uuid4().hex[:12]}"
    _run_on_server(f'CREATE DATABASE "{name}"')
    yield f"{PG_SERVER}/{name}"
    _run_on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_migrations_build_exactly_the_models(pg_empty_database: str) -> None:
    assert_migrations_match_models(WEB_DIR, Base.metadata, pg_empty_database)
