"""``framework.migrations``: per-service alembic against the service's own database.

Each test builds a throwaway service folder in a tmp dir. SQLite tests run
in-process; the PostgreSQL ones run ``framework db`` as real subprocesses against
a fresh database, because "two replicas upgrade at once" is about processes.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from framework import concurrency
from framework.database import DB_URIS_KEY, Database, normalise_url
from framework.exceptions import CommandError
from framework.migrations import (
    MigrationDrift,
    ServiceMigrations,
    assert_migrations_match_models,
    lock_key,
)
from framework.testing.services import dummy

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"

FIRST_REVISION = '''
"""create items"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("items")
'''

SECOND_REVISION = '''
"""add items.price"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("price", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("items", "price")
'''


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    price: Mapped[int | None]


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    """``<tmp>/shop`` with migrations (two revisions) and no config yet."""
    directory = tmp_path / "shop"
    directory.mkdir()
    migrations = ServiceMigrations.find(directory)
    migrations.init()
    versions = migrations.directory / "versions"
    (versions / "0001_create_items.py").write_text(FIRST_REVISION)
    (versions / "0002_add_price.py").write_text(SECOND_REVISION)
    return directory


def write_config(service_dir: Path, text: str) -> None:
    (service_dir / "config.yaml").write_text(textwrap.dedent(text))


def columns(url: str, table: str = "items") -> list[str]:
    engine = sa.create_engine(normalise_url(url))
    try:
        return [column["name"] for column in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


# -- finding a service's migrations ----------------------------------------------------


def test_a_service_is_found_by_folder_migrations_folder_or_name(
    service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = (service_dir / "migrations").resolve()
    assert ServiceMigrations.find(service_dir).directory == expected
    assert ServiceMigrations.find(service_dir / "migrations").directory == expected

    services = service_dir.parent / "services"
    services.mkdir()
    service_dir.rename(services / "shop")
    monkeypatch.chdir(service_dir.parent)
    found = ServiceMigrations.find("shop")
    assert found.directory == (services / "shop" / "migrations").resolve()
    assert found.service_name == "shop"


def test_an_unknown_service_is_a_command_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match="no service found for 'nowhere'"):
        ServiceMigrations.find("nowhere")


def test_init_creates_only_what_is_missing(service_dir: Path) -> None:
    migrations = ServiceMigrations.find(service_dir)
    (migrations.directory / "env.py").write_text("# customised\n")
    assert migrations.init() == []
    assert (migrations.directory / "env.py").read_text() == "# customised\n"


def test_env_py_of_a_service_under_services_imports_its_models(tmp_path: Path) -> None:
    migrations = ServiceMigrations(
        "shop", tmp_path / "services" / "shop" / "migrations"
    )
    migrations.init()
    env_py = (migrations.directory / "env.py").read_text()
    assert "from services.shop.models import Base" in env_py
    assert "run_migrations(context, Base)" in env_py


# -- the database URL ------------------------------------------------------------------


def test_migrations_read_the_services_config_with_env_substitution(
    service_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/from-env.sqlite3"
    monkeypatch.setenv("SHOP_DATABASE_URL", url)
    write_config(
        service_dir, "DATABASE_URL: ${SHOP_DATABASE_URL:sqlite:///wrong.sqlite3}\n"
    )
    migrations = ServiceMigrations.find(service_dir)
    assert migrations.url() == url
    migrations.upgrade()
    assert columns(url) == ["id", "name", "price"]


def test_migrations_use_the_same_url_as_the_database_provider(
    service_dir: Path, tmp_path: Path, container_factory: Any
) -> None:
    (service_dir / "migrations" / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context
            from sqlalchemy.orm import DeclarativeBase

            from framework.migrations import run_migrations

            class Base(DeclarativeBase):
                pass

            run_migrations(context, Base)
            """
        )
    )
    config = {
        DB_URIS_KEY: {
            "shop:Base": f"sqlite:///{tmp_path}/{{service_name}}-{{declarative_base_name}}.db"
        },
        "DATABASE_URL": f"sqlite:///{tmp_path}/not-this-one.db",
    }

    class Shop:
        name = "shop"
        db = Database(Base)

        @dummy
        def noop(self) -> None:
            pass

    container = container_factory(Shop, config)
    container.start()
    (provider,) = container.dependencies

    ServiceMigrations.find(service_dir, config=config).upgrade()
    assert provider.url == f"sqlite:///{tmp_path}/shop-Base.db"
    assert columns(provider.url) == ["id", "name", "price"]


# -- upgrading and downgrading (SQLite) --------------------------------------------------


