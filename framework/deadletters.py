"""Inspecting and replaying dead letters.

Topology: a message a service cannot handle (undecodable, content type not in
``ACCEPT``, or failing more than ``MAX_REDELIVERIES`` times with
``requeue_on_error``) is published, exactly as received, to the topic exchange
``DEAD_LETTER_EXCHANGE`` (default ``framework-dlx``) with the source queue's name as
routing key, into the durable queue ``<source queue>.dead-letter``. Its headers keep
the original ones plus ``x-dead-letter-reason``, ``x-original-exchange``,
``x-original-routing-key`` and ``x-original-queue``. A dead letter of an entrypoint with
``sensitive_arguments`` also carries ``x-sensitive-arguments`` (the paths, the
method's parameter names and the body's layout), so that listings can mask those
arguments: ``display_body``. Replaying republishes it to its
original routing with the bookkeeping headers removed: RPC requests to their
exchange and routing key (the service finds the method by routing key), everything
else straight to its source queue through the default exchange, so an event goes
back to the one handler that failed it, not to every queue bound to its type.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import amqp
import amqp.exceptions

from framework.amqp import channels
from framework.amqp.connection import make_connection
from framework.constants import RPC_QUEUE_TEMPLATE
from framework.utils import REDACTED

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = ".dead-letter"
BOOKKEEPING_HEADERS = (
    "x-dead-letter-reason",
    "x-original-exchange",
    "x-original-routing-key",
    "x-original-queue",
    "x-redelivery-count",
    "x-sensitive-arguments",
)
SENSITIVE_ARGUMENTS_HEADER = "x-sensitive-arguments"
_PATH_TOKEN = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


@dataclass
class DeadLetter:
    body: bytes
    content_type: str | None
    reason: str
    original_exchange: str
    original_routing_key: str
    headers: dict[str, Any]


def dead_letter_queue(queue_name: str) -> str:
    return (
        queue_name
        if queue_name.endswith(DEAD_LETTER_SUFFIX)
        else queue_name + DEAD_LETTER_SUFFIX
    )


def _describe(raw: Any) -> DeadLetter:
    # One shape whichever transport (RabbitMQ, or the in-memory one) brought it.
    properties = channels.parts(raw).properties
    headers = dict(properties.get("application_headers") or {})
    body = raw.body
    if isinstance(body, str):  # py-amqp decodes bodies that declare an encoding
        body = body.encode(properties.get("content_encoding") or "utf-8")
    return DeadLetter(
        body=body,
        content_type=properties.get("content_type"),
        reason=str(headers.get("x-dead-letter-reason", "")),
        original_exchange=str(headers.get("x-original-exchange", "")),
        original_routing_key=str(headers.get("x-original-routing-key", "")),
        headers=headers,
    )


def display_body(letter: DeadLetter) -> str:
    """The body as a listing may show it: the entrypoint's sensitive arguments
    masked, or nothing but its size when they cannot be found in it."""
    spec = letter.headers.get(SENSITIVE_ARGUMENTS_HEADER)
    text = letter.body.decode("utf-8", "replace")
    if not spec:
        return text
    try:
        return json.dumps(_redacted_arguments(json.loads(letter.body), spec))
    except Exception:  # noqa: BLE001 - undecodable, or not the expected shape
        return (
            f"<{len(letter.body)} bytes withheld: the entrypoint has sensitive "
            "arguments and they could not be masked>"
        )


def _redacted_arguments(body: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name, sensitive paths masked."""
    parameters = [str(name) for name in spec.get("parameters") or []]
    if spec.get("layout") == "rpc":
        args, kwargs = body["args"], body["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("not an RPC request")
    else:
        args, kwargs = [body], {}
    arguments: dict[str, Any] = {}
    for index, value in enumerate(args):
        name = parameters[index] if index < len(parameters) else f"*args[{index}]"
        arguments[name] = value
    arguments.update(kwargs)
    for path in spec.get("paths") or []:
        tokens: list[Any] = [
            key if key else int(index) for key, index in _PATH_TOKEN.findall(path)
        ]
        if tokens:
            _mask(arguments, tokens)
    return arguments


def _mask(target: Any, tokens: list[Any]) -> None:
    for token in tokens[:-1]:
        try:
            target = target[token]
        except (KeyError, IndexError, TypeError):
            return
    last = tokens[-1]
    if isinstance(target, dict) and last in target:
        target[last] = REDACTED
    elif isinstance(target, list) and isinstance(last, int) and last < len(target):
        target[last] = REDACTED


def replay_destination(letter: DeadLetter, queue_name: str) -> tuple[str, str]:
    """Where a dead letter goes back to: ``(exchange, routing_key)``."""
    source_queue = str(
        letter.headers.get("x-original-queue")
        or queue_name.removesuffix(DEAD_LETTER_SUFFIX)
    )
    if source_queue.startswith(RPC_QUEUE_TEMPLATE.format("")):
        return letter.original_exchange, letter.original_routing_key
    return "", source_queue


def peek(config: dict[str, Any], queue_name: str, limit: int = 100) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``queue_name``, left in place (none if the
    dead-letter queue does not exist yet)."""
    with make_connection(config) as connection:
        channel = connection.channel()
        seen: list[DeadLetter] = []
        for _ in range(limit):
            try:
                raw = channel.basic_get(dead_letter_queue(queue_name), no_ack=False)
            except amqp.exceptions.NotFound:
                return []
            if raw is None:
                break
            seen.append(_describe(raw))
        # Closing the channel without acking returns every message, in order.
        channel.close()
        return seen


def replay(config: dict[str, Any], queue_name: str, limit: int | None = None) -> int:
    """Republish dead letters to where they first went; returns how many.

    Each message is acked on the dead-letter queue only after the broker confirmed
    its republication, so a replay interrupted half way loses nothing.
    """
    replayed = 0
    with make_connection(config) as connection:
        channel = connection.channel()
        try:
            _, waiting, _ = channel.queue_declare(
                dead_letter_queue(queue_name), passive=True
            )
        except amqp.exceptions.NotFound:
            return 0
        # Only what is there now: a message that fails again comes back to this
        # queue, and must not be replayed in a loop.
        limit = waiting if limit is None else min(limit, waiting)
        publish_channel = connection.channel()
        publish_channel.confirm_select()
        while replayed < limit:
            raw = channel.basic_get(dead_letter_queue(queue_name), no_ack=False)
            if raw is None:
                break
            letter = _describe(raw)
            headers = {
                k: v for k, v in letter.headers.items() if k not in BOOKKEEPING_HEADERS
            }
            properties = {
                k: v
                for k, v in raw.properties.items()
                if k not in ("application_headers",)
            }
            message = amqp.Message(raw.body, application_headers=headers, **properties)
            exchange, routing_key = replay_destination(letter, queue_name)
            publish_channel.basic_publish_confirm(
                message,
                exchange=exchange,
                routing_key=routing_key,
            )
            channel.basic_ack(raw.delivery_tag)
            replayed += 1
        log.info(
            "replayed dead letters", extra={"queue": queue_name, "count": replayed}
        )
    return replayed
