"""Settings that depend on where the application runs: development or production.

Every service starts with no settings at all on a developer's machine, which means
its secrets (session key, admin password, database password) have development
defaults that are written down in this repository. ``ENVIRONMENT=production``
(in the service's config or in the process environment) turns those defaults
into a refusal to start, with a message naming each setting still at its
default, so a forgotten variable stops a deploy instead of shipping a published
password.

A service declares its secrets once, with their development defaults::

    class UsersService:
        secrets = ProductionSecrets({"ADMIN_PASSWORD": "admin-dev-password"})

and the container refuses to start (``ConfigurationError`` from ``setup()``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

ENVIRONMENT_CONFIG_KEY = "ENVIRONMENT"
PRODUCTION = "production"
DEVELOPMENT = "development"

# compose.yaml's PostgreSQL password when POSTGRES_PASSWORD is not set. Every
# service that connects to PostgreSQL lists DEVELOPMENT_DATABASE_SECRET among its
# development secrets, so no production database runs with it (only the password
# inside the URL is compared, whatever the host and database).
DEVELOPMENT_DATABASE_PASSWORD = "postgres-dev-password"
DEVELOPMENT_DATABASE_SECRET = {
    "DATABASE_URL": f"postgresql://postgres:{DEVELOPMENT_DATABASE_PASSWORD}@postgres/app"
}


def environment(config: Mapping[str, Any]) -> str:
    """The configured environment name; the config wins over the process env."""
    value = config.get(ENVIRONMENT_CONFIG_KEY) or os.environ.get(ENVIRONMENT_CONFIG_KEY)
    return str(value).strip().lower() if value else DEVELOPMENT


def is_production(config: Mapping[str, Any]) -> bool:
    # Either place may say production: a config file that pins "development"
    # must not hide an operator's ENVIRONMENT=production, and the other way round.
    values = (
        config.get(ENVIRONMENT_CONFIG_KEY),
        os.environ.get(ENVIRONMENT_CONFIG_KEY),
    )
    return any(str(value).strip().lower() == PRODUCTION for value in values if value)


def _url_password(value: str) -> str | None:
    """The password inside a URL such as ``postgresql://user:pw@host/db``, if any."""
    if "://" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return None


def _is_default(value: Any, default: str) -> bool:
    if value is None:
        return False
    text = str(value)
    default_password = _url_password(default)
    if default_password is not None:
        # A database URL's host and name change between deployments; what must
        # not survive into production is the development password inside it.
        return _url_password(text) == default_password
    return text == default


def defaults_in_use(
    config: Mapping[str, Any], defaults: Mapping[str, str]
) -> list[str]:
    """The keys of ``defaults`` whose configured value is still the default."""
    return [
        key
        for key, default in defaults.items()
        if _is_default(config.get(key), default)
    ]


def check_production_secrets(
    config: Mapping[str, Any], defaults: Mapping[str, str]
) -> None:
    """In production, refuse any secret still at its development default.

    ``defaults`` maps a config key to its development default. For a URL default
    (a database URL) only the password inside it is compared. The message names
    the keys, never the values.
    """
    if not is_production(config):
        return
    offending = defaults_in_use(config, defaults)
    if offending:
        raise ConfigurationError(
            f"{ENVIRONMENT_CONFIG_KEY}={PRODUCTION} refuses development default "
            f"secrets; set a real value for: {', '.join(offending)}"
        )


class ProductionSecrets(DependencyProvider[None]):
    """Runs :func:`check_production_secrets` at container setup.

    Injects nothing useful (``None``): declaring it on the service is the point.
    """

    def __init__(self, defaults: Mapping[str, str]) -> None:
        self.defaults = dict(defaults)

    def setup(self) -> None:
        check_production_secrets(self.container.config, self.defaults)

    def get_dependency(self, worker_ctx: WorkerContext) -> None:
        return None