def test_upgrade_is_idempotent_and_downgrade_goes_back(
    service_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/shop.sqlite3"
    migrations = ServiceMigrations.find(service_dir, config={"DATABASE_URL": url})
    assert migrations.current() == ()
    migrations.upgrade()
    migrations.upgrade()
    assert migrations.current() == ("0002",) == migrations.heads()
    migrations.downgrade("-1")
    assert migrations.current() == ("0001",)
    assert columns(url) == ["id", "name"]
    migrations.upgrade("0002")
    assert columns(url) == ["id", "name", "price"]


def test_revision_writes_a_file_that_upgrades(
    service_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/shop.sqlite3"
    migrations = ServiceMigrations.find(service_dir, config={"DATABASE_URL": url})
    migrations.upgrade()
    (path,) = migrations.revision("nothing yet")
    assert path.parent == migrations.directory / "versions"
    assert "down_revision = '0002'" in path.read_text()
    migrations.upgrade()
    assert migrations.current() == migrations.heads() != ("0002",)


def test_sql_mode_prints_the_migration_without_touching_the_database(
    service_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/shop.sqlite3"
    migrations = ServiceMigrations.find(service_dir, config={"DATABASE_URL": url})
    migrations.upgrade(sql=True)
    assert "CREATE TABLE items" in capsys.readouterr().out
    assert migrations.current() == ()


def test_the_drift_check_passes_when_the_migrations_build_the_models(
    service_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'drift.sqlite3'}"
    assert_migrations_match_models(service_dir, Base.metadata, url)


def test_the_drift_check_names_what_a_model_added_without_a_migration(
    service_dir: Path, tmp_path: Path
) -> None:
    class Changed(DeclarativeBase):
        pass

    class ChangedItem(Changed):
        __tablename__ = "items"

        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(100))
        price: Mapped[int | None]
        colour: Mapped[str | None] = mapped_column(sa.String(20))

    url = f"sqlite:///{tmp_path / 'drift.sqlite3'}"
    with pytest.raises(MigrationDrift, match="colour"):
        assert_migrations_match_models(service_dir, Changed.metadata, url)


def test_concurrent_cli_upgrades_on_sqlite_take_turns_on_the_lock_file(
    service_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/shop.sqlite3"
    config = service_dir / "deploy.yaml"
    config.write_text(f"DATABASE_URL: {url}\n")
    lock_file = tmp_path / "shop.sqlite3.migrations.lock"
    with open(lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        upgrades = [
            framework_db(
                "upgrade", str(service_dir), "--config", str(config), cwd=tmp_path
            )
            for _ in range(2)
        ]
        wait_for(lambda: flock_waiters(lock_file) == 2, upgrades)
        fcntl.flock(held, fcntl.LOCK_UN)
    outputs = [finish(upgrade) for upgrade in upgrades]
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1
    assert ServiceMigrations.find(
        service_dir, config={"DATABASE_URL": url}
    ).current() == ("0002",)


def flock_waiters(path: Path) -> int:
    """Processes blocked on a ``flock`` of ``path`` (Linux's /proc/locks marks them ->)."""
    inode = os.stat(path).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum("->" in line and f":{inode} " in line for line in lines)


# -- PostgreSQL, through the CLI ---------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    admin = psycopg2.connect(f"{PG_SERVER}/postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"{PG_SERVER}/{name}"
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def framework_db(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    executable = Path(sys.executable).parent / "framework"
    return subprocess.Popen(
        [str(executable), "db", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def wait_for(
    condition: Any, processes: list[subprocess.Popen[str]], timeout: float = 30
) -> None:
    """Until ``condition()`` holds; fails early if one of ``processes`` exits."""
    deadline = concurrency.Deadline(timeout)
    while not condition():
        for process in processes:
            if process.poll() is not None:
                pytest.fail(
                    f"exited early ({process.returncode}): {process.communicate()[0]}"
                )
        assert not deadline.expired(), f"still waiting after {timeout}s: {condition}"
        concurrency.sleep(0.05)


def pg_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()
    finally:
        connection.close()


def waiting_for_lock(url: str, key: int) -> int:
    """How many sessions wait for the advisory lock ``key``."""
    (row,) = pg_rows(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        f"AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = {key}",
    )
    return row[0]


@pytest.mark.integration
def test_cli_upgrade_twice_on_postgres_changes_nothing_the_second_time(
    service_dir: Path, pg_url: str
) -> None:
    write_config(service_dir, "DATABASE_URL: ${SHOP_DATABASE_URL}\n")
    env = {"SHOP_DATABASE_URL": pg_url}
    first = finish(
        framework_db("upgrade", str(service_dir), cwd=service_dir.parent, env=env)
    )
    second = finish(
        framework_db("upgrade", str(service_dir), cwd=service_dir.parent, env=env)
    )
    assert "Running upgrade 0001 -> 0002" in first
    assert "Running upgrade" not in second
    assert (
        finish(framework_db("current", "shop", cwd=service_dir.parent, env=env))
        .strip()
        .endswith("0002 (head)")
    )
    assert columns(pg_url) == ["id", "name", "price"]


@pytest.mark.integration
def test_concurrent_cli_upgrades_on_postgres_both_succeed_and_migrate_once(
    service_dir: Path, pg_url: str
) -> None:
    config = service_dir / "deploy.yaml"
    config.write_text(f"DATABASE_URL: {pg_url}\n")
    key = lock_key("shop")
    # Hold the migration lock so that both upgrades are queued on it before either
    # starts: then they really do contend, whatever the process start-up times.
    holder = psycopg2.connect(pg_url)
    holder.autocommit = True
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (key,))
        upgrades = [
            framework_db(
                "upgrade",
                str(service_dir),
                "--config",
                str(config),
                cwd=service_dir.parent,
            )
            for _ in range(2)
        ]
        wait_for(lambda: waiting_for_lock(pg_url, key) == 2, upgrades)
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        holder.close()

    outputs = [finish(upgrade) for upgrade in upgrades]
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1
    assert pg_rows(pg_url, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert columns(pg_url) == ["id", "name", "price"]


@pytest.mark.integration
def test_a_failed_migration_releases_the_lock_and_leaves_the_schema_alone(
    service_dir: Path, pg_url: str
) -> None:
    versions = service_dir / "migrations" / "versions"
    broken = SECOND_REVISION.replace(
        "def upgrade() -> None:\n",
        'def upgrade() -> None:\n    op.execute("SELECT no_such_function()")\n',
    )
    (versions / "0002_add_price.py").write_text(broken)
    migrations = ServiceMigrations.find(service_dir, config={"DATABASE_URL": pg_url})
    with pytest.raises(sa.exc.ProgrammingError):
        migrations.upgrade()
    # PostgreSQL DDL is transactional: not even revision 0001 stayed.
    assert migrations.current() == ()
    assert pg_rows(
        pg_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    ) == [(0,)]
