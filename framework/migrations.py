"""Alembic migrations, one history per service, against the service's own database.

Each service keeps its migrations next to its code::

    services/<name>/
      config.yaml          # the config the service runs with
      migrations/
        env.py             # five lines: run_migrations(context, Base)
        script.py.mako     # template for new revisions
        versions/          # the revisions

There is no ``alembic.ini``: ``framework db ...`` builds alembic's configuration
from the service folder. The database URL is never written down twice: ``env.py``
asks ``run_migrations`` for it, which reads the service's ``config.yaml`` (with the
same ``${ENV}`` substitution as ``framework run``) and resolves it with
``framework.database.database_url``, as the ``Database`` provider does.

Upgrades may run from several places at once (every replica at start-up, say): on
PostgreSQL the migration holds ``pg_advisory_lock`` keyed by the service name, on a
SQLite file an exclusive lock on ``<database file>.migrations.lock``. Whoever comes
second waits, then finds the database already at the target revision and does
nothing, so an upgrade is also safe to repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from framework.database import database_url, engine_options, normalise_url
from framework.exceptions import CommandError

log = logging.getLogger(__name__)

__all__ = [
    "MIGRATIONS_DIR",
    "MigrationDrift",
    "ServiceMigrations",
    "assert_migrations_match_models",
    "migration_lock",
    "run_migrations",
]

SERVICES_DIR = "services"
MIGRATIONS_DIR = "migrations"
SERVICE_CONFIG_FILE = "config.yaml"
ENV_FILE = "env.py"
TEMPLATE_FILE = "script.py.mako"
VERSIONS_DIR = "versions"

# How ``run_migrations`` finds the service when alembic runs its env.py.
_ALEMBIC_ATTRIBUTE = "framework.service_migrations"


@dataclasses.dataclass
class ServiceMigrations:
    """One service's migrations folder, its name and the config it runs with."""

    service_name: str
    directory: Path
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def find(
        cls,
        target: str | os.PathLike[str],
        config: dict[str, Any] | None = None,
        service_name: str | None = None,
    ) -> ServiceMigrations:
        """From a service name, a service folder or a migrations folder.

        The service name defaults to the service folder's name; the config to the
        service folder's ``config.yaml`` (empty if there is none).
        """
        directory = _migrations_directory(Path(target))
        service_dir = directory.parent
        if config is None:
            config_file = service_dir / SERVICE_CONFIG_FILE
            config = load_config(config_file) if config_file.is_file() else {}
        return cls(service_name or service_dir.name, directory, config)

    def url(self, declarative_base_name: str | None = None) -> str:
        return database_url(self.config, self.service_name, declarative_base_name)

    def engine(self, declarative_base_name: str | None = None) -> Engine:
        """A pool-less engine: a migration is one connection, used once."""
        options = engine_options(self.config)
        # Pool sizing in DB_ENGINE_OPTIONS is for the service; NullPool rejects it.
        connect_args = options.get("connect_args") or {}
        url = normalise_url(self.url(declarative_base_name))
        # hide_parameters: a data migration's parameters are the service's data
        # (emails, hashes); a failed one must not print them.
        return sqlalchemy.create_engine(
            url, poolclass=NullPool, connect_args=connect_args, hide_parameters=True
        )

    def alembic_config(self) -> AlembicConfig:
        config = AlembicConfig()
        config.set_main_option("script_location", str(self.directory))
        config.attributes[_ALEMBIC_ATTRIBUTE] = self
        return config

    # -- commands -------------------------------------------------------------------

    def upgrade(self, revision: str = "head", sql: bool = False) -> None:
        command.upgrade(self.alembic_config(), revision, sql=sql)

    def downgrade(self, revision: str, sql: bool = False) -> None:
        command.downgrade(self.alembic_config(), revision, sql=sql)

    def revision(self, message: str, autogenerate: bool = False) -> list[Path]:
        """Write a new revision file; with ``autogenerate``, diffed from the models."""
        scripts = command.revision(
            self.alembic_config(), message, autogenerate=autogenerate
        )
        if not isinstance(scripts, list):
            scripts = [scripts]
        return [Path(script.path) for script in scripts if script is not None]

    def drift(self, metadata: sqlalchemy.MetaData) -> list[Any]:
        """What alembic's autogenerate would write to bring the database to
        ``metadata``: empty when the migrations build exactly the models.

        Column types are compared too (``compare_type``); server defaults are
        not, since the models set theirs in Python.
        """
        engine = self.engine()
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection, opts={"compare_type": True}
                )
                return list(compare_metadata(context, metadata))
        finally:
            engine.dispose()

    def current(self) -> tuple[str, ...]:
        """The revisions the database is at (empty before the first upgrade)."""
        engine = self.engine()
        try:
            with engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_heads()
        finally:
            engine.dispose()

    def heads(self) -> tuple[str, ...]:
        """The newest revisions in the migrations folder."""
        return tuple(ScriptDirectory.from_config(self.alembic_config()).get_heads())

    def history(self) -> None:
        command.history(self.alembic_config())

    def init(self) -> list[Path]:
        """Create whatever of ``env.py``, the template and ``versions/`` is missing."""
        created: list[Path] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, content in (
            (ENV_FILE, _env_py(self.directory)),
            (TEMPLATE_FILE, SCRIPT_TEMPLATE),
        ):
            path = self.directory / name
            if not path.exists():
                path.write_text(content, encoding="utf-8")
                created.append(path)
        versions = self.directory / VERSIONS_DIR
        if not versions.exists():
            versions.mkdir()
            # git keeps no empty folders, and alembic needs this one.
            (versions / ".gitkeep").touch()
            created.append(versions)
        return created


