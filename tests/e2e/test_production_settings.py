"""ENVIRONMENT=production and nothing else set: compose.yaml's services refuse to
start, naming each development default secret, never showing its value."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from framework.settings import DEVELOPMENT_DATABASE_PASSWORD

from .compose import ROOT, Compose, LocalApp

# What each service must name when only ENVIRONMENT=production is set.
EXPECTED = {
    "users": {"ADMIN_PASSWORD", "DATABASE_URL"},
    "web": {"SECRET_KEY"},
}
DEFAULT_VALUES = (
    "admin-dev-password",
    DEVELOPMENT_DATABASE_PASSWORD,
    "web-development-secret-key-not-for-production",
)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_service_refuses_its_development_secrets_in_production(
    name: str, make_app: Any, tmp_path: Path
) -> None:
    if not (ROOT / "services" / name / "service.py").exists():
        pytest.skip(f"services/{name} has not landed yet")
    app: LocalApp = make_app(env={"ENVIRONMENT": "production"})
    process = app.start(name)
    try:
        code = process.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        pytest.fail(f"{name} started in production with development secrets")
    output = process.output()
    assert code != 0, output
    for key in EXPECTED[name]:
        assert key in output, output
    for value in DEFAULT_VALUES:
        assert value not in output


def test_production_with_real_secrets_is_accepted_by_users(make_app: Any) -> None:
    compose = Compose(
        env={
            "ENVIRONMENT": "production",
            "POSTGRES_PASSWORD": "a-real-password",
            "ADMIN_PASSWORD": "a-real-admin-password",
        }
    )
    app: LocalApp = make_app()
    app.compose = compose
    app.up(["users"])
    (process,) = app.replicas("users")
    assert app.check_health(process).returncode == 0
