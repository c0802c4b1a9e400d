"""Fixtures for the conversions service's tests.

The engine's tests (``test_engine``) call it in this process on small files made
on the fly. Unit tests (``test_service``) run the service's methods through
``worker_factory`` on a SQLite file migrated with the service's own revisions,
with the real storage in a temporary folder; only the event dispatcher and the job
publisher are mocks, as who hears them is outside the service. Integration tests
use the real RabbitMQ (a fresh vhost per test) and the real PostgreSQL (a fresh
database per module, migrated, dropped after), with the service in a container or
in ``framework run`` processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.orm

import services.conversions
from framework.database import Session, create_engine
from framework.storage import FileStorage
from framework.testing import postgres
from services.conversions.dependencies import JobRepository

SERVICE_DIR = Path(services.conversions.__file__).parent


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "storage"
    folder.mkdir()
    return folder


@pytest.fixture
def storage(storage_dir: Path) -> FileStorage:
    return FileStorage(str(storage_dir))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'conversions.sqlite3'}"
    postgres.migrate(SERVICE_DIR, url)
    return url


@pytest.fixture
def repository(sqlite_url: str) -> Iterator[JobRepository]:
    engine = create_engine(sqlite_url)
    session = sqlalchemy.orm.sessionmaker(bind=engine, class_=Session)()
    yield JobRepository(session)
    session.close()
    engine.dispose()


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, at the newest revision."""
    with postgres.fresh_database("conversions_test", SERVICE_DIR) as url:
        yield url


@pytest.fixture
def config(
    rabbit_config: dict[str, Any], pg_url: str, storage_dir: Path
) -> dict[str, Any]:
    """The service's config for a test: its own vhost, the module's database."""
    return {
        **rabbit_config,
        "DATABASE_URL": pg_url,
        "STORAGE_URL": str(storage_dir),
        "MAX_CONCURRENT_CONVERSIONS": 2,
        "CONVERSION_HEARTBEAT_INTERVAL": 0.2,
        "CONVERSION_STALE_AFTER": 2,
    }


def csv_bytes(rows: int, columns: int = 6) -> bytes:
    """A CSV of ``rows`` deterministic rows: ints, text with commas, floats."""
    header = ",".join(f"c{i}" for i in range(columns))
    lines = [header]
    for row in range(rows):
        lines.append(
            ",".join(
                f'"text {row}, {i}"' if i % 3 == 1 else str(row * 31 + i)
                for i in range(columns)
            )
        )
    return ("\n".join(lines) + "\n").encode()
