"""The users service as it is deployed: ``framework db upgrade users``, then
``framework run services.users.service --config services/users/config.yaml``, as
real processes configured only through the environment, on a fresh PostgreSQL
database and a fresh RabbitMQ vhost.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from framework.exceptions import RpcTimeout, UnknownService
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.utils import assert_stops_raising
from services.users.exceptions import AuthenticationFailed, UserNotFound

from .conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    START_TIMEOUT,
    STOP_TIMEOUT,
    framework,
)

pytestmark = pytest.mark.e2e


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
