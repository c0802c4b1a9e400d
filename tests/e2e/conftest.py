"""Whole-system tests: compose.yaml's services as real processes, mocking nothing.

Each module starts the application once (``start_app``) on a fresh RabbitMQ vhost
and a fresh set of PostgreSQL databases, through ``tests/e2e/compose.py``, and
talks to it only as its users do: the web service's HTTP API and websocket, and,
for the faults, signals and cut connections (``tests/tcp_proxy.py``). The one
addition to compose's environment is argon2 at its cheapest, so that logins do
not dominate the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .compose import Compose, LocalApp

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
FAST_HASHING = {
    "ARGON2_TIME_COST": "1",
    "ARGON2_MEMORY_COST": "8",
    "ARGON2_PARALLELISM": "1",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def make_app(
    request: pytest.FixtureRequest,
    vhost_pipeline: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LocalApp]]:
    """``make_app(amqp_port=None, postgres_port=None, env=None)``: a ``LocalApp`` on a
    fresh vhost and databases (through proxies when ports are given), torn down
    (processes stopped, databases dropped, vhost deleted) after the module."""
    made: list[tuple[LocalApp, str]] = []
    amqp = request.config.getoption("RABBIT_AMQP_URI")

    def make(
        amqp_port: int | None = None,
        postgres_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> LocalApp:
        vhost = vhost_pipeline.get()
        parts = urlsplit(amqp)
        netloc = parts.netloc
        if amqp_port is not None:
            netloc = f"{netloc.rpartition('@')[0]}@127.0.0.1:{amqp_port}"
        base = f"{parts.scheme}://{netloc}"
        server = PG_SERVER
        if postgres_port is not None:
            server = server.replace(":5432", f":{postgres_port}")
        app = LocalApp(
            compose=Compose(env={**(env or {})}),
            amqp_uri=f"{base}/{vhost}",
            postgres_server=server,
            admin_server=PG_SERVER,
            db_prefix=f"e2e_{uuid.uuid4().hex[:8]}",
            workdir=tmp_path_factory.mktemp("app"),
            extra_env=dict(FAST_HASHING),
        )
        made.append((app, vhost))
        app.create_databases()
        return app

    yield make
    for app, vhost in made:
        try:
            app.down()
        finally:
            app.drop_databases()
            vhost_pipeline.discard(vhost)
