"""The broker side of the bench: a throwaway vhost, and a plain py-amqp RPC caller.

The caller (``BrokerProbe``) belongs to neither framework under test: it speaks
nameko's wire format directly, so what it measures (time to a service's first
answer, the handler's progress) is measured the same way for both.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import amqp

log = logging.getLogger(__name__)

DEFAULT_BROKER_URI = "amqp://guest:guest@127.0.0.1:5672/"
RPC_EXCHANGE = "nameko-rpc"  # nameko's default, which both frameworks use
RABBITMQCTL_TIMEOUT = 60.0  # seconds; rabbitmqctl boots an Erlang VM per call
# Other people's tests on this broker restart it (``rabbitmqctl stop_app``), which
# drops every connection; the bench waits for it to come back rather than fail.
CONNECTION_ERRORS = (OSError, amqp.exceptions.ConnectionError)
RECONNECT_PATIENCE = 60.0  # seconds to wait for the broker to accept us again


class BenchError(Exception):
    """The bench could not measure something; the message says what and why."""


class NoReply(BenchError):
    """No reply within the time asked for (the caller decides whether that is fatal)."""


# -- the vhost ------------------------------------------------------------------------


def vhost_prefix() -> str:
    """``bench_<random>``: the bench's vhosts are this plus the side they serve."""
    return f"bench_{secrets.token_hex(4)}"


