"""A throwaway PostgreSQL database per test module (or bench run).

Tests that run in parallel on one server must not share a database: each module
creates its own under a random name, migrates it with its service's revisions and
drops it at the end, ``WITH (FORCE)`` so a replica a test killed cannot hold it open.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def run_on_server(statement: str, server: str = DEFAULT_SERVER) -> None:
    """Run ``statement`` outside a transaction (``CREATE DATABASE`` needs that)."""
    # Imported here: the pytest plugin imports this package before monkey patching.
    import psycopg2

    connection = psycopg2.connect(f"{server}/postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def create_database(prefix: str, server: str = DEFAULT_SERVER) -> str:
    """A new empty database named ``<prefix>_<random>``; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    run_on_server(f'CREATE DATABASE "{name}"', server)
    return f"{server}/{name}"


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (created by ``create_database``), if it exists."""
    server, name = url.rsplit("/", 1)
    run_on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', server)


def migrate(service_dir: Path, url: str) -> None:
    """Upgrade the database at ``url`` to the newest revision of a service's
    ``migrations/``."""
    from framework.migrations import ServiceMigrations

    ServiceMigrations.find(service_dir, config={"DATABASE_URL": url}).upgrade()


@contextmanager
def fresh_database(
    prefix: str, service_dir: Path | None = None, server: str = DEFAULT_SERVER
) -> Iterator[str]:
    """A new database for the block, migrated when ``service_dir`` is given,
    dropped on exit (even when migrating failed)."""
    url = create_database(prefix, server)
    try:
        if service_dir is not None:
            migrate(service_dir, url)
        yield url
    finally:
        drop_database(url)


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement in its own committed transaction; the rows it returned."""
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()
