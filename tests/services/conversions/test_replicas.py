"""Two replicas as real processes (``framework run``), one killed with ``kill -9``
in the middle of a job: the other runs it again, and it succeeds exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from framework.database import create_engine
from framework.exceptions import RpcTimeout, UnknownService
from framework.standalone.rpc import ClusterRpcProxy
from framework.storage import FileStorage
from framework.testing.processes import start_service, stop_processes
from framework.testing.utils import assert_stops_raising
from services.conversions.dependencies import JOBS_QUEUE
from services.conversions.schemas import CONVERSION_SUCCEEDED
from tests.helpers import wait_for
from tests.services.conversions.conftest import SERVICE_DIR, csv_bytes
from tests.services.conversions.test_integration import (
    ConversionEvents,
    upload,
    wait_for_state,
)

pytestmark = pytest.mark.integration

PROJECT_DIR = SERVICE_DIR.parent.parent
START_TIMEOUT = 60


def start_replica(environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return start_service(
        "services.conversions.service",
        "services/conversions/config.yaml",
        cwd=PROJECT_DIR,
        env=environment,
        log_file=log,
    )


def runner_pid(pg_url: str, job_id: str) -> int | None:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            runner = connection.execute(
                sqlalchemy.text("SELECT runner FROM jobs WHERE id = :id"),
                {"id": job_id},
            ).scalar()
    finally:
        engine.dispose()
    # "<host>:<pid>:<random>"
    return int(runner.split(":")[1]) if runner else None


def test_a_job_whose_replica_is_killed_runs_again_and_succeeds_once(
    rabbit_config: dict[str, Any],
    rabbit_manager: Any,
    pg_url: str,
    storage_dir: Path,
    storage: FileStorage,
    container_factory: Any,
    config: dict[str, Any],
    tmp_path: Path,
) -> None:
    ConversionEvents.seen = []
    listener = container_factory(ConversionEvents, config)
    listener.start()
    environment = {
        **os.environ,
        "AMQP_URI": rabbit_config["AMQP_URI"],
        "DATABASE_URL": pg_url,
        "STORAGE_URL": str(storage_dir),
        "MAX_CONCURRENT_CONVERSIONS": "1",
        "CONVERSION_HEARTBEAT_INTERVAL": "0.2",
        "CONVERSION_STALE_AFTER": "2",
    }
    log = tmp_path / "replicas.log"
    replicas = [start_replica(environment, log) for _ in range(2)]
    try:
        vhost = rabbit_config["vhost"]
        wait_for(
            lambda: _consumers(rabbit_manager, vhost) == 2,
            timeout=START_TIMEOUT,
            interval=0.2,
        )
        with ClusterRpcProxy(rabbit_config, timeout=20) as rpc:
            service = rpc.conversions
            assert_stops_raising(
                service.formats, (UnknownService, RpcTimeout), timeout=START_TIMEOUT
            )
            # XLSX is written a cell at a time: a run takes seconds.
            key = upload(storage, csv_bytes(60_000))
            registered = service.register_file(key, "long.csv", 0, 3)
            job = service.start_conversion(registered["id"], "xlsx", {}, 3)
            wait_for(
                lambda: (
                    service.get_job(job["id"])["progress"]["bytes"] > 0
                    or service.get_job(job["id"])["progress"]["rows"]
                ),
                timeout=30,
                interval=0.1,
            )
            pid = runner_pid(pg_url, job["id"])
            victim = next(replica for replica in replicas if replica.pid == pid)

            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)

            done = wait_for_state(service, job["id"], "succeeded", "failed", timeout=90)
            assert done["state"] == "succeeded", (done["error"], log.read_text())
            assert done["attempts"] == 2
            output_key = done["output"]["storage_key"]
            # One output, no temporary file of the killed run, the input untouched.
            wait_for(
                lambda: (
                    sorted(p.name for p in storage_dir.iterdir())
                    == sorted([key, output_key])
                )
            )
            assert runner_pid(pg_url, job["id"]) != pid
            wait_for(
                lambda: any(
                    kind == CONVERSION_SUCCEEDED for kind, _ in ConversionEvents.seen
                )
            )
            succeeded = [
                payload
                for kind, payload in ConversionEvents.seen
                if kind == CONVERSION_SUCCEEDED and payload["job"]["id"] == job["id"]
            ]
            assert len(succeeded) == 1
    finally:
        stop_processes(replicas)


def _consumers(rabbit_manager: Any, vhost: str) -> int:
    try:
        return int(rabbit_manager.get_queue(vhost, JOBS_QUEUE.name).get("consumers", 0))
    except Exception:  # noqa: BLE001 - not declared yet
        return 0
