"""Fixtures for the framework's own tests.

Integration tests here talk to the real RabbitMQ through ``rabbit_config`` (a fresh
vhost per test); they never mock the broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Spy


@pytest.fixture
def spy(rabbit_config: dict[str, Any]) -> Iterator[Any]:
    spies: list[Spy] = []

    def make(exchange: str, routing_key: str = "#") -> Spy:
        instance = Spy(rabbit_config["AMQP_URI"], exchange, routing_key)
        spies.append(instance)
        return instance

    yield make
    for instance in spies:
        instance.close()
