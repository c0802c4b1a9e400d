"""The users service's readiness follows its dependencies: it turns not ready when
PostgreSQL or RabbitMQ goes away, and ready again when they return.

Both outages are real from the service's side: its connections go through TCP
proxies we unplug (``tests/tcp_proxy.py``), while other tests keep the real
servers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from framework.standalone.rpc import ClusterRpcProxy
from services.users.service import UsersService
from tests.helpers import TcpProxy, wait_for


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (
        f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def proxies():
    started: list[TcpProxy] = []

    def start(upstream_port: int) -> TcpProxy:
        proxy = TcpProxy(upstream_port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


def readiness(runner: Any) -> int:
    port = runner.health_server.port
    return requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).status_code


def test_readiness_follows_postgresql_and_rabbitmq(config, proxies, runner_factory):
    database = proxies(5432)
    broker = proxies(5672)
    service_config = {
        **config,
        "DATABASE_URL": through(database, config["DATABASE_URL"]),
        "AMQP_URI": through(broker, config["AMQP_URI"]),
        "HEALTH_SERVER_ADDRESS": "127.0.0.1:0",
    }
    runner = runner_factory(service_config, UsersService)
    runner.start()
    wait_for(lambda: readiness(runner) == 200, timeout=20)

    database.cut()
    wait_for(lambda: readiness(runner) == 503, timeout=20)
    database.restore()
    wait_for(lambda: readiness(runner) == 200, timeout=30)

    broker.cut()
    wait_for(lambda: readiness(runner) == 503, timeout=20)
    broker.restore()
    wait_for(lambda: readiness(runner) == 200, timeout=30)

    # And it serves again, against the database it lost for a while.
    with ClusterRpcProxy(config, timeout=10) as cluster:
        created = cluster.users.create_user(
            email="back@example.com",
            display_name="Back",
            password="correct horse battery",
        )
        assert cluster.users.get_user(created["id"])["email"] == "back@example.com"
