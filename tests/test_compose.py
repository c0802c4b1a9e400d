"""compose.yaml (and the Dockerfile it builds) describe a runnable system.

The structure is checked from the YAML itself, so these tests need no Docker; the
compose tool's own validation runs when ``docker-compose`` (or the ``docker
compose`` plugin) is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from framework.constants import HEALTH_SERVER_CONFIG_KEY
from framework.health import READY_PATH

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
USERS_CONFIG = "services/users/config.yaml"

# Read from the environment by the framework itself, not through config.yaml.
FRAMEWORK_ENV_VARS = {"LOG_FORMAT", "LOG_LEVEL"}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def services() -> dict[str, Any]:
    return load_compose()["services"]


def users_config_env_vars() -> set[str]:
    """The ``${NAME...}`` names services/users/config.yaml substitutes."""
    text = (ROOT / USERS_CONFIG).read_text(encoding="utf-8")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}`` for either spelling of ``depends_on``."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {
        name: (spec or {}).get("condition", "service_started")
        for name, spec in deps.items()
    }


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_is_valid_for_docker_compose() -> None:
    tool = compose_command()
    if tool is None:
        pytest.skip(
            "docker-compose is not installed (nor the docker compose plugin): "
            "`apt-get install docker-compose` to validate compose.yaml with it; "
            "the YAML structure tests in this file run without it"
        )
    result = subprocess.run(
        [*tool, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_broker_with_management_and_the_database_with_a_healthcheck() -> (
    None
):
    found = services()
    assert "management" in found["rabbitmq"]["image"]
    assert found["rabbitmq"]["image"].startswith("rabbitmq:")
    assert found["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(found["postgres"]["healthcheck"]["test"])
    # The database the users service connects to is created by the image.
    assert found["postgres"]["environment"]["POSTGRES_DB"] == "users"


def test_users_migrations_run_once_against_a_healthy_database() -> None:
    migrate = services()["users-migrate"]
    assert command(migrate) == [
        "framework",
        "db",
        "upgrade",
        "users",
        "--config",
        USERS_CONFIG,
    ]
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    assert migrate.get("restart", "no") == "no"
    assert "build" in migrate


def test_users_service_starts_after_its_migrations_and_healthy_broker_and_database() -> (
    None
):
    users = services()["users"]
    assert command(users)[:5] == [
        "framework",
        "run",
        "services.users.service",
        "--config",
        USERS_CONFIG,
    ]
    assert depends_on(users) == {
        "rabbitmq": "service_healthy",
        "postgres": "service_healthy",
        "users-migrate": "service_completed_successfully",
    }


def test_both_users_containers_share_one_image_built_from_the_repository() -> None:
    found = services()
    assert found["users"]["build"] == found["users-migrate"]["build"] == "."
    assert found["users"]["image"] == found["users-migrate"]["image"]


def test_users_environment_sets_exactly_the_names_config_yaml_reads() -> None:
    wanted = users_config_env_vars()
    assert {"AMQP_URI", "DATABASE_URL"} <= wanted
    found = services()
    users_env = set(found["users"]["environment"])
    migrate_env = set(found["users-migrate"]["environment"])
    assert {"AMQP_URI", "DATABASE_URL"} <= users_env
    assert "DATABASE_URL" in migrate_env
    # A misspelt name would be silently ignored and the default used instead.
    assert users_env <= wanted | FRAMEWORK_ENV_VARS
    assert migrate_env <= wanted


def test_service_urls_point_at_the_compose_hosts() -> None:
    found = services()
    assert "@rabbitmq:5672" in found["users"]["environment"]["AMQP_URI"]
    for name in ("users", "users-migrate"):
        url = found[name]["environment"]["DATABASE_URL"]
        assert url.startswith("postgresql://")
        assert url.endswith("@postgres:5432/users")


def test_users_healthcheck_asks_the_readiness_endpoint_of_its_health_server() -> None:
    users = services()["users"]
    cmd = command(users)
    defines = [cmd[i + 1] for i, part in enumerate(cmd) if part in ("--define", "-d")]
    address = dict(define.split("=", 1) for define in defines)[HEALTH_SERVER_CONFIG_KEY]
    port = address.rpartition(":")[2]

    probe = " ".join(users["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}{READY_PATH}" in probe
    assert any(str(mapping).endswith(f":{port}") for mapping in users["ports"])


def test_users_gets_longer_to_stop_than_the_default_drain_timeout() -> None:
    from framework.constants import DEFAULT_DRAIN_TIMEOUT

    grace = services()["users"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match is not None, grace
    assert int(match.group(1)) > DEFAULT_DRAIN_TIMEOUT


def test_dockerfile_installs_the_project_on_python_3_11_slim() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0] == "FROM python:3.11-slim"
    assert re.search(r"\bpip install \.(\s|$)", text)
    # `framework db upgrade users` resolves services/users from the working directory.
    assert any(line.startswith("WORKDIR ") for line in instructions)
    assert any(line.startswith("COPY . ") for line in instructions)
