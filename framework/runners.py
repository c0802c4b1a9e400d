"""``ServiceRunner``: several containers in one process, started and stopped together."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from framework import concurrency
from framework.containers import (
    ServiceContainer,
    get_container_cls,
    get_service_name,
    run_all,
)

if TYPE_CHECKING:
    from framework.health import HealthServer

log = logging.getLogger(__name__)


class ServiceRunner:
    def __init__(self, config: dict[str, Any]) -> None:
        self.service_map: dict[str, ServiceContainer] = {}
        self.config = config
        self.container_cls = get_container_cls(config)
        self.health_server: HealthServer | None = None

    @property
    def service_names(self) -> list[str]:
        return list(self.service_map)

    @property
    def containers(self) -> list[ServiceContainer]:
        return list(self.service_map.values())

    def add_service(self, cls: type) -> None:
        """Create the container now. A second class with the same name is an error
        (nameko silently replaced the first; that hid deployment mistakes)."""
        service_name = get_service_name(cls)
        if service_name in self.service_map:
            raise ValueError(f"a service named {service_name!r} was already added")
        self.service_map[service_name] = self.container_cls(cls, self.config)

    def start(self) -> None:
        log.info("starting services: %s", ", ".join(self.service_names))
        self._start_health_server()
        run_all(self.containers, "start")
        log.info("services started: %s", ", ".join(self.service_names))

    def stop(self) -> None:
        log.info("stopping services: %s", ", ".join(self.service_names))
        if self.health_server is not None:
            self.health_server.mark_stopping()
        try:
            run_all(self.containers, "stop")
        finally:
            self._stop_health_server()

    def kill(self) -> None:
        log.info("killing services: %s", ", ".join(self.service_names))
        run_all(self.containers, "kill", swallow=True)
        self._stop_health_server()

    def _start_health_server(self) -> None:
        """One health/metrics server per process, when ``HEALTH_SERVER_ADDRESS`` is set.

        Started before the containers so liveness answers while they start.
        """
        if self.health_server is not None:
            return
        # Imported here: werkzeug and prometheus_client load only when asked for.
        from framework.health import from_config

        self.health_server = from_config(self.config, lambda: self.containers)
        if self.health_server is not None:
            self.health_server.start()

    def _stop_health_server(self) -> None:
        if self.health_server is not None:
            self.health_server.stop()
            self.health_server = None

    def wait(self) -> None:
        """Wait until every container has stopped. If one dies with an error, the
        others are stopped gracefully and the error is raised."""
        threads = [concurrency.spawn(c.wait) for c in self.containers]
        try:
            for thread in threads:
                thread.wait()
        except Exception:
            self.stop()
            raise
        finally:
            for thread in threads:
                concurrency.kill(thread)


@contextmanager
def run_services(
    config: dict[str, Any], *services: type, kill_on_exit: bool = False
) -> Iterator[ServiceRunner]:
    """Run ``services`` for the duration of the block; always stops (or kills) them."""
    runner = ServiceRunner(config)
    for service in services:
        runner.add_service(service)
    runner.start()
    try:
        yield runner
    finally:
        if kill_on_exit:
            runner.kill()
        else:
            runner.stop()
