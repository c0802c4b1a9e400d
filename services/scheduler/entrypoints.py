"""The scheduler's entrypoints: the tick loop (``ticker``) and the method that
calls one claimed run's target (``run_target``, started by ``RunLauncher``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from framework import concurrency
from framework.extensions import Entrypoint
from services.scheduler.claiming import MAX_WAIT_SECONDS

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

# After the claim failed (database down), before trying again.
ERROR_WAIT_SECONDS = 1.0


class Ticker(Entrypoint):
    """Calls the method in a worker, waits the seconds it returns, and again.

    One call at a time per replica. A call that raises (database down) is logged
    and retried after ``ERROR_WAIT_SECONDS``. Stopping ends the loop; a call in
    progress is an in-flight worker, drained by the container.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._stopping = concurrency.Event()
        self._thread: Any = None
        super().__init__(**kwargs)

    def start(self) -> None:
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier=f"ticker[{self.method_name}]"
        )

    def stop(self) -> None:
        if not self._stopping.ready():
            self._stopping.send(True)

    def kill(self) -> None:
        if self._thread is not None:
            concurrency.kill(self._thread)

    def _run(self) -> None:
        while not self._stopping.ready():
            done = concurrency.Event()
            self.container.spawn_worker(
                self, (), {}, handle_result=partial(self._finished, done)
            )
            wait = done.wait()
            with concurrency.Timeout(wait, False):
                self._stopping.wait()

    @staticmethod
    def _finished(
        done: Any, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        if exc_info is not None or not isinstance(result, int | float):
            done.send(ERROR_WAIT_SECONDS)
        else:
            done.send(min(max(float(result), 0.0), MAX_WAIT_SECONDS))
        return result, exc_info


class RunTarget(Entrypoint):
    """Marks the method that calls one claimed run's target (``RunLauncher`` starts it)."""


ticker: Callable[..., Any] = Ticker.decorator
run_target: Callable[..., Any] = RunTarget.decorator
