"""``framework db <command> SERVICE``: a service's alembic migrations.

``SERVICE`` is a service name (``services/<name>``), a service folder or a
migrations folder. The database is the one the service itself uses: its
``config.yaml`` (or ``--config``) resolved as the ``Database`` provider does (see
``framework.migrations``). ``upgrade`` is safe to repeat and to run from several
places at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from framework.cli.config import add_config_arguments, setup_config, setup_logging
from framework.exceptions import CommandError

if TYPE_CHECKING:
    from framework.migrations import ServiceMigrations

NAME = "db"


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="migrate a service's database",
        description="Manage a service's alembic migrations against its own database.",
    )
    commands = parser.add_subparsers(
        dest="db_command", metavar="<db command>", required=True
    )

    def add(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(
            name,
            help=help,
            description=f"{help[0].upper()}{help[1:]}. The config is the service "
            "folder's config.yaml unless --config is given.",
        )
        command.add_argument(
            "service",
            metavar="SERVICE",
            help="service name, service folder or migrations folder",
        )
        add_config_arguments(command, broker=False)
        command.add_argument(
            "--service-name",
            metavar="NAME",
            help="the service's `name` when it differs from its folder's",
        )
        return command

    upgrade = add("upgrade", "upgrade the database (to the newest revision by default)")
    upgrade.add_argument(
        "--revision", default="head", help="target revision (default: head)"
    )
    upgrade.add_argument(
        "--sql", action="store_true", help="print the SQL instead of running it"
    )

    downgrade = add("downgrade", "downgrade the database")
    downgrade.add_argument(
        "--revision", required=True, help="target revision: an id, -1, or base for all"
    )
    downgrade.add_argument(
        "--sql", action="store_true", help="print the SQL instead of running it"
    )

    add("current", "print the revision the database is at")
    add("heads", "print the newest revision(s) in the migrations folder")
    add("history", "list the revisions")

    revision = add("revision", "write a new revision file")
    revision.add_argument(
        "-m", "--message", required=True, help="what the revision does"
    )
    revision.add_argument(
        "--autogenerate",
        action="store_true",
        help="fill it in from the difference between the models and the database",
    )

    add("init", "create the service's migrations folder")
    return parser


def main(args: argparse.Namespace) -> int:
    import alembic.util
    import sqlalchemy.exc

    from framework.migrations import SERVICE_CONFIG_FILE, ServiceMigrations
    from framework.utils import sanitize_url

    # env.py imports the service's models; console scripts do not put the working
    # directory on sys.path, and a project run from its checkout is not installed.
    if "." not in sys.path:
        sys.path.insert(0, ".")

    migrations = ServiceMigrations.find(
        args.service, config={}, service_name=args.service_name
    )
    if args.db_command != "init" and not migrations.directory.is_dir():
        raise CommandError(
            f"{migrations.service_name} has no migrations folder ({migrations.directory}); "
            f"create it with `framework db init {args.service}`"
        )
    config_path = args.config
    if config_path is None:
        default = migrations.directory.parent / SERVICE_CONFIG_FILE
        config_path = default if default.is_file() else None
    migrations.config = setup_config(config_path, args.define)
    setup_logging(migrations.config)

    try:
        return _run(migrations, args)
    except alembic.util.CommandError as exc:
        raise CommandError(f"{migrations.service_name}: {exc}") from None
    except sqlalchemy.exc.OperationalError as exc:
        url = sanitize_url(migrations.url())
        raise CommandError(
            f"{migrations.service_name}: database {url}: {exc.orig}"
        ) from None


def _run(migrations: ServiceMigrations, args: argparse.Namespace) -> int:
    command = args.db_command
    if command == "init":
        for path in migrations.init():
            _say(f"created {path}")
    elif command == "upgrade":
        migrations.upgrade(args.revision, sql=args.sql)
    elif command == "downgrade":
        migrations.downgrade(args.revision, sql=args.sql)
    elif command == "current":
        heads = set(migrations.heads())
        for revision in migrations.current():
            _say(f"{revision} (head)" if revision in heads else revision)
    elif command == "heads":
        for revision in migrations.heads():
            _say(revision)
    elif command == "history":
        migrations.history()
    elif command == "revision":
        for path in migrations.revision(args.message, autogenerate=args.autogenerate):
            _say(f"created {path}")
    return 0


def _say(line: str) -> None:
    sys.stdout.write(f"{line}\n")
