"""The framework's pytest plugin (entry point ``pytest11: framework``).

Importing it monkey patches the standard library for eventlet. pytest imports
entry-point plugins before any conftest or test module, so everything a test
imports (kombu, amqp, requests, psycopg2's sockets...) sees green sockets; patching
later would leave early imports with blocking ones that stall the whole process.

Options: ``--amqp-uri`` (alias ``--rabbit-amqp-uri``; only scheme, credentials,
host and port are used, each test gets its own vhost), ``--rabbit-api-uri`` (alias
``--rabbit-ctl-uri``; the management API), ``--amqp-ssl-port``,
``--amqp-ssl-option KEY=VALUE``, ``--blocking-detection``.

Fixtures (nameko's names): ``empty_config``, ``mock_container``, ``rabbit_manager``,
``vhost_pipeline``, ``rabbit_config``, ``rabbit_ssl_config``, ``amqp_uri``,
``container_factory``, ``runner_factory``, ``get_message_from_queue``,
``predictable_call_ids``, ``web_config``, ``web_config_port``, ``web_session``,
``websocket``.
"""

from __future__ import annotations

from framework import concurrency

concurrency.monkey_patch()

import itertools  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import random  # noqa: E402
import ssl  # noqa: E402
import string  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402
from unittest.mock import create_autospec, patch  # noqa: E402
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_AMQP_URI = "pyamqp://guest:guest@localhost:5672/"
DEFAULT_RABBIT_API_URI = "http://guest:guest@localhost:15672"
DEFAULT_AMQP_SSL_PORT = 5671
DEFAULT_AMQP_SSL_OPTIONS = {
    "ca_certs": "certs/cacert.pem",
    "certfile": "certs/clientcert.pem",
    "keyfile": "certs/clientkey.pem",
    "cert_reqs": ssl.CERT_REQUIRED,
}
TEST_VHOST_PREFIX = "framework_test_"
VHOST_DELETE_ATTEMPTS = 5


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("framework", "framework (nameko-compatible) services")
    group.addoption(
        "--amqp-uri",
        "--rabbit-amqp-uri",
        action="store",
        dest="RABBIT_AMQP_URI",
        default=DEFAULT_AMQP_URI,
        help="AMQP broker; its vhost is ignored, every test gets a fresh one "
        f"(default {DEFAULT_AMQP_URI})",
    )
    group.addoption(
        "--rabbit-api-uri",
        "--rabbit-ctl-uri",
        action="store",
        dest="RABBIT_API_URI",
        default=DEFAULT_RABBIT_API_URI,
        help=f"RabbitMQ management HTTP API (default {DEFAULT_RABBIT_API_URI})",
    )
    group.addoption(
        "--amqp-ssl-port",
        action="store",
        # A string when given, as nameko's (tests compare it with one).
        dest="AMQP_SSL_PORT",
        default=DEFAULT_AMQP_SSL_PORT,
        help=f"broker's AMQPS port, for rabbit_ssl_config (default {DEFAULT_AMQP_SSL_PORT})",
    )
    group.addoption(
        "--amqp-ssl-option",
        action="append",
        dest="AMQP_SSL_OPTIONS",
        default=[],
        metavar="KEY=VALUE",
        help="an SSL option for rabbit_ssl_config (repeatable; VALUE is read as YAML; "
        "cert_reqs takes an ssl constant name such as CERT_NONE)",
    )
    group.addoption(
        "--blocking-detection",
        action="store_true",
        dest="blocking_detection",
        default=False,
        help="fail any green thread that blocks the eventlet hub for a second (a "
        "call that was not monkey patched); uses SIGALRM, so pair it with "
        "--timeout-method=thread if pytest-timeout is on",
    )
    group.addoption(
        "--suppress-nameko-eventlet-notification",
        action="store_true",
        default=False,
        help="accepted for nameko compatibility; this plugin patches eventlet itself",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("blocking_detection"):
        concurrency.enable_blocking_detection()


# -- configs ------------------------------------------------------------------------


@pytest.fixture
def empty_config() -> dict[str, Any]:
    return {}


@pytest.fixture
def mock_container(empty_config: dict[str, Any]) -> Any:
    """An autospec of ``ServiceContainer`` (json serializer), to bind extensions to."""
    from framework.constants import DEFAULT_SERIALIZER, SERIALIZER_CONFIG_KEY
    from framework.containers import ServiceContainer

    container = create_autospec(ServiceContainer)
    container.config = empty_config
    container.config[SERIALIZER_CONFIG_KEY] = DEFAULT_SERIALIZER
    container.serializer = DEFAULT_SERIALIZER
    container.accept = [DEFAULT_SERIALIZER]
    container.shared_extensions = {}
    return container


# -- RabbitMQ -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbit_manager(request: pytest.FixtureRequest) -> Any:
    """A management API client (``framework.testing.rabbit.Client``)."""
    from framework.testing.rabbit import Client

    return Client(request.config.getoption("RABBIT_API_URI"))


@pytest.fixture(scope="session")
def vhost_pipeline(
    request: pytest.FixtureRequest, rabbit_manager: Any
) -> Iterator[Any]:
    """Fresh vhosts, made ahead of time and deleted after use, in the background.

    Each is ``framework_test_<10 random letters>`` with full permissions for the
    AMQP user. ``get()`` one, ``discard(vhost)`` it when done.
    """
    from framework.testing.utils import ResourcePipeline, reset_rabbit_connections

    username = unquote(
        urlsplit(request.config.getoption("RABBIT_AMQP_URI")).username or "guest"
    )

    def create() -> str:
        suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(10))
        vhost = TEST_VHOST_PREFIX + suffix
        rabbit_manager.create_vhost(vhost)
        rabbit_manager.set_vhost_permissions(vhost, username, ".*", ".*", ".*")
        return vhost

    def destroy(vhost: str) -> None:
        _forget_pooled_connections(vhost)
        for attempt in range(1, VHOST_DELETE_ATTEMPTS + 1):
            try:
                reset_rabbit_connections(vhost, rabbit_manager)
                rabbit_manager.delete_vhost(vhost)
                return
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code == 404:
                    return  # a test deleted it itself
                if attempt == VHOST_DELETE_ATTEMPTS:
                    raise
                log.warning("retrying deletion of vhost %s: %s", vhost, exc)
                concurrency.sleep(attempt)

    with ResourcePipeline(create, destroy).run() as pipeline:
        yield pipeline


