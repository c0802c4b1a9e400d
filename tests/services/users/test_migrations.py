"""The users service's migrations: they build exactly its models (on PostgreSQL),
and they bring existing rows along (on SQLite files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from framework.migrations import ServiceMigrations, assert_migrations_match_models
from services.users.models import Base

from .conftest import SERVICE_DIR, create_database, drop_database


@pytest.fixture
def pg_empty_database() -> Iterator[str]:
    url = create_database("users_drift")
    yield url
    drop_database(url)


def test_the_migrations_build_exactly_the_models(pg_empty_database: str) -> None:
    # autogenerate against a freshly migrated database finds nothing to add.
    assert_migrations_match_models(SERVICE_DIR, Base.metadata, pg_empty_database)


def migrations_at(url: str) -> ServiceMigrations:
    return ServiceMigrations.find(SERVICE_DIR, config={"DATABASE_URL": url})


def insert_users(url: str, *emails: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for email in emails:
            connection.execute(
                sa.text(
                    "INSERT INTO users (email, display_name, role, is_active,"
                    " password_hash, created_at, updated_at) VALUES (:email, 'x',"
                    " 'member', 1, 'x', '2026-01-01', '2026-01-01')"
                ),
                {"email": email},
            )
    engine.dispose()


def test_the_upgrade_normalises_the_emails_already_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    migrations = migrations_at(url)
    migrations.upgrade("0001")
    insert_users(url, "Ann@Example.com", "ΣΑΣ@example.com", "bob@example.com")

    migrations.upgrade()

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        emails = connection.execute(sa.text("SELECT email FROM users ORDER BY id"))
        assert [email for (email,) in emails] == [
            "ann@example.com",
            "σασ@example.com",
            "bob@example.com",
        ]
    engine.dispose()


def test_the_upgrade_stops_at_two_accounts_with_one_identity(tmp_path: Path) -> None:
    # What the old lower() index let through: ΣΑΣ and σας are one email.
    url = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    migrations = migrations_at(url)
    migrations.upgrade("0001")
    insert_users(url, "ΣΑΣ@example.com", "σας@example.com")

    with pytest.raises(RuntimeError, match="user ids.*1, 2"):
        migrations.upgrade()
    assert migrations.current() == ("0001",)
