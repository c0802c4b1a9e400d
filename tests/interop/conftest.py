"""Interoperability with the real nameko 2.14.1, over the real RabbitMQ.

Nothing is mocked here: the point is the wire. Our services run in the test
process; nameko's run as ``nameko run`` processes and its clients as scripts, from
their own venv (see ``peers.py``). Each test module gets a fresh vhost, shared by
its nameko processes (started once per module) and the test's own containers, so
nothing collides with other tests on the same broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from interop.peers import NamekoProcess, nameko_python, run_nameko_script


@pytest.fixture(scope="session")
def nameko_venv_python() -> Path:
    return nameko_python()


@pytest.fixture(scope="module")
def interop_config(
    request: pytest.FixtureRequest, vhost_pipeline: Any
) -> Iterator[dict[str, Any]]:
    """``{"AMQP_URI": ...}`` on a vhost of this module's own, for both sides."""
    parts = urlsplit(request.config.getoption("RABBIT_AMQP_URI"))
    vhost = vhost_pipeline.get()
    yield {"AMQP_URI": f"{parts.scheme}://{parts.netloc}/{vhost}", "vhost": vhost}
    vhost_pipeline.discard(vhost)


@pytest.fixture
def config(interop_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the module's config for one test's containers and clients."""
    return dict(interop_config)


@pytest.fixture(scope="module")
def start_nameko(
    interop_config: dict[str, Any],
    nameko_venv_python: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., NamekoProcess]]:
    """``start_nameko(*service_names)``: one ``nameko run`` of those services, ready
    (every one answers ``ping``); stopped, or killed, when the module is done."""
    processes: list[NamekoProcess] = []

    def start(*service_names: str) -> NamekoProcess:
        workdir = tmp_path_factory.mktemp("nameko")
        process = NamekoProcess(
            nameko_venv_python, list(service_names), interop_config, workdir
        )
        processes.append(process)
        process.wait_until_ready()
        return process

    yield start
    for process in processes:
        process.stop()


@pytest.fixture
def nameko_client(
    interop_config: dict[str, Any], nameko_venv_python: Path
) -> Callable[..., list[dict[str, Any]]]:
    """``nameko_client(actions, context_data=None)``: run actions with nameko's
    standalone proxy and dispatcher (see ``nameko_side/client.py``); their outcomes."""

    def run(
        actions: list[dict[str, Any]],
        context_data: dict[str, Any] | None = None,
        timeout: float = 10,
    ) -> list[dict[str, Any]]:
        request = {
            "config": interop_config,
            "context_data": context_data,
            "timeout": timeout,
            "actions": actions,
        }
        return run_nameko_script(
            nameko_venv_python, "interop.nameko_side.client", request
        )

    return run
