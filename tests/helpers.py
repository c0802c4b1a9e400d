"""Helpers shared by the test suites."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kombu

from framework import concurrency
from framework.testing.utils import find_free_port

PROXY_SCRIPT = Path(__file__).resolve().parent / "tcp_proxy.py"


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


class TcpProxy:
    """``tests/tcp_proxy.py`` in its own process, in front of a local server: ``cut()``
    makes the server look down to everyone connected through ``port``, ``restore()``
    brings it back."""

    def __init__(self, upstream_port: int) -> None:
        self.port = find_free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(PROXY_SCRIPT), str(self.port), str(upstream_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def _reachable(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _command(self, command: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == command

    def cut(self) -> None:
        self._command("cut")
        wait_for(lambda: not self._reachable(), timeout=10)

    def restore(self) -> None:
        self._command("restore")
        wait_for(self._reachable, timeout=10)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
