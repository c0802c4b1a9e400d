"""``framework.lifecycle``: ``@on_start`` runs a service method as the container starts."""

from __future__ import annotations

from typing import Any

import pytest

from framework.dependency_providers import Config
from framework.lifecycle import on_start


def test_on_start_runs_the_method_in_a_worker_before_start_returns(
    container_factory: Any,
) -> None:
    calls: list[Any] = []

    class Service:
        name = "starter"
        config = Config()

        @on_start
        def prepare(self) -> None:
            # Dependencies are injected: it is an ordinary worker.
            calls.append(self.config["SETTING"])

    container = container_factory(Service, {"SETTING": "on"})
    container.start()

    assert calls == ["on"]


def test_a_failing_on_start_method_fails_the_start(container_factory: Any) -> None:
    class Broken(Exception):
        pass

    class Service:
        name = "starter"

        @on_start
        def prepare(self) -> None:
            raise Broken("no database")

    container = container_factory(Service, {})

    with pytest.raises(Broken, match="no database"):
        container.start()
