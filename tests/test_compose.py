"""compose.yaml (and the Dockerfile it builds) describe the whole application.

These read the file and need no Docker; ``docker-compose config -q`` runs when the
tool is installed (CI installs it). tests/e2e runs the same file's commands and
healthchecks as local processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from framework.constants import DEFAULT_DRAIN_TIMEOUT, HEALTH_SERVER_CONFIG_KEY
from framework.exceptions import ConfigurationError
from framework.health import READY_PATH
from framework.settings import DEVELOPMENT_DATABASE_PASSWORD, check_production_secrets
from tests.e2e.compose import COMPLETED, HEALTHY, Compose, ComposeError, interpolate

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("users", "conversions", "scheduler", "web")
# --scale works only without a fixed container name or host port.
SCALABLE = ("users", "conversions", "scheduler")
# Read from the environment by the framework itself (framework.logs,
# framework.settings), not only through config.yaml.
FRAMEWORK_ENV_VARS = {"LOG_FORMAT", "LOG_LEVEL", "ENVIRONMENT"}


@pytest.fixture(scope="module")
def compose() -> Compose:
    # An empty environment: what `docker compose up` does on a fresh machine.
    return Compose(env={})


def defines(command: list[str]) -> dict[str, str]:
    values = [
        command[i + 1] for i, part in enumerate(command) if part in ("--define", "-d")
    ]
    return dict(value.split("=", 1) for value in values)


def test_compose_file_is_valid_for_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (CI installs it)")
    result = subprocess.run(
        [tool, "-f", "compose.yaml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_interpolation_reads_like_compose_and_refuses_unset_variables() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-x} ${EMPTY:-x} ${EMPTY-x} ${UNSET-x} $$HOME", env) == (
        "value x  x $HOME"
    )
    with pytest.raises(ComposeError, match="UNSET"):
        interpolate("${UNSET}", env)
    with pytest.raises(ComposeError, match="needed"):
        interpolate("${EMPTY:?needed}", env)


def test_every_application_service_runs_its_service_after_healthy_infrastructure_and_migrations(
    compose: Compose,
) -> None:
    for name in APP_SERVICES:
        service = compose[name]
        assert service.command[:5] == [
            "framework",
            "run",
            f"services.{name}.service",
            "--config",
            f"services/{name}/config.yaml",
        ]
        assert service.depends_on["rabbitmq"] == HEALTHY
        assert service.depends_on["postgres"] == HEALTHY
        assert service.depends_on["migrate"] == COMPLETED
        assert service.spec["restart"] in ("unless-stopped", "always", "on-failure")
        assert service.spec["build"] == "."
        assert service.spec["image"] == compose["migrate"].spec["image"]


def test_the_migrate_step_upgrades_every_service_once_and_exits(
    compose: Compose,
) -> None:
    migrate = compose["migrate"]
    script = " ".join(migrate.command)
    for name in APP_SERVICES:
        assert (
            f"framework db upgrade {name} --config services/{name}/config.yaml"
            in script
        )
    assert migrate.depends_on == {"postgres": HEALTHY}
    assert migrate.spec["restart"] == "no"
    assert compose.one_shot() == {"migrate"}


def test_the_postgres_init_script_creates_the_database_of_every_service(
    compose: Compose,
) -> None:
    postgres = compose["postgres"]
    created = set(postgres.environment["APP_DATABASES"].split())
    mounts = [str(volume) for volume in postgres.spec["volumes"]]
    init = next(m for m in mounts if m.endswith(":/docker-entrypoint-initdb.d:ro"))
    scripts = list((ROOT / init.split(":")[0]).glob("*.sh"))
    assert scripts and all(path.stat().st_mode & 0o111 for path in scripts)
    urls = [compose[name].environment["DATABASE_URL"] for name in APP_SERVICES]
    urls += list(compose["migrate"].environment.values())
    for url in urls:
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        assert url.rsplit("/", 1)[1] in created
    # Each service its own database.
    assert (
        len({compose[name].environment["DATABASE_URL"] for name in APP_SERVICES}) == 4
    )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_environment_sets_only_names_its_config_reads(
    compose: Compose, name: str
) -> None:
    config = ROOT / "services" / name / "config.yaml"
    if not config.exists():
        pytest.skip(f"services/{name} has not landed yet")
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config.read_text()))
    env = set(compose[name].environment)
    # A misspelt name would be silently ignored and the default used instead.
    assert env <= wanted | FRAMEWORK_ENV_VARS, env - wanted
    assert {"AMQP_URI", "DATABASE_URL"} <= env


def test_every_service_is_ready_checked_on_its_own_health_server(
    compose: Compose,
) -> None:
    for name in APP_SERVICES:
        service = compose[name]
        address = defines(service.command)[HEALTH_SERVER_CONFIG_KEY]
        port = int(address.rpartition(":")[2])
        assert port in service.exposed_ports
        assert f"http://127.0.0.1:{port}{READY_PATH}" in " ".join(
            service.healthcheck or []
        )


def test_scalable_services_have_no_fixed_name_or_host_port(compose: Compose) -> None:
    for name in SCALABLE:
        assert "container_name" not in compose[name].spec
        assert "ports" not in compose[name].spec
    for service in compose.services.values():
        assert "container_name" not in service.spec


def test_web_serves_on_port_8000_and_shares_storage_with_conversions(
    compose: Compose,
) -> None:
    web, conversions = compose["web"], compose["conversions"]
    assert web.environment["WEB_SERVER_ADDRESS"].endswith(":8000")
    assert any(str(port).endswith(":8000") for port in web.spec["ports"])
    assert web.volumes == conversions.volumes == [("storage", "/data/storage")]
    assert web.environment["STORAGE_URL"] == conversions.environment["STORAGE_URL"]
    assert web.depends_on["users"] == web.depends_on["conversions"] == HEALTHY


def test_services_get_longer_to_stop_than_the_drain_timeout(compose: Compose) -> None:
    for name in APP_SERVICES:
        grace = compose[name].spec["stop_grace_period"]
        match = re.fullmatch(r"(\d+)s", grace)
        assert match is not None, grace
        assert int(match.group(1)) > DEFAULT_DRAIN_TIMEOUT


def test_the_development_defaults_are_refused_in_production() -> None:
    # ENVIRONMENT=production and nothing else: every secret is still a default.
    compose = Compose(env={"ENVIRONMENT": "production"})
    users = compose["users"].environment
    assert users["ENVIRONMENT"] == "production"
    assert f":{DEVELOPMENT_DATABASE_PASSWORD}@" in users["DATABASE_URL"]
    from services.users.dependencies import DEVELOPMENT_SECRETS

    with pytest.raises(ConfigurationError) as raised:
        check_production_secrets(users, DEVELOPMENT_SECRETS)
    assert "ADMIN_PASSWORD" in str(raised.value)
    assert "DATABASE_URL" in str(raised.value)

    # With real ones it starts.
    real = Compose(
        env={
            "ENVIRONMENT": "production",
            "POSTGRES_PASSWORD": "a real one",
            "ADMIN_PASSWORD": "another real one",
        }
    )
    check_production_secrets(real["users"].environment, DEVELOPMENT_SECRETS)


def test_dockerfile_builds_dependencies_in_their_own_stage_and_runs_as_non_root() -> (
    None
):
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert stages == [
        "FROM python:3.11-slim AS build",
        "FROM python:3.11-slim AS runtime",
    ]
    # The dependency layer comes from pyproject.toml alone, before the code is copied.
    first_code_copy = next(
        i for i, line in enumerate(instructions) if "COPY framework" in line
    )
    deps_install = next(
        i for i, line in enumerate(instructions) if "requirements.txt" in line
    )
    assert deps_install < first_code_copy
    runtime = instructions[instructions.index(stages[1]) :]
    assert any(line.startswith("COPY --from=build /opt/venv") for line in runtime)
    assert not any("pip install" in line for line in runtime)
    assert not any(".[dev]" in line for line in instructions)
    user = [line for line in runtime if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
