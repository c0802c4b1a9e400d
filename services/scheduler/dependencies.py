"""The scheduler's own dependency providers.

* ``ScheduleStore``: the framework's engine provider injecting a
  ``ScheduleRepository`` (``repository``: the schedules API; ``claiming``: the
  claim of due ticks);
* ``RunLauncher``: ``self.launch(launch)`` from any worker calls a claimed run's
  target in a worker of its own, the ``run_target`` method (``entrypoints``, with
  the ``ticker`` loop), which calls it with ``targets.call_target``.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING

from framework.database import EngineProvider, database_url, normalise_url
from framework.extensions import DependencyProvider
from services.scheduler.claiming import Launch, SchedulerSettings
from services.scheduler.entrypoints import RunTarget
from services.scheduler.repository import ScheduleRepository
from services.scheduler.schemas import (
    RUN_ID_CONTEXT_KEY,
    SCHEDULE_ID_CONTEXT_KEY,
    SCHEDULED_FOR_CONTEXT_KEY,
)

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

# -- config keys ---------------------------------------------------------------------
REPLICA_CONFIG_KEY = "SCHEDULER_REPLICA"
MISFIRE_GRACE_CONFIG_KEY = "SCHEDULER_MISFIRE_GRACE_SECONDS"
LOST_AFTER_CONFIG_KEY = "SCHEDULER_LOST_AFTER_SECONDS"

DEFAULT_MISFIRE_GRACE_SECONDS = 5.0
DEFAULT_LOST_AFTER_SECONDS = 10.0
# A replica stopped (SIGSTOP, a VM paused) inside a claim transaction holds its
# schedules' row locks; PostgreSQL ends such a session after this long, its claim
# rolls back, and the other replicas take over those schedules.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 2000
# The runs of one second record their outcomes at about the same time: with
# SQLAlchemy's default pool (5 kept, 10 more opened on demand and closed on
# return) a replica opened and closed a dozen connections every second, each a
# new PostgreSQL backend. Twenty are kept; a burst beyond 25 waits for one.
POOL_OPTIONS = {"pool_size": 20, "max_overflow": 5}


class ScheduleStore(EngineProvider[ScheduleRepository]):
    """The engine provider injecting a ``ScheduleRepository``, with the replica's settings."""

    settings: SchedulerSettings

    def setup(self) -> None:
        config = self.container.config
        url = normalise_url(
            database_url(
                config, self.container.service_name, self.declarative_base_name
            )
        )
        if url.get_backend_name() == "postgresql":
            connect_args = dict(self.engine_options.get("connect_args") or {})
            connect_args.setdefault(
                "options",
                f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
            )
            self.engine_options = {
                # Defaults DB_ENGINE_OPTIONS may override.
                **POOL_OPTIONS,
                **self.engine_options,
                "connect_args": connect_args,
            }
        self.settings = SchedulerSettings(
            replica=config.get(REPLICA_CONFIG_KEY)
            or f"{socket.gethostname()}:{os.getpid()}",
            misfire_grace=timedelta(
                seconds=float(
                    config.get(MISFIRE_GRACE_CONFIG_KEY, DEFAULT_MISFIRE_GRACE_SECONDS)
                )
            ),
            lost_after=timedelta(
                seconds=float(
                    config.get(LOST_AFTER_CONFIG_KEY, DEFAULT_LOST_AFTER_SECONDS)
                )
            ),
        )
        super().setup()

    def get_dependency(self, worker_ctx: WorkerContext) -> ScheduleRepository:
        return ScheduleRepository(
            self.worker_database(worker_ctx).session, self.settings
        )


class RunLauncher(DependencyProvider["RunLauncher"]):
    """Injects ``launch(launch)``: call a claimed run's target in a worker of its own.

    The run's tick, id and schedule travel in the worker's context data, hence in
    the headers of the RPC request or event, for the target to read.
    """

    def setup(self) -> None:
        found = [e for e in self.container.entrypoints if isinstance(e, RunTarget)]
        if len(found) != 1:
            raise RuntimeError("RunLauncher needs exactly one @run_target method")
        self.entrypoint = found[0]

    def get_dependency(self, worker_ctx: WorkerContext) -> RunLauncher:
        return self

    def __call__(self, launch: Launch) -> None:
        self.launch(launch)

    def launch_all(self, launches: list[Launch]) -> None:
        """Start many runs from a thread of their own: the caller (an RPC) does
        not wait while they queue for free workers."""
        if launches:
            self.container.spawn_worker_related(self._launch_each, launches)

    def _launch_each(self, launches: list[Launch]) -> None:
        for launch in launches:
            self.launch(launch)

    def launch(self, launch: Launch) -> None:
        self.container.spawn_worker(
            self.entrypoint,
            (launch,),
            {},
            context_data={
                RUN_ID_CONTEXT_KEY: launch.run_id,
                SCHEDULE_ID_CONTEXT_KEY: launch.schedule["id"],
                SCHEDULED_FOR_CONTEXT_KEY: launch.scheduled_for,
            },
        )