def _rabbitmqctl(*args: str) -> str:
    # /usr/sbin is not on every user's PATH, and that is where the Debian package puts it.
    executable = shutil.which("rabbitmqctl") or shutil.which(
        "rabbitmqctl", path="/usr/sbin:/usr/lib/rabbitmq/bin"
    )
    if executable is None:
        raise BenchError(
            "rabbitmqctl is not installed or not on PATH; the bench creates its vhost with it"
        )
    result = subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT
    )
    if result.returncode != 0:
        raise BenchError(
            f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


@dataclass
class Vhost:
    """A vhost of our own, so other people's tests on the broker never see our queues."""

    name: str
    uri: str

    @classmethod
    def create(cls, name: str, broker_uri: str = DEFAULT_BROKER_URI) -> Vhost:
        _rabbitmqctl("add_vhost", name)
        user = unquote(urlsplit(broker_uri).username or "guest")
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        base = broker_uri.rstrip("/")
        parts = urlsplit(base)
        if parts.path not in ("", "/"):
            base = base[: -len(parts.path)]
        return cls(name, f"{base}/{quote(name, safe='')}")

    def delete(self, patience: float = RECONNECT_PATIENCE) -> None:
        """Delete it, waiting out a broker restart (its app is down meanwhile)."""
        limit = time.monotonic() + patience
        while True:
            try:
                _rabbitmqctl("delete_vhost", self.name)
                return
            except BenchError:
                if time.monotonic() > limit:
                    raise
                time.sleep(2.0)


# -- plain py-amqp connections -----------------------------------------------------------


def connect(uri: str, patience: float = RECONNECT_PATIENCE) -> amqp.Connection:
    parts = urlsplit(uri)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    limit = time.monotonic() + patience
    while True:
        connection = amqp.Connection(
            host=f"{parts.hostname or 'localhost'}:{parts.port or 5672}",
            userid=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            virtual_host=vhost,
        )
        try:
            connection.connect()
            return connection
        except CONNECTION_ERRORS as exc:
            if time.monotonic() > limit:
                raise BenchError(f"cannot connect to {vhost!r}: {exc}") from None
            log.warning("cannot connect to the broker (%s); retrying", exc)
            time.sleep(1.0)


def broker_version(uri: str) -> str:
    connection = connect(uri)
    try:
        props = connection.server_properties
        product = props.get("product", "RabbitMQ")
        version = props.get("version", "?")
        return f"{_text(product)} {_text(version)}"
    finally:
        connection.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BrokerProbe:
    """Calls services over nameko's RPC wire format with nothing but py-amqp.

    A request can be sent before its service runs: the service's durable queue is
    declared here with the arguments both frameworks declare it with, so the request
    waits there and is answered as soon as the service consumes.

    A lost connection is re-established (with the same reply routing key, so
    replies to calls already sent still reach us) and the operation retried once.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.routing_key = str(uuid.uuid4())
        self.replies: dict[str, tuple[Any, float]] = {}
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.connection = connect(self.uri)
        self.channel = self.connection.channel()
        self.channel.exchange_declare(
            RPC_EXCHANGE, "topic", durable=True, auto_delete=False
        )
        self.reply_queue, _, _ = self.channel.queue_declare(
            "", exclusive=True, auto_delete=True
        )
        self.channel.queue_bind(
            self.reply_queue, RPC_EXCHANGE, routing_key=self.routing_key
        )
        self.channel.basic_consume(
            self.reply_queue, callback=self._on_reply, no_ack=True
        )

    def _retrying(self, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except TimeoutError:
            raise  # an OSError too, but only "nothing arrived yet"
        except CONNECTION_ERRORS as exc:
            log.warning("lost the probe's connection (%s); reconnecting", exc)
            self.close()
            self.reconnects += 1
            self._connect()
            return operation()

    def _on_reply(self, message: amqp.Message) -> None:
        self.replies[message.properties.get("correlation_id")] = (
            message.body,
            time.perf_counter(),
        )

    def declare_service_queue(self, service: str, purge: bool = True) -> None:
        queue = f"rpc-{service}"

        def declare() -> None:
            self.channel.queue_declare(queue, durable=True, auto_delete=False)
            self.channel.queue_bind(queue, RPC_EXCHANGE, routing_key=f"{service}.*")
            if purge:
                # A request left by an aborted run would be answered first.
                self.channel.queue_purge(queue)

        self._retrying(declare)

    def send(self, service: str, method: str, *args: Any) -> str:
        correlation_id = str(uuid.uuid4())
        message = amqp.Message(
            json.dumps({"args": list(args), "kwargs": {}}),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            reply_to=self.routing_key,
            correlation_id=correlation_id,
        )
        # Lambdas, not bound methods: a retry must use the new channel.
        self._retrying(
            lambda: self.channel.basic_publish(
                message, exchange=RPC_EXCHANGE, routing_key=f"{service}.{method}"
            )
        )
        return correlation_id

    def wait(self, correlation_id: str, timeout: float) -> tuple[Any, float]:
        """The result of a sent call and the ``perf_counter`` time its reply arrived."""
        limit = time.monotonic() + timeout
        while correlation_id not in self.replies:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                raise NoReply(f"no reply to {correlation_id} within {timeout}s")
            try:
                self._retrying(
                    lambda: self.connection.drain_events(timeout=min(remaining, 1.0))  # noqa: B023
                )
            except TimeoutError:
                pass
        body, received_at = self.replies.pop(correlation_id)
        reply = json.loads(body)
        if reply.get("error"):
            raise BenchError(f"the service answered with an error: {reply['error']}")
        return reply.get("result"), received_at

    def call(self, service: str, method: str, *args: Any, timeout: float = 30.0) -> Any:
        return self.wait(self.send(service, method, *args), timeout)[0]

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # closing is best effort: the vhost goes away anyway
            log.debug("closing the probe connection failed", exc_info=True)


def prefill_events(
    uri: str, source: str, event_type: str, queue: str, count: int
) -> None:
    """Put ``count`` events in ``queue`` before its handler runs.

    The exchange and queue are declared with the arguments both frameworks give an
    event handler's queue with reliable delivery (durable, not auto-deleted).
    """
    connection = connect(uri)
    try:
        _publish_events(connection, source, event_type, queue, count)
    except CONNECTION_ERRORS as exc:
        raise BenchError(f"lost the broker while prefilling events: {exc}") from None
    finally:
        try:
            connection.close()
        except CONNECTION_ERRORS:
            pass


def _publish_events(
    connection: amqp.Connection, source: str, event_type: str, queue: str, count: int
) -> None:
    channel = connection.channel()
    exchange = f"{source}.events"
    channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
    channel.queue_declare(queue, durable=True, auto_delete=False)
    channel.queue_bind(queue, exchange, routing_key=event_type)
    channel.queue_purge(queue)
    confirmed = [0]

    def on_ack(delivery_tag: int, multiple: bool) -> None:
        confirmed[0] = delivery_tag

    channel.confirm_select()
    channel.events["basic_ack"].add(on_ack)
    for seq in range(count):
        message = amqp.Message(
            json.dumps({"seq": seq}),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )
        channel.basic_publish(message, exchange=exchange, routing_key=event_type)
    limit = time.monotonic() + 60
    while confirmed[0] < count:
        if time.monotonic() > limit:
            raise BenchError(
                f"the broker confirmed {confirmed[0]} of {count} prefilled events"
            )
        try:
            connection.drain_events(timeout=1.0)
        except TimeoutError:
            pass
