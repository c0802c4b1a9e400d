"""``framework.health``: liveness, readiness and the per-process health server.

Integration tests use the real RabbitMQ (a fresh vhost per test) and the real
PostgreSQL. The broker is never stopped (others share it): to take a service's
connection down, the test revokes its user's permissions on the test's own vhost
and closes the connection from the broker side through the management API, so
the framework's reconnects are refused until the permissions come back.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from sqlalchemy.orm import DeclarativeBase

from framework import concurrency
from framework.containers import ServiceContainer
from framework.database import Database
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider, Entrypoint
from framework.health import HealthServer, from_config, parse_address
from framework.rpc import rpc
from framework.runners import ServiceRunner
from framework.testing.services import entrypoint_hook
from framework.testing.utils import find_free_port, get_rabbit_connections
from tests.helpers import wait_for

CLIENT_TIMEOUT = 10.0  # seconds any probe may take before the test fails
RECONNECT_DEADLINE = 30.0  # seconds for the framework to notice and recover

entrypoint = Entrypoint.decorator


class Base(DeclarativeBase):
    pass


class Quiet:
    """A service without broker traffic: its entrypoint only fires when a test says."""

    name = "quiet"

    @entrypoint
    def wait(self, event: Any) -> None:
        event.wait()


class Greeter:
    name = "greeter"

    @rpc
    def hello(self, name: str) -> str:
        return f"hello {name}"


class WithDatabase:
    name = "with_database"
    db = Database(Base)

    @entrypoint
    def noop(self) -> None:
        pass


class Probe(DependencyProvider):
    """A provider whose readiness the test decides."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def health_check(self) -> tuple[bool, str]:
        if self.behaviour == "raise":
            raise RuntimeError("probe exploded")
        if self.behaviour == "hang":
            concurrency.Event().wait()
        return self.behaviour == "ok", f"probe says {self.behaviour}"


class WithProbes:
    name = "with_probes"
    fine = Probe("ok")
    broken = Probe("raise")
    stuck = Probe("hang")

    @entrypoint
    def noop(self) -> None:
        pass


# -- helpers ---------------------------------------------------------------------------


def get(port: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=CLIENT_TIMEOUT)


def checks_by_name(response: requests.Response) -> dict[str, dict[str, Any]]:
    return {f"{c['service']}.{c['check']}": c for c in response.json()["checks"]}


