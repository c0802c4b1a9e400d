"""The users service's events survive a crash between commit and publish.

The service runs as a real process (``framework run``) with the framework's crash
hook set: it SIGKILLs itself right after committing a transaction that wrote
events, before its outbox relay could publish them. Here that is the first admin
account, created at start. Restarted without the hook, the service publishes the
event from the outbox.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from framework.outbox import CRASH_AFTER_COMMIT_ENV, EVENT_ID_HEADER
from services.users.schemas import USER_CREATED
from tests.helpers import Spy

from .conftest import ADMIN_EMAIL, START_TIMEOUT, STOP_TIMEOUT, framework

pytestmark = pytest.mark.e2e


def outbox_rows(url: str) -> list[tuple[str, bool]]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT event_type, sent_at IS NOT NULL FROM outbox ORDER BY id")
        rows = cursor.fetchall()
    connection.close()
    return rows


def test_an_event_committed_just_before_a_kill_9_is_published_after_restart(
    environment: dict[str, str],
    rabbit_config: dict[str, Any],
    empty_database: str,
    tmp_path: Path,
) -> None:
    log = tmp_path / "output.log"
    upgrade = framework("db", "upgrade", "users", env=environment, log=log)
    assert upgrade.wait(timeout=60) == 0, log.read_text()
    listener = Spy(rabbit_config["AMQP_URI"], "users.events", USER_CREATED)
    run = ("run", "services.users.service", "--config", "services/users/config.yaml")
    try:
        crashing = framework(
            *run, env={**environment, CRASH_AFTER_COMMIT_ENV: "1"}, log=log
        )
        assert crashing.wait(timeout=START_TIMEOUT) == -signal.SIGKILL, log.read_text()
        # Committed, not published.
        assert outbox_rows(empty_database) == [(USER_CREATED, False)]

        service = framework(*run, env=environment, log=log)
        try:
            message = listener.get(timeout=START_TIMEOUT)
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
    finally:
        listener.close()

    assert json.loads(message.body)["user"]["email"] == ADMIN_EMAIL
    assert message.headers[EVENT_ID_HEADER]
    assert outbox_rows(empty_database) == [(USER_CREATED, True)]
