"""The pytest plugin: its fixtures in this session, its options and teardown in a
separate pytest run (a subprocess, so that run's session ends where we can see it).
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import kombu
import pytest
import requests

from framework import concurrency
from framework.constants import WEB_SERVER_CONFIG_KEY
from framework.containers import ServiceContainer
from framework.extensions import DependencyProvider, Entrypoint
from framework.testing.rabbit import Client, HTTPError
from framework.testing.services import dummy, entrypoint_hook

SUBPROCESS_TIMEOUT = 120


class CustomContainer(ServiceContainer):
    pass


class Echo:
    name = "echo"

    @dummy
    def echo(self, value):
        return value


# -- in this session -------------------------------------------------------------------


def test_plugin_has_monkey_patched_the_standard_library():
    assert concurrency.is_monkey_patched()
    # a green socket lets other green threads run while this one waits
    assert socket.socket.__module__.startswith("eventlet")


def test_empty_config_is_empty(empty_config):
    assert empty_config == {}


def test_mock_container_accepts_bound_extensions_and_records_spawns(mock_container):
    mock_container.service_name = "service"
    entrypoint = Entrypoint().bind(mock_container, "method")

    mock_container.spawn_worker(entrypoint, ("arg",), {})

    assert mock_container.serializer == "json"
    assert mock_container.accept == ["json"]
    assert mock_container.config["serializer"] == "json"
    mock_container.spawn_worker.assert_called_once_with(entrypoint, ("arg",), {})
    with pytest.raises(TypeError):
        mock_container.spawn_worker(entrypoint)  # autospec checks signatures


@pytest.mark.integration
def test_rabbit_config_is_a_fresh_vhost_the_amqp_user_can_use(
    request, rabbit_config, rabbit_manager, amqp_uri
):
    vhost = rabbit_config["vhost"]
    assert vhost.startswith("framework_test_")
    assert amqp_uri == rabbit_config["AMQP_URI"]
    assert amqp_uri == f"pyamqp://guest:guest@localhost:5672/{vhost}"
    assert rabbit_config["username"] == "guest"
    assert rabbit_manager.get_queues(vhost) == []

    permissions = rabbit_manager.get_vhost_permissions(vhost)
    assert [
        (p["user"], p["configure"], p["read"], p["write"]) for p in permissions
    ] == [("guest", ".*", ".*", ".*")]

    with kombu.Connection(amqp_uri) as connection:
        kombu.Queue(
            "probe", durable=False, channel=connection.default_channel
        ).declare()
    assert [q["name"] for q in rabbit_manager.get_queues(vhost)] == ["probe"]
    assert [q["name"] for q in rabbit_manager.get_queues("/")].count("probe") == 0


@pytest.mark.integration
def test_rabbit_ssl_config_points_at_the_amqps_port(rabbit_ssl_config, rabbit_config):
    assert rabbit_ssl_config["AMQP_URI"] == (
        f"pyamqp://guest:guest@localhost:5671/{rabbit_config['vhost']}"
    )
    assert rabbit_ssl_config["AMQP_SSL"]["certfile"] == "certs/clientcert.pem"
    assert rabbit_ssl_config["vhost"] == rabbit_config["vhost"]


@pytest.mark.integration
def test_get_message_from_queue_takes_a_message_off_a_queue(
    amqp_uri, get_message_from_queue
):
    with kombu.Connection(amqp_uri) as connection:
        producer = connection.Producer()
        kombu.Queue(
            "inbox", durable=False, channel=connection.default_channel
        ).declare()
        producer.publish({"n": 1}, routing_key="inbox", serializer="json")

    unacked = get_message_from_queue("inbox", ack=False)
    assert unacked.payload == {"n": 1}
    # not acked, so it went back to the queue and is there for the next one
    acked = get_message_from_queue("inbox", accept=["json"])
    assert acked.payload == {"n": 1}
    assert acked.delivery_info["redelivered"] is True

    # nameko's tests pass one content type as a string
    with kombu.Connection(amqp_uri) as connection:
        connection.Producer().publish({"n": 2}, routing_key="inbox")
    assert get_message_from_queue("inbox", accept="json").payload == {"n": 2}

    with pytest.raises(queue.Empty):
        get_message_from_queue("inbox", block=False)


def test_predictable_call_ids_number_the_workers(
    container_factory, predictable_call_ids
):
    call_ids = []

    class CallIdReporter(DependencyProvider):
        def worker_setup(self, worker_ctx):
            call_ids.append(worker_ctx.call_id)

    class Counted(Echo):
        reporter = CallIdReporter()

    container = container_factory(Counted)
    container.start()
    for value in range(2):
        with entrypoint_hook(container, "echo") as echo:
            echo(value)

    assert call_ids == ["echo.echo.0", "echo.echo.1"]


def test_container_factory_defaults_to_an_empty_config(container_factory):
    container = container_factory(Echo)
    assert container.config == {}
    assert type(container) is ServiceContainer


def test_container_factory_honours_a_custom_container_class(container_factory):
    config = {"SERVICE_CONTAINER_CLS": f"{__name__}.CustomContainer"}
    assert isinstance(container_factory(Echo, config), CustomContainer)


def test_runner_factory_takes_an_optional_config(runner_factory):
    assert runner_factory({"max_workers": 3}, Echo).containers[0].max_workers == 3
    assert runner_factory(Echo).config == {}


def test_web_config_is_a_free_local_port(web_config, web_config_port):
    assert web_config[WEB_SERVER_CONFIG_KEY] == f"127.0.0.1:{web_config_port}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", web_config_port))


def test_web_session_resolves_paths_against_the_web_config_address(
    web_session, web_config_port
):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}".encode()]

    listener = concurrency.green_listen(("127.0.0.1", web_config_port))
    server = concurrency.spawn(concurrency.wsgi_server, listener, app, log_output=False)
    try:
        assert web_session.get("/orders/7").text == "GET /orders/7"
        assert web_session.post("basket").text == "POST /basket"
        absolute = f"http://127.0.0.1:{web_config_port}/absolute"
        assert web_session.get(absolute).text == "GET /absolute"
    finally:
        concurrency.kill(server)
        listener.close()


# -- in a separate pytest run ------------------------------------------------------------


INNER_CONFTEST = '''
from framework import concurrency

# conftests are imported after entry-point plugins: the plugin has patched already
assert concurrency.is_monkey_patched(), "conftest imported before monkey patching"

import json
import os

import pytest

EVENTS = []


@pytest.fixture(scope="session")
def vhost_pipeline(vhost_pipeline):
    """The plugin's pipeline, recording when vhosts are handed back."""
    discard = vhost_pipeline.discard

    def recording_discard(vhost):
        EVENTS.append(["discarded", vhost])
        discard(vhost)

    vhost_pipeline.discard = recording_discard
    return vhost_pipeline