def _forget_pooled_connections(vhost: str) -> None:
    # kombu's global pools keep connections per broker URL; one to a deleted vhost
    # would be handed out again, dead, to the next user of the same URL.
    from kombu import pools

    for connection, pool in list(pools.connections.items()):
        if getattr(connection, "virtual_host", None) == vhost:
            pools.connections.pop(connection, None)
            try:
                pool.force_close_all()
            except Exception:
                log.debug(
                    "closing pooled connections to %s failed", vhost, exc_info=True
                )


@pytest.fixture
def rabbit_config(
    request: pytest.FixtureRequest, vhost_pipeline: Any
) -> Iterator[dict[str, Any]]:
    """``{'AMQP_URI': ..., 'username': ..., 'vhost': ...}`` on a vhost of this test's own."""
    parts = urlsplit(request.config.getoption("RABBIT_AMQP_URI"))
    vhost = vhost_pipeline.get()
    config = {
        "AMQP_URI": f"{parts.scheme}://{parts.netloc}/{vhost}",
        "username": unquote(parts.username or "guest"),
        "vhost": vhost,
    }
    yield config
    vhost_pipeline.discard(vhost)


@pytest.fixture
def rabbit_ssl_config(
    request: pytest.FixtureRequest, rabbit_config: dict[str, Any]
) -> dict[str, Any]:
    """``rabbit_config`` on the broker's AMQPS port, with ``AMQP_SSL`` options."""
    import yaml

    options: dict[str, Any] = dict(DEFAULT_AMQP_SSL_OPTIONS)
    for option in request.config.getoption("AMQP_SSL_OPTIONS"):
        key, sep, value = option.partition("=")
        if not sep:
            raise pytest.UsageError(
                f"--amqp-ssl-option takes KEY=VALUE, not {option!r}"
            )
        options[key] = yaml.safe_load(value)
    if isinstance(options.get("cert_reqs"), str):
        options["cert_reqs"] = getattr(ssl, options["cert_reqs"])

    parts = urlsplit(rabbit_config["AMQP_URI"])
    userinfo, _, _ = parts.netloc.rpartition("@")
    host = f"{userinfo}@{parts.hostname}" if userinfo else parts.hostname
    netloc = f"{host}:{request.config.getoption('AMQP_SSL_PORT')}"
    return {
        **rabbit_config,
        "AMQP_URI": urlunsplit(parts._replace(netloc=netloc)),
        "AMQP_SSL": options,
    }


@pytest.fixture
def amqp_uri(rabbit_config: dict[str, Any]) -> str:
    return rabbit_config["AMQP_URI"]


@pytest.fixture
def get_message_from_queue(amqp_uri: str) -> Callable[..., Any]:
    """``get_message(queue_name, ack=True, block=True, timeout=1, accept=None)``.

    ``accept`` is a content type or a list of them.

    Takes one message (a kombu ``Message``) straight off a queue in this test's
    vhost, without declaring the queue. Raises ``queue.Empty`` if none arrives in
    ``timeout`` seconds (at once if not ``block``). Unacked messages go back to the
    queue.
    """
    import kombu

    def get_message(
        queue_name: str,
        ack: bool = True,
        block: bool = True,
        timeout: float = 1,
        accept: str | list[str] | None = None,
    ) -> Any:
        if isinstance(accept, str):  # nameko's tests pass one content type
            accept = [accept]
        deadline = concurrency.Deadline(timeout if block else 0)
        with kombu.Connection(amqp_uri) as connection:
            bound = kombu.Queue(queue_name, no_declare=True).bind(
                connection.default_channel
            )
            while True:
                message = bound.get(no_ack=False, accept=accept)
                if message is not None:
                    if ack:
                        message.ack()
                    return message
                if deadline.expired():
                    raise queue.Empty(
                        f"no message on {queue_name!r} within {timeout} seconds"
                    )
                concurrency.sleep(0.05)

    return get_message


