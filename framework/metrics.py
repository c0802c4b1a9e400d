"""Prometheus metrics of every service in the process, served at ``/metrics``.

The health server (``framework.health``) turns them on and serves them; anything
else can call ``enable()`` and serve ``render()`` itself. Until ``enable()`` nothing
is recorded and the hot paths pay for an empty loop only.

Metrics (all in this process's own ``REGISTRY``, not prometheus_client's global
one, so a library that registers there cannot clash with us)::

    framework_workers_total{service, entrypoint, outcome}       counter
    framework_worker_duration_seconds{service, entrypoint}      histogram
    framework_workers_in_flight{service, entrypoint}            gauge
    framework_messages_published_total{service, exchange}       counter
    framework_messages_consumed_total{service, queue}           counter

plus the standard ``process_*`` and ``python_*`` collectors. ``outcome`` is
``success``, ``expected_error``, ``error`` or ``killed``. A worker's duration is
the whole worker, as in the ``worker finished`` log record (``framework.logs``).
Published messages are counted once the broker confirmed them, under the
default exchange's name ``""`` for direct-to-queue publishes; a publisher outside
any service (a standalone proxy) counts under ``service=""``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from framework import containers
from framework.amqp import consume, publish

if TYPE_CHECKING:
    from framework.amqp.consume import ConsumeLoop
    from framework.amqp.publish import Publisher
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = [
    "CONTENT_TYPE",
    "MESSAGES_CONSUMED",
    "MESSAGES_PUBLISHED",
    "REGISTRY",
    "WORKERS",
    "WORKERS_IN_FLIGHT",
    "WORKER_DURATION",
    "disable",
    "enable",
    "is_enabled",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Workers range from sub-millisecond RPC handlers to batch jobs of minutes.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

WORKERS = Counter(
    "framework_workers",
    "Workers finished, by outcome.",
    ["service", "entrypoint", "outcome"],
    registry=REGISTRY,
)
WORKER_DURATION = Histogram(
    "framework_worker_duration_seconds",
    "Time from a worker's start to the end of its teardown.",
    ["service", "entrypoint"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
WORKERS_IN_FLIGHT = Gauge(
    "framework_workers_in_flight",
    "Workers running now.",
    ["service", "entrypoint"],
    registry=REGISTRY,
)
MESSAGES_PUBLISHED = Counter(
    "framework_messages_published",
    "Messages published and confirmed by the broker.",
    ["service", "exchange"],
    registry=REGISTRY,
)
MESSAGES_CONSUMED = Counter(
    "framework_messages_consumed",
    "Messages delivered to a service's consumers.",
    ["service", "queue"],
    registry=REGISTRY,
)


class _LabelCache:
    """``metric.labels(*key)``, remembered.

    ``labels()`` validates and takes a lock on every call; this is on the path of
    every worker and message, and the label sets are few and fixed.
    """

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *key: str) -> Any:
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.metric.labels(*key)
        return child


class WorkerMetrics:
    """The worker observer (``containers.WorkerObserver``) feeding the metrics."""

    def __init__(self) -> None:
        self._workers = _LabelCache(WORKERS)
        self._durations = _LabelCache(WORKER_DURATION)
        self._in_flight = _LabelCache(WORKERS_IN_FLIGHT)
        # Workers counted in flight. A worker that was already running when
        # metrics were enabled ends without having started for us, and must not
        # take the gauge below zero.
        self._running: set[WorkerContext] = set()

    def worker_started(self, worker_ctx: WorkerContext) -> None:
        self._running.add(worker_ctx)
        self._in_flight(
            worker_ctx.service_name, worker_ctx.entrypoint.method_name or ""
        ).inc()

    def worker_finished(
        self, worker_ctx: WorkerContext, outcome: str, duration: float
    ) -> None:
        service = worker_ctx.service_name
        entrypoint = worker_ctx.entrypoint.method_name or ""
        if worker_ctx in self._running:
            self._running.discard(worker_ctx)
            self._in_flight(service, entrypoint).dec()
        self._workers(service, entrypoint, outcome).inc()
        self._durations(service, entrypoint).observe(duration)

    def forget_running(self) -> None:
        """Take the workers counted in flight out of the gauge (when disabled)."""
        for worker_ctx in self._running:
            self._in_flight(
                worker_ctx.service_name, worker_ctx.entrypoint.method_name or ""
            ).dec()
        self._running.clear()


class MessageMetrics:
    """The publish and consume observers (``framework.amqp``) feeding the metrics."""

    def __init__(self) -> None:
        self._published = _LabelCache(MESSAGES_PUBLISHED)
        self._consumed = _LabelCache(MESSAGES_CONSUMED)

    def message_published(self, publisher: Publisher, exchange: str) -> None:
        self._published(publisher.service or "", exchange).inc()

    def message_consumed(self, loop: ConsumeLoop, queue: str) -> None:
        self._consumed(loop.name, queue).inc()


_worker_metrics = WorkerMetrics()
_message_metrics = MessageMetrics()


def enable() -> None:
    """Start recording (idempotent). Workers already running are not counted."""
    if is_enabled():
        return
    containers.worker_observers.append(_worker_metrics)
    publish.publish_observers.append(_message_metrics.message_published)
    consume.consume_observers.append(_message_metrics.message_consumed)
    log.debug("metrics enabled")


def disable() -> None:
    """Stop recording; what was recorded stays in ``REGISTRY``, except that
    workers still running leave the in-flight gauge (their ends go unobserved)."""
    _remove_all(containers.worker_observers, _worker_metrics)
    _remove_all(publish.publish_observers, _message_metrics.message_published)
    _remove_all(consume.consume_observers, _message_metrics.message_consumed)
    _worker_metrics.forget_running()


def _remove_all(observers: list[Any], observer: Any) -> None:
    while observer in observers:
        observers.remove(observer)


def is_enabled() -> bool:
    return _worker_metrics in containers.worker_observers


def render() -> bytes:
    """The registry in Prometheus' text exposition format (``CONTENT_TYPE``)."""
    return generate_latest(REGISTRY)
