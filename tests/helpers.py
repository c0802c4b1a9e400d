"""Helpers shared by the test suites."""

from __future__ import annotations

from typing import Any

import kombu

from framework import concurrency


class Spy:
    """A queue bound to an exchange, to see exactly what went over the wire."""

    def __init__(self, amqp_uri: str, exchange: str, routing_key: str = "#") -> None:
        self.connection = kombu.Connection(amqp_uri)
        self.channel = self.connection.channel()
        self.queue = kombu.Queue(
            f"spy-{id(self)}",
            exchange=kombu.Exchange(exchange, type="topic", durable=True),
            routing_key=routing_key,
            auto_delete=True,
        ).bind(self.channel)
        self.queue.declare()

    def get(self, timeout: float = 5) -> Any:
        deadline = concurrency.Deadline(timeout)
        while not deadline.expired():
            message = self.queue.get(no_ack=True)
            if message is not None:
                return message
            concurrency.sleep(0.02)
        raise AssertionError(f"no message reached the spy queue within {timeout}s")

    def close(self) -> None:
        self.connection.release()


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` is true, failing the test at the deadline."""
    deadline = concurrency.Deadline(timeout)
    while not predicate():
        if deadline.expired():
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        concurrency.sleep(interval)
