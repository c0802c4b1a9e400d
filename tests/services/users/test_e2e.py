"""The users service as it is deployed: ``framework db upgrade users``, then
``framework run services.users.service --config services/users/config.yaml``, as
real processes configured only through the environment, on a fresh PostgreSQL
database and a fresh RabbitMQ vhost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework.exceptions import RpcTimeout, UnknownService
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.utils import assert_stops_raising
from services.users.exceptions import AuthenticationFailed, UserNotFound

from .conftest import SERVICE_DIR, create_database, drop_database

pytestmark = pytest.mark.e2e

PROJECT_DIR = SERVICE_DIR.parent.parent
FRAMEWORK = str(Path(sys.executable).parent / "framework")
ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "root password"
START_TIMEOUT = 60  # seconds for the process to answer RPC
STOP_TIMEOUT = 30  # seconds for it to exit after SIGTERM


@pytest.fixture
def empty_database() -> Iterator[str]:
    url = create_database("users_e2e")
    yield url
    drop_database(url)


@pytest.fixture
def environment(rabbit_config: dict[str, Any], empty_database: str) -> dict[str, str]:
    """What an operator would set: the config.yaml reads all of it."""
    return {
        **os.environ,
        "AMQP_URI": rabbit_config["AMQP_URI"],
        "DATABASE_URL": empty_database,
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "ARGON2_TIME_COST": "1",
        "ARGON2_MEMORY_COST": "8",
        "ARGON2_PARALLELISM": "1",
    }


def framework(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Output to a file, not a pipe: nobody reads a pipe while the service runs,
    # and a full one would block its logging.
    with open(log, "ab") as output:
        return subprocess.Popen(
            [FRAMEWORK, *args],
            cwd=PROJECT_DIR,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def test_framework_run_serves_rpc_after_framework_db_upgrade(
    environment: dict[str, str], rabbit_config: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "output.log"
    upgrade = framework("db", "upgrade", "users", env=environment, log=log)
    assert upgrade.wait(timeout=60) == 0, log.read_text()

    service = framework(
        "run",
        "services.users.service",
        "--config",
        "services/users/config.yaml",
        env=environment,
        log=log,
    )
    try:
        with ClusterRpcProxy(rabbit_config, timeout=5) as rpc:
            # Until the service has bound its queue the call is unroutable; until
            # its start-up has created the admin, the admin is not found.
            admin = assert_stops_raising(
                lambda: rpc.users.get_user_by_email(ADMIN_EMAIL),
                (UnknownService, RpcTimeout, UserNotFound),
                timeout=START_TIMEOUT,
                interval=0.2,
            )
            assert admin["role"] == "admin"
            assert rpc.users.authenticate(ADMIN_EMAIL, ADMIN_PASSWORD) == admin

            member = rpc.users.create_user("ann@example.com", "correct horse", "Ann")
            assert rpc.users.list_users()["items"] == [admin, member]
            with pytest.raises(AuthenticationFailed):
                rpc.users.authenticate("ann@example.com", "wrong horse")
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            exit_code = service.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
            raise
    assert exit_code == 0, log.read_text()
