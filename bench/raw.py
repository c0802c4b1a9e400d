"""The ceiling: a request/reply loop in plain py-amqp, no framework at all.

    python -m bench.raw server --amqp-uri URI --confirms async --prefetch 10
    python -m bench.raw client --amqp-uri URI --confirms async --concurrency 10

Same wire semantics as nameko's RPC: JSON ``{"args", "kwargs"}`` requests to the
``nameko-rpc`` topic exchange, persistent and mandatory, answered with
``{"result", "error"}``; the server acks a request only after its reply is
confirmed. ``--confirms`` picks how publisher confirms are handled:

* ``turn``: each publish waits for its own confirm before anything else happens
  (what a naive synchronous publisher does);
* ``async``: publishes do not wait; confirms are matched by delivery tag as they
  arrive (the server acks a request when its reply's confirm arrives);
* ``none``: no publisher confirms at all (not nameko's semantics; for scale).

``--transient`` publishes requests and replies with delivery mode 1: what
persistence costs the broker, everything else equal. The other options change
one thing each, to measure what it costs the broker (``bench/costs.py``):
whether replies or requests are confirmed (``--reply-confirms``,
``--request-confirms``), ``mandatory``, the properties and headers our
framework sends (``--properties ours``, ``--context-header``), the reply
queue's arguments (``--reply-queue``), acking several requests at once
(``--multiple-acks``), replies acked by the client (``--ack-replies``), a
connection per caller (``--connections``) and a separate connection for the
server's replies (``--reply-connection``).

Both sides are single-threaded. The client keeps ``--concurrency`` requests in
flight on one connection and sends a new one whenever a reply arrives.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time
import uuid
from typing import Any

import amqp

from bench.broker import RPC_EXCHANGE, connect
from bench.client import percentile
from bench.payloads import PAYLOAD_NAMES, TINY, make_payload

SERVICE = "bench_raw"
CONFIRM_MODES = ("turn", "async", "none")
PROPERTY_SETS = ("nameko", "ours", "minimal")
REPLY_QUEUES = ("exclusive", "expires", "auto-delete", "plain")


class Confirms:
    """Publisher confirms on one channel, in one of ``CONFIRM_MODES``."""

    def __init__(self, connection: amqp.Connection, channel: Any, mode: str) -> None:
        self.connection = connection
        self.channel = channel
        self.mode = mode
        self.next_tag = 1
        self.confirmed = 0
        self.on_confirmed: Any = None
        if mode != "none":
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        first = self.confirmed + 1 if multiple else delivery_tag
        self.confirmed = max(self.confirmed, delivery_tag)
        if self.on_confirmed is not None:
            for tag in range(first, delivery_tag + 1):
                self.on_confirmed(tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        raise RuntimeError(f"the broker nacked publish {delivery_tag}")

    def _on_return(self, *args: Any) -> None:
        raise RuntimeError(
            "a mandatory message was returned: nothing is bound to route it"
        )

    def publish(self, message: amqp.Message, routing_key: str, mandatory: bool) -> int:
        """Publish; returns the delivery tag, after its confirm in ``turn`` mode."""
        tag = self.next_tag
        self.next_tag += 1
        self.channel.basic_publish(
            message, exchange=RPC_EXCHANGE, routing_key=routing_key, mandatory=mandatory
        )
        if self.mode == "turn":
            while self.confirmed < tag:
                self.connection.drain_events(timeout=10)
        return tag


def serve(args: argparse.Namespace) -> int:
    connection = connect(args.amqp_uri)
    channel = connection.channel()
    channel.exchange_declare(RPC_EXCHANGE, "topic", durable=True, auto_delete=False)
    queue = f"rpc-{SERVICE}"
    channel.queue_declare(queue, durable=True, auto_delete=False)
    channel.queue_bind(queue, RPC_EXCHANGE, routing_key=f"{SERVICE}.*")
    channel.basic_qos(0, args.prefetch, False)
    reply_confirms = args.reply_confirms or args.confirms
    # Replies on a connection of their own, as our services publish them; its
    # confirms are read between two reads of the consuming connection.
    reply_connection = connect(args.amqp_uri) if args.reply_connection else connection
    reply_channel = reply_connection.channel() if args.reply_connection else channel
    confirms = Confirms(reply_connection, reply_channel, reply_confirms)
    inbox: list[amqp.Message] = []
    awaiting_confirm: dict[
        int, int
    ] = {}  # reply's publish tag -> request's delivery tag
    to_ack: list[int] = []

    def ack_request(reply_tag: int) -> None:
        delivery_tag = awaiting_confirm.pop(reply_tag, None)
        if delivery_tag is not None:
            to_ack.append(delivery_tag)

    def send_acks() -> None:
        # Requests are answered and confirmed in order, so the done ones are
        # always the oldest: one ack with ``multiple`` settles them all.
        if to_ack and args.multiple_acks:
            channel.basic_ack(max(to_ack), multiple=True)
        else:
            for delivery_tag in to_ack:
                channel.basic_ack(delivery_tag)
        to_ack.clear()

    confirms.on_confirmed = ack_request if reply_confirms == "async" else None
    channel.basic_consume(queue, callback=inbox.append, no_ack=False)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    connections = [connection, reply_connection] if args.reply_connection else []
    while True:
        if connections:
            drain_ready(connections, timeout=1.0)
        else:
            try:
                connection.drain_events(timeout=1.0)
            except TimeoutError:
                pass
        # Callbacks only collect: publishing from inside drain_events would nest
        # another drain (``turn`` mode) in the middle of this one.
        while inbox:
            request = inbox.pop(0)
            body = json.loads(request.body)
            reply = amqp.Message(
                json.dumps({"result": body["args"][0], "error": None}),
                **message_properties(
                    args,
                    correlation_id=request.properties.get("correlation_id"),
                    application_headers={},
                ),
            )
            delivery_tag = request.delivery_info["delivery_tag"]
            if reply_confirms == "async":
                awaiting_confirm[confirms.next_tag] = delivery_tag
            confirms.publish(reply, request.properties["reply_to"], mandatory=False)
            if reply_confirms != "async":
                to_ack.append(delivery_tag)
        send_acks()


def drain_ready(connections: list[amqp.Connection], timeout: float) -> int:
    """Read every frame waiting on any of ``connections`` (waiting at most
    ``timeout`` for the first); how many connections had some.

    py-amqp reads exactly a frame's bytes and keeps nothing buffered (no read
    timeouts are used here), so a readable socket means a frame is arriving.
    """
    by_socket = {c.sock.fileno(): c for c in connections}
    readable, _, _ = select.select(list(by_socket), [], [], timeout)
    for fd in readable:
        connection = by_socket[fd]
        connection.drain_events()
        while select.select([fd], [], [], 0)[0]:
            connection.drain_events()
    return len(readable)


def message_properties(args: argparse.Namespace, **properties: Any) -> dict[str, Any]:
    """The properties of a request or reply: nameko's, or ours (``--properties``).

    nameko's (kombu's) carry no ``priority`` and an empty header table only when
    there are headers; ours always carry ``priority`` 0 and the header table.
    """
    if args.properties == "minimal":
        # Only what RPC needs: the reply needs neither type nor encoding when
        # both sides assume JSON.
        keep = ("correlation_id", "reply_to")
        return {
            "delivery_mode": args.delivery_mode,
            **{k: v for k, v in properties.items() if k in keep},
        }
    result = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": args.delivery_mode,
        **properties,
    }
    if args.properties == "ours":
        result["priority"] = 0
    elif not result.get("application_headers"):
        result.pop("application_headers", None)
    return result


def declare_reply_queue(channel: Any, kind: str) -> str:
    """The client's reply queue: a server-named exclusive one, or ours/nameko's
    (named, not exclusive, not auto-deleted, expiring when unused)."""
    if kind == "exclusive":
        name, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
        return str(name)
    name = f"rpc.reply-{SERVICE}-{uuid.uuid4()}"
    arguments = {"x-expires": 300000} if kind == "expires" else {}
    channel.queue_declare(
        name, auto_delete=(kind == "auto-delete"), arguments=arguments
    )
    return name


class Caller:
    """One connection of the client, with its reply queue and its confirms."""

    def __init__(self, args: argparse.Namespace, replies: list[Any]) -> None:
        self.connection = connect(args.amqp_uri)
        self.channel = self.connection.channel()
        self.routing_key = str(uuid.uuid4())
        reply_queue = declare_reply_queue(self.channel, args.reply_queue)
        self.channel.queue_bind(reply_queue, RPC_EXCHANGE, routing_key=self.routing_key)
        channel = self.channel

        def on_reply(message: amqp.Message) -> None:
            replies.append((message, time.perf_counter()))
            if args.ack_replies:
                channel.basic_ack(message.delivery_info["delivery_tag"])

        self.channel.basic_consume(
            reply_queue, callback=on_reply, no_ack=not args.ack_replies
        )
        self.confirms = Confirms(
            self.connection, self.channel, args.request_confirms or args.confirms
        )


def run_client(args: argparse.Namespace) -> int:
    replies: list[tuple[amqp.Message, float]] = []
    callers = [Caller(args, replies) for _ in range(args.connections)]
    connections = [caller.connection for caller in callers]
    body = json.dumps({"args": [make_payload(args.payload)], "kwargs": {}})
    sent_at: dict[str, float] = {}
    headers: dict[str, Any] = {}
    sent = 0

    def send() -> None:
        nonlocal sent
        caller = callers[sent % len(callers)]
        sent += 1
        correlation_id = str(uuid.uuid4())
        sent_at[correlation_id] = time.perf_counter()
        if args.context_header:
            # What a standalone proxy of ours (or nameko's) sends as context.
            headers["nameko.call_id_stack"] = [
                f"standalone_rpc_proxy.call.{uuid.uuid4()}"
            ]
        message = amqp.Message(
            body,
            **message_properties(
                args,
                reply_to=caller.routing_key,
                correlation_id=correlation_id,
                application_headers=headers,
            ),
        )
        caller.confirms.publish(message, f"{SERVICE}.echo", mandatory=args.mandatory)

    def drain() -> None:
        if len(callers) == 1:
            callers[0].connection.drain_events(timeout=10)
        elif not drain_ready(connections, timeout=10):
            raise TimeoutError

    for _ in range(args.concurrency):
        send()
    window_start = time.perf_counter() + args.warmup
    window_end = window_start + args.duration
    latencies: list[float] = []
    while time.perf_counter() < window_end:
        if not replies:
            try:
                drain()
            except TimeoutError:
                raise RuntimeError(
                    "no reply in 10s: is the raw server running?"
                ) from None
        # ``send`` may drain (``turn`` mode) and so append to ``replies`` while we
        # work through them.
        while replies:
            reply, received_at = replies.pop(0)
            json.loads(reply.body)
            started = sent_at.pop(reply.properties["correlation_id"])
            if window_start <= received_at <= window_end:
                latencies.append(received_at - started)
            if received_at < window_end:
                send()
    latencies.sort()
    for caller in callers:
        caller.connection.close()
    result = {
        "calls": len(latencies),
        "elapsed": args.duration,
        "rate": len(latencies) / args.duration,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.raw", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--amqp-uri", required=True)
    parser.add_argument("--confirms", choices=CONFIRM_MODES, default="async")
    parser.add_argument(
        "--prefetch", type=int, default=10, help="server: unacked requests at a time"
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="client: requests in flight"
    )
    parser.add_argument("--payload", choices=PAYLOAD_NAMES, default=TINY)
    parser.add_argument(
        "--transient",
        dest="delivery_mode",
        action="store_const",
        const=1,
        default=2,
        help="publish requests and replies transient (delivery mode 1), not persistent",
    )
    parser.add_argument(
        "--reply-confirms",
        choices=CONFIRM_MODES,
        help="server: confirms of replies, if not --confirms",
    )
    parser.add_argument(
        "--request-confirms",
        choices=CONFIRM_MODES,
        help="client: confirms of requests, if not --confirms",
    )
    parser.add_argument(
        "--no-mandatory",
        dest="mandatory",
        action="store_false",
        help="client: requests without the mandatory flag",
    )
    parser.add_argument(
        "--properties",
        choices=PROPERTY_SETS,
        default="nameko",
        help="properties sent: nameko's, ours (priority 0, header table always), "
        "or minimal (delivery mode, correlation id, reply-to only)",
    )
    parser.add_argument(
        "--context-header",
        action="store_true",
        help="client: a nameko.call_id_stack header on every request",
    )
    parser.add_argument(
        "--reply-queue",
        choices=REPLY_QUEUES,
        default="exclusive",
        help="client: server-named exclusive auto-delete, or named with x-expires "
        "(ours and nameko's), auto-delete, or plain",
    )
    parser.add_argument(
        "--multiple-acks",
        action="store_true",
        help="server: one ack (multiple) for every request done in a read",
    )
    parser.add_argument(
        "--ack-replies",
        action="store_true",
        help="client: consume replies with acks instead of no-ack",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="client: connections (each its own reply queue); calls go round them",
    )
    parser.add_argument(
        "--reply-connection",
        action="store_true",
        help="server: publish replies on a second connection",
    )
    parser.add_argument(
        "--duration", type=float, default=3.0, help="client: seconds measured"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="client: seconds before the window"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return serve(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
