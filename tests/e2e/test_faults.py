"""The application from compose.yaml under faults: nothing lost, and no error to a
caller beyond what each case implies.

The services reach RabbitMQ and PostgreSQL through TCP proxies (tests/tcp_proxy.py)
that a test can cut, which to them is the server going away; processes are killed
with the signals an orchestrator sends; once, RabbitMQ itself is restarted
(``rabbitmqctl stop_app`` / ``start_app``, as tests/framework/test_broker_failures.py
does). The tests share one application and run in
order. (SIGTERM to every service is the last test of test_journeys.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.helpers import TcpProxy

from .api import Api, csv_bytes
from .compose import LocalApp, Process

ADMIN_EMAIL = "admin@example.com"  # compose.yaml's development defaults
ADMIN_PASSWORD = "admin-dev-password"
# A killed replica's job is taken back once its heartbeat is this old (compose
# leaves the service's default of 30 s; a test need not wait that long).
STALE_AFTER = "4"


@pytest.fixture(scope="module")
def proxies() -> Iterator[tuple[TcpProxy, TcpProxy]]:
    amqp, postgres = TcpProxy(5672), TcpProxy(5432)
    yield amqp, postgres
    amqp.close()
    postgres.close()


@pytest.fixture(scope="module")
def app(make_app: Any, proxies: tuple[TcpProxy, TcpProxy]) -> LocalApp:
    amqp, postgres = proxies
    app: LocalApp = make_app(amqp_port=amqp.port, postgres_port=postgres.port)
    app.extra_env["CONVERSION_STALE_AFTER"] = STALE_AFTER
    app.up()
    return app


@pytest.fixture(scope="module")
def admin(app: LocalApp) -> Api:
    return Api(f"http://127.0.0.1:{app.port('web', 8000)}").login(
        ADMIN_EMAIL, ADMIN_PASSWORD
    )


def ran_jobs(process: Process) -> set[str]:
    """Ids of the jobs this conversions replica finished (from its JSON log)."""
    done = set()
    for line in process.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == "conversion succeeded":
            done.add(record.get("job_id"))
    return done


def start_jobs(admin: Api, count: int, rows: int = 200) -> list[dict[str, Any]]:
    jobs = []
    for number in range(count):
        uploaded = admin.upload(f"batch-{number}.csv", csv_bytes(rows, start=number))
        jobs.append(admin.convert(uploaded["id"], "parquet"))
    return jobs


def wait_all(
    admin: Api, jobs: list[dict[str, Any]], timeout: float = 120
) -> list[dict]:
    """Every job's final state; API calls the outage refused are asked again."""
    deadline = time.monotonic() + timeout
    final = []
    for job in jobs:
        while True:
            try:
                final.append(admin.wait_job(job["id"], timeout=timeout))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    return final


def test_two_conversions_replicas_both_take_jobs(app: LocalApp, admin: Api) -> None:
    second = app.start("conversions")
    app.wait_healthy(second)
    first = app.replicas("conversions")[0]

    jobs = start_jobs(admin, 12)
    final = wait_all(admin, jobs)

    assert [job["state"] for job in final] == ["succeeded"] * 12
    ids = {job["id"] for job in jobs}
    by_first, by_second = ran_jobs(first) & ids, ran_jobs(second) & ids
    assert by_first and by_second, (by_first, by_second)
    # Each job ran to completion once.
    assert by_first | by_second == ids and not by_first & by_second
    app.stop(second)


def test_a_job_killed_mid_conversion_completes_once_after_conversions_comes_back(
    app: LocalApp, admin: Api
) -> None:
    (replica,) = app.replicas("conversions")
    uploaded = admin.upload("big.csv", csv_bytes(60_000))
    job = admin.convert(uploaded["id"], "xlsx")
    deadline = time.monotonic() + 60
    while admin.job(job["id"])["state"] == "queued":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    assert admin.job(job["id"])["state"] == "running"

    replica.popen.send_signal(signal.SIGKILL)
    replica.popen.wait(10)
    # With no conversions replica, a caller is told to try again, not failed.
    down = admin.call("GET", f"/api/v1/conversions/{job['id']}", expect=(200, 503))
    if down.status_code == 503:
        assert down.headers["Content-Type"].startswith("application/problem+json")
    app.wait_healthy(app.start("conversions"))

    final = admin.wait_job(job["id"], timeout=120)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    assert final["output"]["rows"] == 60_000
    assert len(admin.download(job["id"]).content) == final["output"]["size"]


def test_readiness_fails_while_postgresql_is_down_and_recovers_by_itself(
    app: LocalApp, proxies: tuple[TcpProxy, TcpProxy], admin: Api
) -> None:
    _, postgres = proxies
    services = [s.name for s in app.compose.application if s.name != "migrate"]
    postgres.cut()
    try:
        for name in services:
            process = app.replicas(name)[0]
            deadline = time.monotonic() + 30
            while app.check_health(process).returncode == 0:
                assert time.monotonic() < deadline, f"{name} stayed ready"
                time.sleep(0.5)
        # The panel's own readiness, as a load balancer asks it: 503.
        web = app.replicas("web")[0]
        ready = requests.get(
            f"http://127.0.0.1:{web.ports[9000]}/health/ready", timeout=10
        )
        assert ready.status_code == 503
    finally:
        postgres.restore()
    for name in services:
        app.wait_healthy(app.replicas(name)[0], timeout=60)
    # And it works again, with nothing restarted.
    (job,) = start_jobs(admin, 1)
    assert admin.wait_job(job["id"])["state"] == "succeeded"
    assert all(len(app.replicas(name)) == 1 for name in services)


def test_a_broker_connection_cut_mid_batch_of_20_conversions_loses_none(
    app: LocalApp, proxies: tuple[TcpProxy, TcpProxy], admin: Api
) -> None:
    amqp, _ = proxies
    jobs = start_jobs(admin, 20, rows=2000)
    amqp.cut()
    time.sleep(3)  # the outage itself, not a wait for something
    amqp.restore()

    final = wait_all(admin, jobs, timeout=180)
    assert [job["state"] for job in final] == ["succeeded"] * 20, [
        (job["state"], job["error"]) for job in final
    ]
    assert {job["output"]["rows"] for job in final} == {2000}


def restart_rabbitmq() -> None:
    """Stop and start the real broker application (its data stays on disk)."""
    for command in ("stop_app", "start_app", "await_startup"):
        subprocess.run(["rabbitmqctl", "-q", command], check=True, timeout=120)


def test_a_rabbitmq_restart_mid_batch_of_20_conversions_loses_none(
    app: LocalApp, admin: Api
) -> None:
    jobs = start_jobs(admin, 20, rows=20_000)
    # Mid-batch: the last one has not run yet when the broker goes away.
    assert admin.job(jobs[-1]["id"])["state"] in ("queued", "running")
    restart_rabbitmq()

    final = wait_all(admin, jobs, timeout=180)
    assert [job["state"] for job in final] == ["succeeded"] * 20, [
        (job["state"], job["error"]) for job in final
    ]
    assert {job["output"]["rows"] for job in final} == {20_000}
    # Every service came back by itself.
    for service in app.compose.application:
        if service.name != "migrate":
            for process in app.replicas(service.name):
                app.wait_healthy(process, timeout=60)
