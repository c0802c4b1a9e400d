"""``framework.testing.postgres``: a database per module, created and dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

import services.scheduler
from framework.testing.postgres import fresh_database, query

pytestmark = pytest.mark.integration


def database_exists(url: str) -> bool:
    server, name = url.rsplit("/", 1)
    rows = query(
        f"{server}/postgres", "SELECT 1 FROM pg_database WHERE datname = %s", name
    )
    return bool(rows)


def test_a_fresh_database_is_migrated_and_dropped_after_the_block() -> None:
    service_dir = Path(services.scheduler.__file__).parent
    with fresh_database("testing_postgres", service_dir) as url:
        assert url.rsplit("/", 1)[1].startswith("testing_postgres_")
        assert database_exists(url)
        # The service's revisions ran: its table is there.
        assert query(url, "SELECT count(*) FROM schedules")[0][0] >= 0
        query(url, "CREATE TABLE scratch (id integer)")
        query(url, "INSERT INTO scratch VALUES (%s)", 7)
        assert query(url, "SELECT id FROM scratch") == [(7,)]
    assert not database_exists(url)


def test_the_database_is_dropped_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), fresh_database("testing_postgres") as url:
        raise RuntimeError("the test failed")
    assert not database_exists(url)