def wait_for_status(
    port: int, status: int, timeout: float = RECONNECT_DEADLINE
) -> requests.Response:
    """Poll readiness until it answers ``status``; the last response."""
    seen: list[requests.Response] = []

    def answered() -> bool:
        seen.append(get(port, "/health/ready"))
        return seen[-1].status_code == status

    try:
        wait_for(answered, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(
            f"readiness never answered {status}; last: {seen[-1].status_code} {seen[-1].text}"
        ) from None
    return seen[-1]


@pytest.fixture
def health_runner(
    runner_factory: Callable[..., ServiceRunner],
) -> Callable[..., ServiceRunner]:
    """``health_runner(config, *services)``: a started runner serving health on a free port."""

    def start(config: dict[str, Any], *services: type) -> ServiceRunner:
        runner = runner_factory(
            {**config, "HEALTH_SERVER_ADDRESS": "127.0.0.1:0"}, *services
        )
        runner.start()
        return runner

    return start


@pytest.fixture
def vhost_access(
    request: pytest.FixtureRequest, rabbit_config: dict[str, Any]
) -> Iterator[Any]:
    """Revoke and restore the AMQP user's permissions on this test's vhost."""
    api = request.config.getoption("RABBIT_API_URI")
    url = f"{api}/api/permissions/{quote(rabbit_config['vhost'], safe='')}/{quote(rabbit_config['username'], safe='')}"

    class Access:
        def revoke(self) -> None:
            requests.delete(url, timeout=CLIENT_TIMEOUT).raise_for_status()

        def restore(self) -> None:
            body = {"configure": ".*", "write": ".*", "read": ".*"}
            requests.put(url, json=body, timeout=CLIENT_TIMEOUT).raise_for_status()

    access = Access()
    yield access
    access.restore()  # whatever happened, so the vhost can be torn down normally


# -- liveness and the server ---------------------------------------------------------------


def test_liveness_answers_200_with_the_services_of_the_process(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    runner = health_runner({}, Quiet, WithProbes)

    response = get(runner.health_server.port, "/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "live", "services": ["quiet", "with_probes"]}


def test_runner_without_a_health_address_serves_nothing(
    runner_factory: Callable[..., ServiceRunner],
) -> None:
    runner = runner_factory({}, Quiet)
    runner.start()

    assert runner.health_server is None


def test_health_server_stops_with_the_runner(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    runner = health_runner({}, Quiet)
    port = runner.health_server.port

    runner.stop()

    with pytest.raises(requests.ConnectionError):
        get(port, "/health/live")


def test_unknown_path_is_404_and_a_post_is_405(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    port = health_runner({}, Quiet).health_server.port

    missing = get(port, "/health")
    post = requests.post(
        f"http://127.0.0.1:{port}/health/ready", timeout=CLIENT_TIMEOUT
    )

    assert missing.status_code == 404
    assert "/health/ready" in missing.json()["paths"]
    assert post.status_code == 405
    assert post.headers["Allow"] == "GET, HEAD"


def test_a_port_already_in_use_is_a_configuration_error() -> None:
    first = HealthServer("127.0.0.1:0", [])
    first.start()
    try:
        second = HealthServer(f"127.0.0.1:{first.port}", [])
        with pytest.raises(ConfigurationError, match="HEALTH_SERVER_ADDRESS"):
            second.start()
    finally:
        first.stop()


@pytest.mark.parametrize(
    "address, expected",
    [
        ("9000", ("0.0.0.0", 9000)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_address_is_an_optional_host_and_a_port(
    address: str, expected: tuple[str, int]
) -> None:
    assert parse_address(address) == expected


def test_an_address_without_a_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"\[address:\]port"):
        parse_address("localhost")


# -- readiness ---------------------------------------------------------------------------


def test_readiness_is_503_until_the_container_starts_when_used_standalone() -> None:
    container = ServiceContainer(Quiet, {})
    server = HealthServer("127.0.0.1:0", [container])
    server.start()
    try:
        before = get(server.port, "/health/ready")
        container.start()
        after = get(server.port, "/health/ready")
    finally:
        server.stop()
        container.kill()

    assert before.status_code == 503
    assert before.json()["status"] == "not ready"
    assert checks_by_name(before)["quiet.started"]["ok"] is False
    assert after.status_code == 200
    assert after.json()["status"] == "ready"


def test_readiness_is_503_with_no_services() -> None:
    server = HealthServer("127.0.0.1:0", [])
    server.start()
    try:
        assert get(server.port, "/health/ready").status_code == 503
    finally:
        server.stop()


def test_readiness_is_200_once_consumers_are_registered_on_a_live_connection(
    rabbit_config: dict[str, Any], health_runner: Callable[..., ServiceRunner]
) -> None:
    runner = health_runner(rabbit_config, Greeter)

    response = get(runner.health_server.port, "/health/ready")

    assert response.status_code == 200, response.text
    checks = checks_by_name(response)
    assert checks["greeter.started"]["ok"] is True
    assert checks["greeter.QueueConsumer"] == {
        "service": "greeter",
        "check": "QueueConsumer",
        "extension": "QueueConsumer",
        "ok": True,
        "detail": "consuming",
    }
    assert checks["greeter.ContainerPublisher"]["ok"] is True


def test_readiness_turns_503_while_the_broker_connection_is_down_and_200_after_reconnect(
    request: pytest.FixtureRequest,
    rabbit_config: dict[str, Any],
    rabbit_manager: Any,
    vhost_access: Any,
    health_runner: Callable[..., ServiceRunner],
) -> None:
    config = {**rabbit_config, "CONNECT_RETRY_MAX_INTERVAL": 0.5}
    runner = health_runner(config, Greeter)
    port = runner.health_server.port
    wait_for_status(port, 200)
    vhost = rabbit_config["vhost"]
    # The management API lists a connection only after its first stats emission.
    wait_for(
        lambda: get_rabbit_connections(vhost, rabbit_manager),
        timeout=RECONNECT_DEADLINE,
    )

    vhost_access.revoke()
    for connection in get_rabbit_connections(vhost, rabbit_manager):
        rabbit_manager.delete_connection(connection["name"])

    down = wait_for_status(port, 503)
    consumer = checks_by_name(down)["greeter.QueueConsumer"]
    assert consumer["ok"] is False
    assert "down" in consumer["detail"]

    vhost_access.restore()

    up = wait_for_status(port, 200)
    assert checks_by_name(up)["greeter.QueueConsumer"]["detail"] == "consuming"


@pytest.mark.integration
def test_readiness_is_200_when_the_database_answers(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    config = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres"}
    runner = health_runner(config, WithDatabase)

    response = get(runner.health_server.port, "/health/ready")

    assert response.status_code == 200, response.text
    assert checks_by_name(response)["with_database.db"]["ok"] is True


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres@127.0.0.1:{find_free_port()}/closed_port",
        f"postgresql://postgres@127.0.0.1:5432/missing_{uuid.uuid4().hex}",
    ],
    ids=["closed-port", "missing-database"],
)
def test_readiness_is_503_when_a_database_does_not_answer(
    url: str, health_runner: Callable[..., ServiceRunner]
) -> None:
    runner = health_runner({"DATABASE_URL": url}, WithDatabase)

    response = get(runner.health_server.port, "/health/ready")

    assert response.status_code == 503, response.text
    db = checks_by_name(response)["with_database.db"]
    assert db["ok"] is False
    assert db["extension"] == "Database"
    assert db["detail"]


def test_a_health_check_that_raises_or_hangs_fails_readiness_and_names_why(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    runner = health_runner({"HEALTH_CHECK_TIMEOUT": 0.2}, WithProbes)

    response = get(runner.health_server.port, "/health/ready")

    assert response.status_code == 503
    checks = checks_by_name(response)
    assert checks["with_probes.fine"] == {
        "service": "with_probes",
        "check": "fine",
        "extension": "Probe",
        "ok": True,
        "detail": "probe says ok",
    }
    assert checks["with_probes.broken"]["ok"] is False
    # The exception's text stays in the log, under the id the detail names.
    assert checks["with_probes.broken"]["detail"].startswith(
        "unexpected RuntimeError (correlation id "
    )
    assert "exploded" not in response.text
    assert checks["with_probes.stuck"]["ok"] is False
    assert checks["with_probes.stuck"]["detail"] == "no answer within 0.2s"


def test_readiness_turns_503_as_soon_as_a_graceful_stop_begins(
    health_runner: Callable[..., ServiceRunner],
) -> None:
    runner = health_runner({}, Quiet)
    port = runner.health_server.port
    (container,) = runner.containers
    release = concurrency.Event()
    with entrypoint_hook(container, "wait") as hook:
        worker = concurrency.spawn(hook, release)
        wait_for(lambda: container.active_workers == 1, timeout=5)
        stopping = concurrency.spawn(runner.stop)
        try:
            # The stop waits for the worker to drain; readiness already says no.
            response = wait_for_status(port, 503, timeout=5)
        finally:
            release.send(None)
            worker.wait()
            stopping.wait()

    assert checks_by_name(response)["quiet.started"]["detail"] == "stopping"


# -- hostile clients -------------------------------------------------------------------

HALF_OPEN = b"GET /health/live HTTP/1.1\r\nHost: x\r\n"  # headers that never end


def test_64_half_open_connections_do_not_stop_liveness_or_readiness_answering() -> None:
    # The default limits: 64 slots, so these take every one of them.
    container = ServiceContainer(Quiet, {})
    server = HealthServer("127.0.0.1:0", [container])
    server.start()
    hostile = []
    try:
        container.start()
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(HALF_OPEN)
            hostile.append(sock)

        live = get(server.port, "/health/live")
        ready = get(server.port, "/health/ready")
    finally:
        for sock in hostile:
            sock.close()
        server.stop()
        container.kill()

    assert live.status_code == 200
    assert ready.status_code == 200


def test_configured_header_timeout_answers_408_to_headers_that_never_end() -> None:
    server = from_config(
        {"HEALTH_SERVER_ADDRESS": "127.0.0.1:0", "HEALTH_HEADER_TIMEOUT": 0.3}, []
    )
    assert server is not None
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(HALF_OPEN)
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
    finally:
        server.stop()

    assert received.startswith(b"HTTP/1.1 408 ")


def test_invalid_connection_limits_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="HEALTH_"):
        from_config(
            {"HEALTH_SERVER_ADDRESS": "127.0.0.1:0", "HEALTH_IDLE_TIMEOUT": "soon"}, []
        )


class Flaky(DependencyProvider):
    """A provider whose worker_setup fails while ``broken`` is set."""

    broken = True

    def worker_setup(self, worker_ctx: Any) -> None:
        if Flaky.broken:
            raise ConnectionError("backend unreachable")


class WithFlakyDependency:
    name = "flaky"
    backend = Flaky()

    @entrypoint
    def work(self) -> str:
        return "done"


def test_a_failing_dependency_hook_turns_readiness_503_until_it_works_again() -> None:
    # nameko kills the container on a hook error; ours keeps serving (one broken
    # worker must not take the service down), so readiness must say so instead.
    container = ServiceContainer(WithFlakyDependency, {})
    server = HealthServer("127.0.0.1:0", [container])
    server.start()
    container.start()
    try:
        Flaky.broken = True
        with pytest.raises(ConnectionError), entrypoint_hook(container, "work") as work:
            work()
        broken = get(server.port, "/health/ready")
        Flaky.broken = False
        with entrypoint_hook(container, "work") as work:
            assert work() == "done"
        healed = get(server.port, "/health/ready")
    finally:
        server.stop()
        container.kill()

    assert broken.status_code == 503
    detail = checks_by_name(broken)["flaky.started"]["detail"]
    assert "backend.worker_setup (ConnectionError)" in detail
    assert "unreachable" not in detail  # the type only, never the error's text
    assert healed.status_code == 200
