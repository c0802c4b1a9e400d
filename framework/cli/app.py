"""``framework app``: every service of the application in one process.

The way to try the application with nothing but Python: no RabbitMQ, no
PostgreSQL. Each service under ``services/`` (a folder with ``service.py`` and
``config.yaml``) runs in its own container, with its own config file, in this one
process, on

* the broker in ``AMQP_URI``, by default kombu's in-memory transport
  (``memory://``), which connects the containers of this process to each other;
* its own database: ``<NAME>_DATABASE_URL`` (compose.yaml's names, e.g.
  ``USERS_DATABASE_URL``), else ``DATABASE_URL`` if it holds ``{service_name}``,
  else a SQLite file ``<data dir>/<name>.sqlite3``; migrations are applied first;
* ``STORAGE_URL``, by default the folder ``<data dir>/storage``.

The users service creates the first admin (``ADMIN_EMAIL``, default
``admin@example.com``; ``ADMIN_PASSWORD``, default a random one kept in
``<data dir>/admin-password``), and the command prints the login and the panel's
address (``WEB_SERVER_ADDRESS``, default ``127.0.0.1:8000``). With ``AMQP_URI`` and
the database URLs set, the same command runs on the real broker and PostgreSQL.
Everything else comes from each service's ``config.yaml`` and the environment, as
with ``framework run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.exceptions import CommandError

log = logging.getLogger(__name__)

NAME = "app"
DEFAULT_SERVICES_DIR = "services"
DEFAULT_DATA_DIR = ".app-data"
SERVICE_MODULE = "service.py"
SERVICE_CONFIG = "config.yaml"
MEMORY_BROKER = "memory://"
ADMIN_PASSWORD_FILE = "admin-password"

# The one-process defaults, applied to the environment before the services'
# config files read it (an operator's own value always wins).
DEFAULT_ADMIN_EMAIL = "admin@example.com"
DEFAULT_WEB_SERVER_ADDRESS = "127.0.0.1:8000"
DEFAULT_HEALTH_SERVER_ADDRESS = "127.0.0.1:9000"


@dataclass
class AppService:
    name: str
    directory: Path

    @property
    def module(self) -> str:
        return f"{self.directory.parent.name}.{self.name}.service"

    @property
    def config_file(self) -> Path:
        return self.directory / SERVICE_CONFIG


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="run the whole application in one process",
        description="Run every service under services/ in this one process: on the "
        "in-memory broker and SQLite unless AMQP_URI and database URLs are set, "
        "migrations applied, the first admin created, its login printed.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="SERVICE",
        help="only these services (default: every folder of services/ with a "
        "service.py and a config.yaml)",
    )
    parser.add_argument(
        "--services-dir",
        default=DEFAULT_SERVICES_DIR,
        metavar="DIR",
        help=f"where the services are (default: {DEFAULT_SERVICES_DIR})",
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="SQLite files, stored files and the generated admin password "
        f"(default: {DEFAULT_DATA_DIR})",
    )
    return parser


def find_services(services_dir: Path, names: list[str]) -> list[AppService]:
    found = {
        path.parent.name: AppService(path.parent.name, path.parent)
        for path in sorted(services_dir.glob(f"*/{SERVICE_MODULE}"))
        if (path.parent / SERVICE_CONFIG).is_file()
    }
    if not found:
        raise CommandError(
            f"no service (a folder with {SERVICE_MODULE} and {SERVICE_CONFIG}) in {services_dir}"
        )
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise CommandError(f"no such service in {services_dir}: {', '.join(unknown)}")
    return [found[name] for name in (names or found)]


def admin_password(data_dir: Path) -> tuple[str, bool]:
    """``(password, generated)``: ``ADMIN_PASSWORD``, else the one kept in the data
    folder, else a new random one written there (readable by the owner only)."""
    configured = os.environ.get("ADMIN_PASSWORD")
    if configured:
        return configured, False
    path = data_dir / ADMIN_PASSWORD_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip(), True
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as output:
        output.write(password + "\n")
    return password, True


def database_url(service: AppService, data_dir: Path) -> str:
    own = os.environ.get(f"{service.name.upper()}_DATABASE_URL")
    if own:
        return own
    shared = os.environ.get("DATABASE_URL", "")
    if "{service_name}" in shared:
        return shared.replace("{service_name}", service.name)
    return f"sqlite:///{(data_dir / f'{service.name}.sqlite3').resolve()}"


def set_environment_defaults(data_dir: Path) -> tuple[str, bool]:
    """The one-process defaults, before any config file reads the environment."""
    password, generated = admin_password(data_dir)
    os.environ.setdefault("AMQP_URI", MEMORY_BROKER)
    os.environ.setdefault("STORAGE_URL", str((data_dir / "storage").resolve()))
    os.environ.setdefault("ADMIN_EMAIL", DEFAULT_ADMIN_EMAIL)
    os.environ["ADMIN_PASSWORD"] = password
    os.environ.setdefault("WEB_SERVER_ADDRESS", DEFAULT_WEB_SERVER_ADDRESS)
    os.environ.setdefault("HEALTH_SERVER_ADDRESS", DEFAULT_HEALTH_SERVER_ADDRESS)
    # One health server for the whole process, so one readiness URL for the panel.
    health = os.environ["HEALTH_SERVER_ADDRESS"].replace("0.0.0.0", "127.0.0.1")
    os.environ.setdefault("HEALTH_URL", f"http://{health}/health/ready")
    return password, generated


def service_config(service: AppService, data_dir: Path) -> dict[str, Any]:
    from framework.cli.config import setup_config

    config = setup_config(service.config_file)
    # The config file's own DATABASE_URL default is the service's usual server;
    # here each service gets the database chosen above.
    config["DATABASE_URL"] = database_url(service, data_dir)
    config["HEALTH_SERVER_ADDRESS"] = os.environ["HEALTH_SERVER_ADDRESS"]
    return config


def migrate(service: AppService, config: dict[str, Any]) -> None:
    from framework.migrations import ServiceMigrations

    if not (service.directory / "migrations").is_dir():
        return
    ServiceMigrations.find(service.directory, config=config).upgrade()


def main(args: argparse.Namespace) -> int:
    from framework import concurrency

    concurrency.monkey_patch()
    if sys.path[:1] != ["."]:
        sys.path.insert(0, ".")

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    services = find_services(Path(args.services_dir), args.names)
    password, generated = set_environment_defaults(data_dir)
    configs = {service.name: service_config(service, data_dir) for service in services}

    from framework.cli.config import setup_logging

    setup_logging(configs[services[0].name])
    for service in services:
        migrate(service, configs[service.name])
        log.info("migrated", extra={"service": service.name})

    return run(services, configs, banner(password, generated))


def banner(password: str, generated: bool) -> str:
    address = os.environ["WEB_SERVER_ADDRESS"].replace("0.0.0.0", "127.0.0.1")
    broker = os.environ["AMQP_URI"]
    transport = "in-memory broker" if broker.startswith("memory") else "RabbitMQ"
    shown = password if generated else "(the ADMIN_PASSWORD you set)"
    return (
        f"\nThe application is running in one process ({transport}).\n"
        f"  panel:    http://{address}\n"
        f"  login:    {os.environ['ADMIN_EMAIL']} / {shown}\n"
        f"  API:      http://{address}/api/v1/openapi.json\n"
        "Ctrl-C stops it.\n\n"
    )


def run(
    services: list[AppService], configs: dict[str, dict[str, Any]], message: str
) -> int:
    from framework.cli.run import SignalShutdown, import_services
    from framework.containers import get_service_name
    from framework.runners import ServiceRunner

    # One runner (one health server), one container per service, each with its
    # own config: in one process, a shared config could not give each service
    # its own database.
    runner = ServiceRunner(configs[services[0].name])
    for service in services:
        for service_cls in import_services(service.module):
            name = get_service_name(service_cls)
            if name in runner.service_map:
                raise CommandError(f"two services are named {name!r}")
            runner.service_map[name] = runner.container_cls(
                service_cls, configs[service.name]
            )

    shutdown = SignalShutdown(runner)
    shutdown.install()
    try:
        try:
            runner.start()
        except Exception:
            log.critical("the application failed to start", exc_info=True)
            runner.kill()
            return 1
        sys.stdout.write(message)
        sys.stdout.flush()
        try:
            runner.wait()
        except Exception:
            log.critical("a service crashed", exc_info=True)
            return 1
    finally:
        shutdown.uninstall()
    return 0
