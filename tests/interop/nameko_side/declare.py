"""Redeclare, with nameko's own definitions, every entity a service declares.

Reads ``{"config": {...}, "reply_queues": [[name, routing_key], ...]}`` on stdin.
Builds a nameko container for ``WireMirrorService`` and runs its extensions'
``setup()``, which is where nameko defines its queues (and where its
``EventDispatcher`` declares the event exchange). Then declares every queue (with
its exchange and binding) as nameko's consumer would, each on a fresh channel so
that one refusal does not hide the next. ``reply_queues`` are other clients'
reply queues, redeclared with the flags of nameko's ``ReplyListener`` queue.

Prints ``[{"kind": "queue"|"exchange", "name": ..., "error": null|"..."}]``.
"""

from __future__ import annotations

import copy
import json
import sys

import kombu
from nameko.containers import ServiceContainer
from nameko.events import EventDispatcher
from nameko.rpc import ReplyListener

from interop.nameko_side.services import WireMirrorService


def declare(connection: kombu.Connection, entity, kind: str) -> dict:
    channel = connection.channel()
    try:
        entity.bind(channel).declare()
        error = None
    except Exception as exc:  # the broker's refusal is the result
        error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            channel.close()
        except Exception:
            pass  # a refused declare already closed the channel
    return {"kind": kind, "name": entity.name, "error": error}


def main() -> None:
    request = json.load(sys.stdin)
    config = request["config"]
    container = ServiceContainer(WireMirrorService, config)
    results = []
    queues: dict[str, kombu.Queue] = {}
    exchanges: dict[str, kombu.Exchange] = {}
    reply_template = None
    for extension in container.extensions:
        try:
            extension.setup()
        except Exception as exc:
            results.append(
                {
                    "kind": "setup",
                    "name": repr(extension),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            continue
        queue = getattr(extension, "queue", None)
        if not isinstance(queue, kombu.Queue):
            pass
        elif isinstance(extension, ReplyListener):
            reply_template = queue  # its name is a fresh uuid: only its flags matter
        else:
            queues[queue.name] = queue
            exchanges[queue.exchange.name] = queue.exchange
        if isinstance(extension, EventDispatcher):
            exchanges[extension.exchange.name] = extension.exchange
    for name, routing_key in request.get("reply_queues", []):
        reply_queue = copy.copy(reply_template)
        reply_queue.name, reply_queue.routing_key = name, routing_key
        queues[name] = reply_queue
    with kombu.Connection(config["AMQP_URI"]) as connection:
        for exchange in exchanges.values():
            results.append(declare(connection, exchange, "exchange"))
        for queue in queues.values():
            results.append(declare(connection, queue, "queue"))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
