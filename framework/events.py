"""Publish-subscribe events on nameko's wire format.

A service dispatches to its own topic exchange ``<service>.events`` with the event
type as routing key. Handlers consume queues named after the handler type::

    SERVICE_POOL  evt-<source>-<type>--<service>.<method>        one per service
    SINGLETON     evt-<source>-<type>                            one in the cluster
    BROADCAST     evt-<source>-<type>--<service>.<method>-<id>   one per instance
"""

from __future__ import annotations

import uuid
from typing import Any

import kombu

from framework.constants import (
    AUTO_DELETE_EVENT_EXCHANGES_CONFIG_KEY,
    DECLARE_EVENT_EXCHANGES_CONFIG_KEY,
)
from framework.containers import WorkerContext
from framework.messaging import Consumer, Publisher

SERVICE_POOL = "service_pool"
SINGLETON = "singleton"
BROADCAST = "broadcast"
HANDLER_TYPES = (SERVICE_POOL, SINGLETON, BROADCAST)


class EventHandlerConfigurationError(Exception):
    pass


def get_event_exchange(
    service_name: str, config: dict[str, Any] | None = None
) -> kombu.Exchange:
    config = config or {}
    auto_delete = bool(config.get(AUTO_DELETE_EVENT_EXCHANGES_CONFIG_KEY))
    no_declare = config.get(DECLARE_EVENT_EXCHANGES_CONFIG_KEY) is False
    return kombu.Exchange(
        f"{service_name}.events",
        type="topic",
        durable=True,
        auto_delete=auto_delete,
        delivery_mode=2,
        no_declare=no_declare,
    )


class EventDispatcher(Publisher):
    """Injects ``dispatch(event_type, event_data)``: publish to ``<service>.events``."""

    def setup(self) -> None:
        self.exchange = get_event_exchange(
            self.container.service_name, self.container.config
        )
        if not self.exchange.no_declare:
            self.declare.append(self.exchange)
        super().setup()

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        publish = super().get_dependency(worker_ctx)

        def dispatch(event_type: str, event_data: Any, **kwargs: Any) -> None:
            publish(event_data, routing_key=event_type, **kwargs)

        return dispatch


class EventHandler(Consumer):
    """Runs the decorated method with the payload of each ``event_type`` from
    ``source_service``. With ``reliable_delivery`` (default) the queue outlives the
    service; ``requeue_on_error`` redelivers a failed event, a bounded number of
    times, then dead-letters it."""

    def __init__(
        self,
        source_service: str,
        event_type: str,
        handler_type: str = SERVICE_POOL,
        reliable_delivery: bool = True,
        requeue_on_error: bool = False,
        **kwargs: Any,
    ) -> None:
        if handler_type not in HANDLER_TYPES:
            raise EventHandlerConfigurationError(
                f"unknown handler type {handler_type!r}; use one of {HANDLER_TYPES}"
            )
        self.source_service = source_service
        self.event_type = event_type
        self.handler_type = handler_type
        self.reliable_delivery = reliable_delivery
        super().__init__(queue=None, requeue_on_error=requeue_on_error, **kwargs)  # type: ignore[arg-type]

    def bind(self, container: Any, method_name: str) -> EventHandler:  # type: ignore[override]
        instance: EventHandler = super().bind(container, method_name)  # type: ignore[assignment]
        if instance.handler_type == BROADCAST:
            _ = instance.broadcast_identifier  # fail at construction, as nameko does
        return instance

    @property
    def broadcast_identifier(self) -> str:
        """Distinguishes instances of a BROADCAST handler. The default, a fresh uuid,
        loses broadcasts across restarts, so it cannot be combined with reliable
        delivery: override it (e.g. with the host name) to use both."""
        if self.reliable_delivery:
            raise EventHandlerConfigurationError(
                "You are using the default broadcast identifier which is not "
                "compatible with reliable delivery. See "
                ":meth:`framework.events.EventHandler.broadcast_identifier` for details."
            )
        identifier = getattr(self, "_broadcast_id", None)
        if identifier is None:
            identifier = self._broadcast_id = uuid.uuid4().hex
        return identifier

    def setup(self) -> None:
        service_name = self.container.service_name
        exchange = get_event_exchange(self.source_service, self.container.config)
        queue_name = f"evt-{self.source_service}-{self.event_type}"
        exclusive = False
        if self.handler_type == SERVICE_POOL:
            queue_name += f"--{service_name}.{self.method_name}"
        elif self.handler_type == BROADCAST:
            queue_name += (
                f"--{service_name}.{self.method_name}-{self.broadcast_identifier}"
            )
            exclusive = not self.reliable_delivery
        self.queue = kombu.Queue(
            queue_name,
            exchange=exchange,
            routing_key=self.event_type,
            durable=True,
            auto_delete=not self.reliable_delivery,
            exclusive=exclusive,
        )
        super().setup()


event_handler = EventHandler.decorator
