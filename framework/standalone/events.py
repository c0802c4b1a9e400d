"""Dispatch events from outside any service."""

from __future__ import annotations

from typing import Any

from framework.amqp.publish import Publisher
from framework.constants import (
    CALL_ID_STACK_CONTEXT_KEY,
    DEFAULT_SERIALIZER,
    SERIALIZER_CONFIG_KEY,
)
from framework.events import get_event_exchange
from framework.messaging import encode_to_headers
from framework.utils import uuid4_str

STANDALONE_DISPATCHER_NAME = "standalone_event_dispatcher"


def event_dispatcher(
    config: dict[str, Any],
    context_data: dict[str, Any] | None = None,
    **publisher_options: Any,
) -> Any:
    """``dispatch = event_dispatcher(config); dispatch("orders", "order_created", {...})``.

    Unlike nameko's, events carry context headers (a fresh call-id stack per
    dispatch, plus ``context_data``), so handlers can trace where they came from.
    ``dispatch.close()`` releases the connection.
    """
    publisher = Publisher(
        config,
        use_confirms=publisher_options.pop("use_confirms", True),
        purpose="standalone event dispatcher",
    )
    serializer = publisher_options.pop(
        "serializer", config.get(SERIALIZER_CONFIG_KEY, DEFAULT_SERIALIZER)
    )
    base_context = dict(context_data or {})

    def dispatch(service_name: str, event_type: str, event_data: Any) -> None:
        exchange = get_event_exchange(service_name, config)
        call_id = f"{STANDALONE_DISPATCHER_NAME}.dispatch.{uuid4_str()}"
        headers = encode_to_headers(
            {**base_context, CALL_ID_STACK_CONTEXT_KEY: [call_id]}
        )
        # Where an event goes is the dispatch's to say: an exchange or routing key
        # given to event_dispatcher() has no effect, as in nameko.
        options = {
            k: v
            for k, v in publisher_options.items()
            if k not in ("headers", "exchange", "routing_key", "declare")
        }
        declare = list(publisher_options.get("declare") or ())
        if not exchange.no_declare:
            declare.append(exchange)
        publisher.publish(
            event_data,
            exchange=exchange,
            routing_key=event_type,
            serializer=serializer,
            headers={**(publisher_options.get("headers") or {}), **headers},
            declare=declare,
            **options,
        )

    dispatch.close = publisher.close  # type: ignore[attr-defined]
    return dispatch