# -- containers and runners ---------------------------------------------------------


@pytest.fixture
def container_factory() -> Iterator[Callable[..., Any]]:
    """``container_factory(service_cls, config=None)``: a container, killed at teardown."""
    from framework.containers import get_container_cls

    containers: list[Any] = []

    def make_container(service_cls: type, config: dict[str, Any] | None = None) -> Any:
        config = {} if config is None else config
        container = get_container_cls(config)(service_cls, config)
        containers.append(container)
        return container

    yield make_container
    for container in containers:
        _kill_quietly(container)


@pytest.fixture
def runner_factory() -> Iterator[Callable[..., Any]]:
    """``runner_factory(config, *service_classes)``: a runner, killed at teardown.

    The config may be left out (nameko 3's spelling): ``runner_factory(ServiceA)``.
    """
    from framework.runners import ServiceRunner

    runners: list[Any] = []

    def make_runner(*args: Any) -> Any:
        if args and isinstance(args[0], dict):
            config, service_classes = args[0], args[1:]
        else:
            config, service_classes = {}, args
        runner = ServiceRunner(config)
        for service_cls in service_classes:
            runner.add_service(service_cls)
        runners.append(runner)
        return runner

    yield make_runner
    for runner in runners:
        _kill_quietly(runner)


def _kill_quietly(target: Any) -> None:
    try:
        target.kill()
    except Exception:
        log.warning("error killing %r at teardown", target, exc_info=True)


@pytest.fixture(autouse=True)
def fast_teardown(request: pytest.FixtureRequest) -> None:
    """Tear containers and runners down before the vhost they use goes.

    pytest tears fixtures down in reverse order of setup, which follows the order
    of a test's arguments; ``def test(container_factory, rabbit_config)`` would
    hand the vhost back for deletion while its containers still run, and their
    consumers would spin reconnecting to a vanished vhost until killed. Setting
    ``rabbit_config`` up first, whatever the argument order, fixes that.
    """
    for name in ("rabbit_config", "container_factory", "runner_factory"):
        if name in request.fixturenames:
            request.getfixturevalue(name)


@pytest.fixture
def predictable_call_ids() -> Iterator[Any]:
    """Worker call ids end in ``0``, ``1``, ``2``... instead of uuids."""
    with patch("framework.containers.new_call_id", autospec=True) as new_call_id:
        new_call_id.side_effect = (str(i) for i in itertools.count())
        yield new_call_id


# -- web ------------------------------------------------------------------------------


@pytest.fixture
def web_config(empty_config: dict[str, Any]) -> dict[str, Any]:
    """``empty_config`` plus ``WEB_SERVER_ADDRESS`` on a free local port."""
    from framework.constants import WEB_SERVER_CONFIG_KEY
    from framework.testing.utils import find_free_port

    empty_config[WEB_SERVER_CONFIG_KEY] = f"127.0.0.1:{find_free_port()}"
    return empty_config


@pytest.fixture
def web_config_port(web_config: dict[str, Any]) -> int:
    from framework.constants import WEB_SERVER_CONFIG_KEY

    _, _, port = web_config[WEB_SERVER_CONFIG_KEY].rpartition(":")
    return int(port)


class WebSession(requests.Session):
    """A requests session whose relative URLs are resolved against ``base_url``."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> Any:  # type: ignore[override]
        if isinstance(url, bytes):
            url = url.decode()
        return super().request(method, urljoin(self.base_url, url), *args, **kwargs)


@pytest.fixture
def web_session(web_config_port: int) -> Iterator[WebSession]:
    """``web_session.get('/path')`` talks to the service on ``web_config``'s port."""
    with WebSession(f"http://127.0.0.1:{web_config_port}/") as session:
        yield session


@pytest.fixture
def websocket(web_config_port: int) -> Iterator[Callable[[], Any]]:
    """``websocket()``: a connected ``VirtualSocket`` to ``/ws`` on ``web_config``'s port."""
    from framework.testing.websocket import make_virtual_socket

    opened: list[tuple[Any, Any]] = []

    def connect() -> Any:
        ws_app, wait_for_socket = make_virtual_socket("127.0.0.1", web_config_port)
        opened.append((concurrency.spawn(ws_app.run_forever), ws_app))
        return wait_for_socket()

    yield connect
    for thread, ws_app in opened:
        try:
            ws_app.close()
        except Exception:
            log.debug("closing websocket failed", exc_info=True)
        concurrency.kill(thread)


# -- the in-memory broker -------------------------------------------------------------


def reset_memory_broker() -> None:
    """Forget every queue, exchange and binding of kombu's in-process broker."""
    from kombu.transport import memory

    memory.Channel.queues.clear()
    memory.Transport.global_state.clear()


@pytest.fixture
def memory_config() -> Iterator[dict[str, Any]]:
    """``{'AMQP_URI': 'memory://'}``: services and proxies on kombu's in-process
    broker, for unit tests that need no RabbitMQ. The broker starts empty."""
    reset_memory_broker()
    yield {"AMQP_URI": "memory://"}
    reset_memory_broker()
