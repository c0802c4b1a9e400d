"""Loops that run a method again and again, one worker at a time.

* ``@timer(interval, eager=False)``: on a fixed schedule (nameko's timer);
* ``@paced(max_wait=..., error_wait=...)``: again after the seconds the method
  returns, for a loop that knows when its next piece of work is due (the
  scheduler's claim of due ticks).

Both share one loop (``RepeatingEntrypoint``): a worker at a time, never
overlapping; stopping ends the loop and the worker in progress is drained by the
container; a worker that could not be spawned because the container is being
killed ends the loop quietly.
"""

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

# ``@paced``'s defaults: the longest wait whatever the method returns (so work
# appearing elsewhere is noticed), and the wait after a call that raised.
DEFAULT_MAX_WAIT_SECONDS = 1.0
DEFAULT_ERROR_WAIT_SECONDS = 1.0


class RepeatingEntrypoint(Entrypoint):
    """The loop of ``Timer`` and ``Paced``: its thread, waits, and one call at a time.

    Subclasses write ``_run``, with ``_wait(seconds)`` (``False`` once stopping)
    and ``_call()`` (the worker's ``(result, exc_info)``, or ``None`` if the
    container is being killed).
    """

    thread_name = "loop"

    def __init__(self, **kwargs: Any) -> None:
        self._stopping = concurrency.Event()
        self._thread: Any = None
        super().__init__(**kwargs)

    def start(self) -> None:
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier=f"{self.thread_name}[{self.method_name}]"
        )

    def stop(self) -> None:
        # Only stop scheduling: a call in progress is an in-flight worker, which
        # the container waits for within its drain deadline (nameko waited here,
        # with no deadline at all).
        if not self._stopping.ready():
            self._stopping.send(True)

    def kill(self) -> None:
        if self._thread is not None:
            concurrency.kill(self._thread)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds``; ``False`` if the entrypoint is stopping."""
        with concurrency.Timeout(max(seconds, 0), False):
            self._stopping.wait()
        return not self._stopping.ready()

    def _call(self) -> tuple[Any, Any] | None:
        """Run the method in a worker and wait for it to end."""
        done = concurrency.Event()
        try:
            self.container.spawn_worker(
                self, (), {}, handle_result=partial(self._finished, done)
            )
        except ContainerBeingKilled:
            return None  # a call racing kill(): nothing to run, nothing to report
        return done.wait()  # type: ignore[no-any-return]

    @staticmethod
    def _finished(
        done: Any, worker_ctx: WorkerContext, result: Any, exc_info: Any
    ) -> tuple[Any, Any]:
        done.send((result, exc_info))
        return result, exc_info


class Timer(RepeatingEntrypoint):
    """Ticks at ``start + k * interval``; one worker at a time, never overlapping.

    A run that overruns makes the next tick fire at once; as in nameko, missed
    ticks are not skipped but fired back to back until the grid is caught up.
    Fires in every instance of the service.
    """

    thread_name = "timer"

    def __init__(self, interval: float, eager: bool = False, **kwargs: Any) -> None:
        self.interval = interval
        self.eager = eager
        super().__init__(**kwargs)

    def _run(self) -> None:
        started = time.monotonic()
        tick = 0 if self.eager else 1
        while True:
            if not self._wait(started + tick * self.interval - time.monotonic()):
                return
            if self._call() is None:
                return
            tick += 1


class Paced(RepeatingEntrypoint):
    """Calls the method, waits the seconds it returns, and calls it again.

    The wait is capped at ``max_wait``; a call that raises, or returns something
    other than a number, is logged by the container and followed by
    ``error_wait``. The first call is made at start. Fires in every instance.
    """

    thread_name = "paced"

    def __init__(
        self,
        max_wait: float = DEFAULT_MAX_WAIT_SECONDS,
        error_wait: float = DEFAULT_ERROR_WAIT_SECONDS,
        **kwargs: Any,
    ) -> None:
        self.max_wait = max_wait
        self.error_wait = error_wait
        super().__init__(**kwargs)

    def _run(self) -> None:
        while not self._stopping.ready():
            outcome = self._call()
            if outcome is None:
                return
            if not self._wait(self._next_wait(*outcome)):
                return

    def _next_wait(self, result: Any, exc_info: Any) -> float:
        if exc_info is not None:
            return self.error_wait
        if isinstance(result, bool) or not isinstance(result, int | float):
            log.warning(
                "paced method returned no number of seconds",
                extra={"entrypoint": self.method_name, "type": type(result).__name__},
            )
            return self.error_wait
        return min(max(float(result), 0.0), self.max_wait)


timer = Timer.decorator
paced = Paced.decorator

__all__ = [
    "Paced",
    "RepeatingEntrypoint",
    "Timer",
    "WorkerContext",
    "paced",
    "timer",
]
