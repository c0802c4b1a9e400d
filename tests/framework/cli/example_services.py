"""Services for ``framework run`` to host in ``test_run.py``; none needs a broker.

``framework.testing`` may not offer a dummy entrypoint yet, so the few entrypoints
these need are defined here.
"""

from __future__ import annotations

import gc
import sys

from framework import concurrency
from framework.extensions import Entrypoint
from framework.timer import timer


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


class HeapWatcher:
    """Prints the garbage collector's frozen object count once it is not zero."""

    name = "cli_heap_watcher"
    reported = False

    @timer(interval=0.05)
    def watch(self) -> None:
        frozen = gc.get_freeze_count()
        if frozen and not HeapWatcher.reported:
            HeapWatcher.reported = True
            print(f"frozen objects: {frozen}", file=sys.stderr, flush=True)