def load_config(path: Path) -> dict[str, Any]:
    # The CLI's loader, so ${ENV} substitution is exactly what `framework run` does.
    from framework.cli.config import load_config as load_cli_config

    return load_cli_config(path)


def _migrations_directory(target: Path) -> Path:
    service_dirs = [target]
    if len(target.parts) == 1 and not target.exists():
        service_dirs.append(Path(SERVICES_DIR) / target)  # a service name
    for candidate in (target, *(d / MIGRATIONS_DIR for d in service_dirs)):
        if (candidate / ENV_FILE).is_file():
            return candidate.resolve()
    # No env.py yet: where `framework db init` is to create one.
    if target.name == MIGRATIONS_DIR and target.parent.is_dir():
        return target.resolve()
    for service_dir in service_dirs:
        if service_dir.is_dir():
            return (service_dir / MIGRATIONS_DIR).resolve()
    raise CommandError(
        f"no service found for {str(target)!r}: give a service name, a service "
        f"folder or a migrations folder"
    )


# -- env.py ------------------------------------------------------------------------------


def run_migrations(
    context: Any, target: Any = None, service_name: str | None = None
) -> None:
    """The body of every service's ``env.py``.

    ``target`` is the service's declarative base (its name selects a ``DB_URIS``
    entry, as for the ``Database`` provider), a ``MetaData``, or ``None`` when
    revisions are never autogenerated.
    """
    migrations = _current_service(context, service_name)
    metadata = getattr(target, "metadata", target)
    base_name = getattr(target, "__name__", None)

    if context.is_offline_mode():
        # `--sql`: write the SQL out; there is no connection to lock.
        context.configure(
            url=migrations.url(base_name),
            target_metadata=metadata,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = migrations.engine(base_name)
    try:
        with engine.connect() as connection:
            with migration_lock(connection, migrations.service_name):
                context.configure(connection=connection, target_metadata=metadata)
                with context.begin_transaction():
                    context.run_migrations()
    finally:
        engine.dispose()


def _current_service(context: Any, service_name: str | None) -> ServiceMigrations:
    migrations = context.config.attributes.get(_ALEMBIC_ATTRIBUTE)
    if migrations is None:
        # Run by the plain `alembic` command: find the service from the folder.
        script_location = context.config.get_main_option("script_location")
        migrations = ServiceMigrations.find(script_location)
    if service_name is not None:
        migrations = dataclasses.replace(migrations, service_name=service_name)
    return migrations


# -- drift between models and migrations --------------------------------------------------


class MigrationDrift(AssertionError):
    """The models declare something the migrations do not build (or the reverse)."""


def assert_migrations_match_models(
    service: str | os.PathLike[str],
    metadata: sqlalchemy.MetaData,
    database_url: str,
) -> None:
    """For a service's tests: migrate the (empty) database at ``database_url`` to
    head, then fail with ``MigrationDrift`` if alembic's autogenerate finds any
    difference from ``metadata``: a model changed without a migration, or a
    migration the models do not reflect. ``service`` is its folder (or its
    migrations folder)::

        def test_migrations_build_the_models(pg_empty_database):
            assert_migrations_match_models(SERVICE_DIR, Base.metadata, pg_empty_database)
    """
    migrations = ServiceMigrations.find(service, config={"DATABASE_URL": database_url})
    migrations.upgrade()
    differences = migrations.drift(metadata)
    if differences:
        listed = "\n".join(f"  {difference!r}" for difference in differences)
        raise MigrationDrift(
            f"{migrations.service_name}: the migrations do not build the models; "
            f"autogenerate would add:\n{listed}\n"
            f"write a revision: framework db revision {migrations.service_name} "
            "--autogenerate -m '...'"
        )


# -- locking -----------------------------------------------------------------------------


def lock_key(service_name: str) -> int:
    """A stable signed 64-bit advisory lock key for the service's migrations."""
    digest = hashlib.blake2b(
        f"framework.migrations:{service_name}".encode(), digest_size=8
    )
    return int.from_bytes(digest.digest(), "big", signed=True)


@contextlib.contextmanager
def migration_lock(connection: Connection, service_name: str) -> Iterator[None]:
    """Only one migration of this service's database at a time.

    Taken and committed before alembic begins its own transaction, so the version
    check alembic makes inside it sees what the previous holder committed.
    """
    dialect = connection.dialect.name
    sqlite_file = _sqlite_file(connection) if dialect == "sqlite" else None
    if dialect == "postgresql":
        with _advisory_lock(connection, lock_key(service_name)):
            yield
    elif sqlite_file is not None:
        with _file_lock(Path(f"{sqlite_file}.migrations.lock")):
            yield
    else:
        if dialect != "sqlite":  # an in-memory database has a single user
            log.warning(
                "no cross-process lock for migrations on this database; "
                "do not run two upgrades at once",
                extra={"service": service_name, "dialect": dialect},
            )
        yield


@contextlib.contextmanager
def _advisory_lock(connection: Connection, key: int) -> Iterator[None]:
    log.info("waiting for the migration lock", extra={"lock_key": key})
    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    connection.commit()  # the lock is session-level: it outlives this transaction
    try:
        yield
    finally:
        try:
            connection.rollback()  # a failed migration leaves an aborted transaction
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key}
            )
            connection.commit()
        except sqlalchemy.exc.SQLAlchemyError:
            # The lock belongs to the session: it goes when the connection closes.
            log.warning("could not release the migration lock", exc_info=True)


def _sqlite_file(connection: Connection) -> str | None:
    database = connection.engine.url.database
    if (
        not database
        or database == ":memory:"
        or connection.engine.url.query.get("mode") == "memory"
    ):
        return None
    return database


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# -- templates ---------------------------------------------------------------------------


def _env_py(directory: Path) -> str:
    service_dir = directory.parent
    if service_dir.parent.name == SERVICES_DIR:
        return ENV_TEMPLATE.format(
            service=service_dir.name,
            target_import=f"from services.{service_dir.name}.models import Base\n",
            target="Base",
        )
    return ENV_TEMPLATE.format(
        service=service_dir.name, target_import="", target="None"
    )


ENV_TEMPLATE = '''"""Alembic environment of the {service} service: see framework.migrations."""

from alembic import context

from framework.migrations import run_migrations
{target_import}
run_migrations(context, {target})
'''

SCRIPT_TEMPLATE = '''"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''
