"""``@timer(interval, eager=False)``: run a method on a fixed schedule."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from framework import concurrency
from framework.containers import WorkerContext
from framework.exceptions import ContainerBeingKilled
from framework.extensions import Entrypoint

log = logging.getLogger(__name__)


class Timer(Entrypoint):
    """Ticks at ``start + k * interval``; one worker at a time, never overlapping.

    A run that overruns makes the next tick fire at once; as in nameko, missed
    ticks are not skipped but fired back to back until the grid is caught up.
    Fires in every instance of the service.
    """

    def __init__(self, interval: float, eager: bool = False, **kwargs: Any) -> None:
        self.interval = interval
        self.eager = eager
        self._stopping = concurrency.Event()
        self._thread: Any = None
        super().__init__(**kwargs)

    def start(self) -> None:
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier=f"timer[{self.method_name}]"
        )

    def stop(self) -> None:
        # Only stop scheduling: a tick in progress is an in-flight worker, which the
        # container waits for within its drain deadline (nameko waited here, with
        # no deadline at all).
        if not self._stopping.ready():
            self._stopping.send(True)

    def kill(self) -> None:
        if self._thread is not None:
            concurrency.kill(self._thread)

    def _run(self) -> None:
        started = time.monotonic()
        tick = 0 if self.eager else 1
        while True:
            delay = max(started + tick * self.interval - time.monotonic(), 0)
            with concurrency.Timeout(delay, False):
                self._stopping.wait()
            if self._stopping.ready():
                return
            done = concurrency.Event()
            try:
                self.container.spawn_worker(
                    self, (), {}, handle_result=partial(self._finished, done)
                )
            except ContainerBeingKilled:
                return  # a tick racing kill(): nothing to run, nothing to report
            done.wait()
            tick += 1

    @staticmethod
    def _finished(
        done: Any, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        done.send(None)
        return result, exc_info


timer = Timer.decorator

__all__ = ["Timer", "timer", "WorkerContext"]
