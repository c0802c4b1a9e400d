"""Services for ``framework run`` to host in ``test_run.py``; none needs a broker.

``framework.testing`` may not offer a dummy entrypoint yet, so the few entrypoints
these need are defined here.
"""

from __future__ import annotations

from framework import concurrency
from framework.extensions import Entrypoint


class Idle(Entrypoint):
    """Never fires; enough to make a class a service."""


class NeverStops(Entrypoint):
    """A graceful stop that never finishes, so that only a kill ends the service."""

    def stop(self) -> None:
        concurrency.Event().wait()


class FailsToStart(Entrypoint):
    def start(self) -> None:
        raise RuntimeError("failing to start on purpose")


idle = Idle.decorator
never_stops = NeverStops.decorator
fails_to_start = FailsToStart.decorator


class Greeter:
    name = "cli_greeter"

    @idle
    def hello(self, name: str) -> str:
        return f"hello {name}"


class Stubborn:
    name = "cli_stubborn"

    @never_stops
    def linger(self) -> None:
        pass


class Broken:
    name = "cli_broken"

    @fails_to_start
    def nothing(self) -> None:
        pass
