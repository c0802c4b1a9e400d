"""ENVIRONMENT=production refuses development default secrets."""

from __future__ import annotations

import pytest

from framework.exceptions import ConfigurationError
from framework.settings import (
    ProductionSecrets,
    check_production_secrets,
    environment,
    is_production,
)
from framework.testing.services import dummy, entrypoint_hook

DEFAULTS = {
    "SECRET_KEY": "dev-secret-key",
    "ADMIN_PASSWORD": "dev-admin-password",
    "DATABASE_URL": "postgresql://app:dev-db-password@postgres:5432/users",
}


@pytest.fixture(autouse=True)
def no_environment_variable(monkeypatch):
    monkeypatch.delenv("ENVIRONMENT", raising=False)


def test_development_accepts_every_default():
    check_production_secrets(dict(DEFAULTS), DEFAULTS)
    check_production_secrets({**DEFAULTS, "ENVIRONMENT": "development"}, DEFAULTS)


def test_production_names_each_secret_still_at_its_default():
    config = {**DEFAULTS, "ENVIRONMENT": "production", "SECRET_KEY": "s3cr3t-real"}
    with pytest.raises(ConfigurationError) as raised:
        check_production_secrets(config, DEFAULTS)
    message = str(raised.value)
    assert "ADMIN_PASSWORD" in message
    assert "DATABASE_URL" in message
    assert "SECRET_KEY" not in message
    # Names, never values.
    assert "dev-admin-password" not in message
    assert "dev-db-password" not in message


def test_production_from_the_process_environment(monkeypatch):
    monkeypatch.setenv("ENVIRONMENT", "Production")
    assert is_production({})
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        check_production_secrets({"SECRET_KEY": "dev-secret-key"}, DEFAULTS)


def test_a_database_url_is_judged_by_its_password_only():
    config = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": "real",
        "ADMIN_PASSWORD": "real",
        # Another host and database, same development password: refused.
        "DATABASE_URL": "postgresql://app:dev-db-password@db.internal/prod",
    }
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        check_production_secrets(config, DEFAULTS)
    config["DATABASE_URL"] = "postgresql://app:a-real-one@db.internal/prod"
    check_production_secrets(config, DEFAULTS)


def test_production_with_real_secrets_starts():
    config = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": "k",
        "ADMIN_PASSWORD": "p",
        "DATABASE_URL": "postgresql://app:x@db/users",
    }
    check_production_secrets(config, DEFAULTS)
    assert environment(config) == "production"
    assert environment({}) == "development"


class Guarded:
    name = "guarded"
    secrets = ProductionSecrets({"ADMIN_PASSWORD": "dev-admin-password"})

    @dummy
    def ping(self):
        return "pong"


def test_a_container_refuses_to_start_in_production_with_a_default(container_factory):
    container = container_factory(
        Guarded, {"ENVIRONMENT": "production", "ADMIN_PASSWORD": "dev-admin-password"}
    )
    with pytest.raises(ConfigurationError, match="ADMIN_PASSWORD"):
        container.start()


def test_a_container_starts_in_production_with_a_real_secret(container_factory):
    container = container_factory(
        Guarded, {"ENVIRONMENT": "production", "ADMIN_PASSWORD": "real-one"}
    )
    container.start()
    with entrypoint_hook(container, "ping") as ping:
        assert ping() == "pong"
