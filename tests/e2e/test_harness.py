"""The harness itself: what is broken in a compose file fails, as it would in
compose (a command that exits, a healthcheck that never passes, a failing one-shot
step, a variable that is not set), and what it translates is translated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from .compose import Compose, ComposeError, LocalApp

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
FAIL = ["CMD", sys.executable, "-c", "raise SystemExit(1)"]
QUICK = {"interval": "1s", "timeout": "2s", "retries": 2, "start_period": "1s"}


def local_app(tmp_path: Path, services: dict, env: dict | None = None) -> LocalApp:
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump({"services": services}))
    return LocalApp(
        compose=Compose(path, env=env or {}),
        amqp_uri="amqp://guest:guest@127.0.0.1:5672/test",
        postgres_server="postgresql://postgres@127.0.0.1:5432",
        db_prefix="unused",
        workdir=tmp_path / "run",
    )


def test_a_healthcheck_that_never_passes_fails(tmp_path: Path) -> None:
    app = local_app(
        tmp_path,
        {"a": {"build": ".", "command": SLEEP, "healthcheck": {"test": FAIL, **QUICK}}},
    )
    try:
        with pytest.raises(ComposeError, match="never passed its healthcheck"):
            app.up()
    finally:
        app.down()


def test_a_command_that_exits_fails(tmp_path: Path) -> None:
    app = local_app(
        tmp_path,
        {
            "a": {
                "build": ".",
                "command": [sys.executable, "-c", "raise SystemExit(3)"],
                # A check that cannot pass, as a real one (readiness over HTTP)
                # cannot for a service that died: with one that always passes,
                # whether the exit or the check is seen first was a race.
                "healthcheck": {"test": FAIL, **QUICK},
            }
        },
    )
    with pytest.raises(ComposeError, match="exited with 3"):
        app.up()


def test_a_failing_one_shot_step_stops_what_waits_for_it(tmp_path: Path) -> None:
    app = local_app(
        tmp_path,
        {
            "migrate": {"build": ".", "command": ["sh", "-c", "exit 2"]},
            "a": {
                "build": ".",
                "command": SLEEP,
                "depends_on": {
                    "migrate": {"condition": "service_completed_successfully"}
                },
            },
        },
    )
    with pytest.raises(ComposeError, match="migrate exited with 2"):
        app.up()
    assert "a" not in app.processes


def test_an_unset_variable_without_a_default_fails(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="NOT_SET"):
        local_app(
            tmp_path,
            {"a": {"build": ".", "command": SLEEP, "environment": {"X": "${NOT_SET}"}}},
        )


def test_hosts_ports_and_volumes_are_translated_per_replica(tmp_path: Path) -> None:
    app = local_app(
        tmp_path,
        {
            "a": {
                "build": ".",
                "command": [*SLEEP, "--define", "HEALTH=0.0.0.0:9000"],
                "expose": ["9000"],
                "environment": {
                    "AMQP_URI": "amqp://guest:guest@rabbitmq:5672/",
                    "DATABASE_URL": "postgresql://postgres:secret@postgres:5432/a",
                    "STORAGE_URL": "/data/storage",
                },
                "volumes": ["storage:/data/storage"],
            }
        },
    )
    app.compose.volumes = {"storage"}
    app.__post_init__()
    try:
        first, second = app.start("a"), app.start("a")
        assert first.ports[9000] != second.ports[9000]
        env = app.environment(app.compose["a"], first.ports)
        assert env["AMQP_URI"] == "amqp://guest:guest@127.0.0.1:5672/test"
        assert env["DATABASE_URL"] == (
            "postgresql://postgres:secret@127.0.0.1:5432/unused_a"
        )
        assert env["STORAGE_URL"] == str(tmp_path / "run" / "volumes" / "storage")
        assert first.popen.args[-1] == f"HEALTH=0.0.0.0:{first.ports[9000]}"
    finally:
        app.down()
