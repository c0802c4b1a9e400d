"""The conversions service's migrations build exactly its models, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework.migrations import assert_migrations_match_models
from framework.testing import postgres
from services.conversions.models import Base

from .conftest import SERVICE_DIR


@pytest.fixture
def pg_empty_database() -> Iterator[str]:
    with postgres.fresh_database("conversions_drift") as url:
        yield url


def test_the_migrations_build_exactly_the_models(pg_empty_database: str) -> None:
    # autogenerate against a freshly migrated database finds nothing to add.
    assert_migrations_match_models(SERVICE_DIR, Base.metadata, pg_empty_database)
