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
persistence costs the broker, everything else equal.

Both sides are single-threaded. The client keeps ``--concurrency`` requests in
flight on one connection and sends a new one whenever a reply arrives.
"""

from __future__ import annotations

import argparse
import json
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
    confirms = Confirms(connection, channel, args.confirms)
    inbox: list[amqp.Message] = []
    awaiting_confirm: dict[
        int, int
    ] = {}  # reply's publish tag -> request's delivery tag

    def ack_request(reply_tag: int) -> None:
        delivery_tag = awaiting_confirm.pop(reply_tag, None)
        if delivery_tag is not None:
            channel.basic_ack(delivery_tag)

    confirms.on_confirmed = ack_request if args.confirms == "async" else None
    channel.basic_consume(queue, callback=inbox.append, no_ack=False)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
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
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=args.delivery_mode,
                correlation_id=request.properties.get("correlation_id"),
            )
            delivery_tag = request.delivery_info["delivery_tag"]
            if args.confirms == "async":
                awaiting_confirm[confirms.next_tag] = delivery_tag
            confirms.publish(reply, request.properties["reply_to"], mandatory=False)
            if args.confirms != "async":
                channel.basic_ack(delivery_tag)


def run_client(args: argparse.Namespace) -> int:
    connection = connect(args.amqp_uri)
    channel = connection.channel()
    routing_key = str(uuid.uuid4())
    reply_queue, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
    channel.queue_bind(reply_queue, RPC_EXCHANGE, routing_key=routing_key)
    replies: list[tuple[amqp.Message, float]] = []

    def on_reply(message: amqp.Message) -> None:
        replies.append((message, time.perf_counter()))

    channel.basic_consume(reply_queue, callback=on_reply, no_ack=True)
    confirms = Confirms(connection, channel, args.confirms)
    body = json.dumps({"args": [make_payload(args.payload)], "kwargs": {}})
    sent_at: dict[str, float] = {}

    def send() -> None:
        correlation_id = str(uuid.uuid4())
        sent_at[correlation_id] = time.perf_counter()
        message = amqp.Message(
            body,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=args.delivery_mode,
            reply_to=routing_key,
            correlation_id=correlation_id,
        )
        confirms.publish(message, f"{SERVICE}.echo", mandatory=True)

    for _ in range(args.concurrency):
        send()
    window_start = time.perf_counter() + args.warmup
    window_end = window_start + args.duration
    latencies: list[float] = []
    while time.perf_counter() < window_end:
        if not replies:
            try:
                connection.drain_events(timeout=10)
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
    connection.close()
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
