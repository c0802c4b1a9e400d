"""Service lifecycle hooks: ``@on_start`` runs a service method as its container starts.

For start-up work a service needs done before it takes requests (bootstrapping an
account, warming a cache, checking a schema)::

    class Service:
        name = "accounts"

        @on_start
        def create_first_admin(self) -> None:
            ...

The method runs in an ordinary worker, with every dependency injected, once per
container (so once per replica: make it idempotent, or let a unique index settle
the race between replicas).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from framework import concurrency
from framework.extensions import Entrypoint

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = ["OnStart", "on_start"]


class OnStart(Entrypoint):
    """Runs the decorated method once, in a worker, as the container starts.

    The container's ``start()`` waits for it and fails with its exception: a
    service whose start-up work failed must not look healthy. Every extension
    starts concurrently, so other entrypoints may already take messages while it
    runs.
    """

    def start(self) -> None:
        finished = concurrency.Event()

        def handle_result(worker_ctx: WorkerContext, result: Any, exc_info: Any) -> Any:
            finished.send(exc_info)
            return result, exc_info

        self.container.spawn_worker(self, (), {}, handle_result=handle_result)
        exc_info = finished.wait()
        if exc_info is not None:
            log.error(
                "start-up hook failed",
                extra={
                    "service": self.container.service_name,
                    "entrypoint": self.method_name,
                    "error_type": type(exc_info[1]).__name__,
                },
            )
            raise exc_info[1]


on_start = OnStart.decorator