def pytest_sessionfinish(session):
    with open(os.environ["EVENTS_FILE"], "w") as events_file:
        json.dump(EVENTS, events_file)
'''

INNER_TESTS = """
import kombu

from framework.extensions import DependencyProvider
from framework.testing.services import once

from conftest import EVENTS


class KillRecorder(DependencyProvider):
    def kill(self):
        EVENTS.append(["killed", self.container.service_name])


class Service:
    name = "service"
    recorder = KillRecorder()

    @once
    def method(self):
        pass


def test_first(rabbit_config):
    EVENTS.append(["vhost", rabbit_config["vhost"], rabbit_config["AMQP_URI"]])
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        kombu.Queue("leftover", durable=True, channel=connection.default_channel).declare()


def test_second(rabbit_config, rabbit_manager):
    EVENTS.append(["vhost", rabbit_config["vhost"], rabbit_config["AMQP_URI"]])
    assert rabbit_manager.get_queues(rabbit_config["vhost"]) == []


def test_containers_die_before_their_vhost_goes(container_factory, rabbit_config):
    container_factory(Service, rabbit_config).start()


def test_runners_are_killed_too(runner_factory):
    runner_factory({}, Service).start()
"""


def inner_pytest(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """pytest run in a child process on the tests in ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def run_pytest(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Any]:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(INNER_CONFTEST))
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    events_file = tmp_path / "events.json"
    process = inner_pytest(
        tmp_path, *args, env={"EVENTS_FILE": str(events_file), "PATH": "/usr/bin:/bin"}
    )
    events = json.loads(events_file.read_text()) if events_file.exists() else None
    return process, events


@pytest.mark.integration
def test_plugin_isolates_tests_in_vhosts_and_cleans_up_in_order(
    tmp_path, rabbit_manager
):
    process, events = run_pytest(
        tmp_path, "--amqp-uri", "amqp://guest:guest@127.0.0.1:5672/ignored"
    )
    assert process.returncode == 0, process.stdout + process.stderr

    vhosts = [event[1] for event in events if event[0] == "vhost"]
    uris = [event[2] for event in events if event[0] == "vhost"]
    assert len(set(vhosts)) == 2
    assert uris == [f"amqp://guest:guest@127.0.0.1:5672/{vhost}" for vhost in vhosts]

    # container_factory was requested before rabbit_config, yet died first
    teardown = [event[0] for event in events if event[0] in ("killed", "discarded")]
    assert teardown == ["discarded", "discarded", "killed", "discarded", "killed"]

    # the vhosts the run used are gone once it has ended
    for vhost in vhosts:
        with pytest.raises(HTTPError):
            rabbit_manager.get_vhost(vhost)


def test_plugin_reports_an_unreachable_management_api(tmp_path):
    process, _ = run_pytest(
        tmp_path, "--rabbit-api-uri", "http://guest:guest@127.0.0.1:1", "-k", "first"
    )
    assert process.returncode == 1
    assert "rabbitmq-plugins enable rabbitmq_management" in process.stdout


def test_blocking_detection_option_fails_a_thread_that_blocks_the_hub(tmp_path):
    (tmp_path / "test_blocking.py").write_text(
        textwrap.dedent(
            """
            import time

            import pytest

            def test_busy_loop_is_detected():
                # the hub arms its alarm when it hands control to a green thread
                time.sleep(0)
                deadline = time.monotonic() + 10
                with pytest.raises(RuntimeError, match="Blocking detector ALARMED"):
                    while time.monotonic() < deadline:
                        pass
            """
        )
    )
    process = inner_pytest(tmp_path, "--blocking-detection")
    assert process.returncode == 0, process.stdout + process.stderr


def test_client_used_by_rabbit_manager_is_the_management_client(rabbit_manager):
    assert isinstance(rabbit_manager, Client)
    assert isinstance(rabbit_manager.get_overview(), dict)
    with pytest.raises(requests.HTTPError):
        rabbit_manager.get_vhost("framework_test_surely_not_there")


def test_predictable_call_ids_cover_standalone_proxies(predictable_call_ids):
    from framework.standalone.rpc import ClusterRpcProxy

    proxy = ClusterRpcProxy({"AMQP_URI": "memory://"})
    headers = proxy._context_headers()
    assert headers["nameko.call_id_stack"] == ["standalone_rpc_proxy.call.0"]


def test_the_amqps_port_option_reads_back_as_given(tmp_path):
    # nameko's plugin leaves the value a string; tests compare it with one
    (tmp_path / "test_port.py").write_text(
        textwrap.dedent(
            """
            def test_port(request):
                assert request.config.getoption("AMQP_SSL_PORT") == "1234"
            """
        )
    )
    process = inner_pytest(tmp_path, "--amqp-ssl-port", "1234")
    assert process.returncode == 0, process.stdout + process.stderr
