"""Fixtures for the scheduler's tests.

Unit tests (``test_schemas``, ``test_planning``) need neither broker nor database:
the policies are pure functions of a schedule and the time. Integration tests use
the real RabbitMQ (a fresh vhost per test, ``rabbit_config``) and the real
PostgreSQL (a fresh database per module, migrated with the service's revisions,
emptied between tests). Targets are real services in the same vhost; the only
thing replaced is time, by moving ``next_fire_at`` into the past as an outage would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import services.scheduler
from framework.testing import postgres
from framework.testing.postgres import query

SERVICE_DIR = Path(services.scheduler.__file__).parent


def migrate(url: str) -> None:
    postgres.migrate(SERVICE_DIR, url)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database for the module, at the newest revision."""
    with postgres.fresh_database("scheduler_test", SERVICE_DIR) as url:
        yield url


@pytest.fixture
def pg_scheduler(pg_url: str) -> Iterator[str]:
    """``pg_url`` with no schedules (the built-ins removed) for each test."""
    query(pg_url, "TRUNCATE runs, schedules RESTART IDENTITY")
    yield pg_url


@pytest.fixture
def config(rabbit_config: dict[str, Any], pg_scheduler: str) -> dict[str, Any]:
    return {**rabbit_config, "DATABASE_URL": pg_scheduler}
