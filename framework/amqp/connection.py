"""Broker connections: how they are opened, retried and drained."""

from __future__ import annotations

import errno
import logging
from struct import unpack_from
from typing import Any

import amqp.exceptions
import amqp.transport
import kombu
import kombu.exceptions
from amqp import spec

from framework import concurrency
from framework.amqp import channels
from framework.constants import (
    AMQP_SSL_CONFIG_KEY,
    AMQP_URI_CONFIG_KEY,
    CONNECT_RETRY_MAX_CONFIG_KEY,
    DEFAULT_AMQP_URI,
    DEFAULT_CONNECT_RETRY_MAX_INTERVAL,
    DEFAULT_HEARTBEAT,
    HEARTBEAT_CONFIG_KEY,
    LOGIN_METHOD_CONFIG_KEY,
)
from framework.utils import sanitize_url

log = logging.getLogger(__name__)

#: Errors that mean "this connection is gone; reconnect and carry on".
#: Not ``AttributeError``: py-amqp raises one when its transport was torn down
#: underneath it, but so does every bug; ``is_connection_error`` tells them apart.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.RecoverableConnectionError,
    kombu.exceptions.OperationalError,
)


def is_connection_error(
    exc: BaseException, connection: kombu.Connection | None
) -> bool:
    """Whether ``exc`` means ``connection`` is gone (reconnect) rather than a bug.

    An ``AttributeError`` counts only when the connection is indeed down (py-amqp
    sets its transport to ``None`` on teardown, and the next use trips over it);
    raised on a live connection it is a bug, and reconnecting would only meet it
    again.
    """
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    if isinstance(exc, AttributeError):
        try:
            return connection is None or not connection.connected
        except Exception:  # noqa: BLE001 - a half torn down connection
            return True
    return False


MEMORY_POLLING_INTERVAL = 0.005  # seconds


def amqp_uri(config: dict[str, Any]) -> str:
    return config.get(AMQP_URI_CONFIG_KEY) or DEFAULT_AMQP_URI


def make_connection(
    config: dict[str, Any], *, uri: str | None = None, heartbeat: float | None = None
) -> kombu.Connection:
    """An unconnected kombu connection configured from the service config."""
    uri = uri or amqp_uri(config)
    # kombu's in-memory transport polls its queues; its default of once a second
    # would make every call in the dev mode take a second.
    options = (
        {"polling_interval": MEMORY_POLLING_INTERVAL}
        if uri.startswith("memory:")
        else {}
    )
    return kombu.Connection(
        uri,
        ssl=config.get(AMQP_SSL_CONFIG_KEY),
        login_method=config.get(LOGIN_METHOD_CONFIG_KEY),
        heartbeat=heartbeat if heartbeat is not None else 0,
        connect_timeout=5,
        transport_options={"confirm_publish": False, **options},
    )


def heartbeat_interval(config: dict[str, Any]) -> float:
    value = config.get(HEARTBEAT_CONFIG_KEY, DEFAULT_HEARTBEAT)
    return float(value or 0)


def connect_with_retry(
    connection: kombu.Connection,
    config: dict[str, Any],
    *,
    purpose: str,
    should_stop: concurrency.Event | None = None,
    max_attempts: int | None = None,
) -> None:
    """Connect, retrying with backoff while the broker is unreachable.

    Logs once per attempt so an operator sees a service waiting for its broker
    rather than a silent hang. ``max_attempts=None`` retries forever.
    """
    max_interval = float(
        config.get(CONNECT_RETRY_MAX_CONFIG_KEY, DEFAULT_CONNECT_RETRY_MAX_INTERVAL)
    )
    interval = 0.2
    attempt = 0
    while True:
        attempt += 1
        try:
            # One attempt, no sleep inside kombu: the backoff and its logging are ours
            # (kombu's connect() would quietly sleep 2s and try again).
            connection.ensure_connection(
                max_retries=1,
                interval_start=0,
                interval_step=0,
                interval_max=0,
                reraise_as_library_errors=False,
            )
            if attempt > 1:
                log.info(
                    "connected to broker",
                    extra={
                        "broker": sanitize_url(connection.as_uri()),
                        "purpose": purpose,
                    },
                )
            return
        except CONNECTION_ERRORS as exc:
            _close_quietly(connection)
            if max_attempts is not None and attempt >= max_attempts:
                raise
            if should_stop is not None and should_stop.ready():
                raise
            log.warning(
                "waiting for broker at %s (%s); retrying in %.1fs",
                sanitize_url(connection.as_uri()),
                exc,
                interval,
                extra={"purpose": purpose, "attempt": attempt},
            )
            concurrency.sleep(interval)
            interval = min(interval * 2, max_interval)


def _close_quietly(connection: kombu.Connection) -> None:
    try:
        connection.collect()
    except Exception:  # noqa: BLE001 - the connection is already broken
        pass


def close_quietly(connection: kombu.Connection | None) -> None:
    """Close without raising: used when the connection may already be dead."""
    if connection is None:
        return
    try:
        connection.close()
    except Exception:  # noqa: BLE001
        _close_quietly(connection)


class CoalescingWriter:
    """Sends every frame written during one turn of the hub in a single ``send``.

    py-amqp writes each frame with its own system call; under load a service
    writes a reply, a publish and an ack per request, and those calls were the
    largest single cost in our profiles. Writes now only append to a buffer, and a
    green thread flushes it as soon as the writer yields, which it does at once
    (it waits for a confirm, a reply, or the next message).
    """

    def __init__(self, send: Any) -> None:
        self._send = send
        self._chunks: list[bytes] = []
        self._flushing = False
        self._error: BaseException | None = None

    @classmethod
    def install(cls, amqp_connection: Any) -> CoalescingWriter | None:
        # Without monkey patching the hub never runs on its own, so nothing would
        # ever flush: plain programs keep py-amqp's direct writes.
        if not concurrency.is_monkey_patched():
            return None
        transport = amqp_connection.transport
        writer = cls(transport._write)
        transport._write = writer.write
        # Read by amqp.frames: a write here never yields, so whole frames may be
        # written without py-amqp's frame writer (and its lock).
        transport.coalesced = True
        return writer

    def write(self, data: Any) -> None:
        if self._error is not None:
            raise self._error
        # py-amqp hands us a view of a buffer it reuses for the next frame.
        self._chunks.append(bytes(data))
        if not self._flushing:
            self._flushing = True
            concurrency.spawn_n(self._flush)

    def _flush(self) -> None:
        try:
            while self._chunks:
                chunks, self._chunks = self._chunks, []
                self._send(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except OSError as exc:
            # The reader sees the broken connection too; writers get the error.
            self._error = exc
            self._chunks = []
        finally:
            self._flushing = False


READ_CHUNK = 8192


def read_ahead(amqp_connection: Any) -> None:
    """Let py-amqp read the socket in chunks instead of exactly what it needs.

    py-amqp asks ``recv`` for the exact size of each piece of a frame (header, then
    payload), so a delivery costs six system calls. Asking for at least
    ``READ_CHUNK`` bytes lets one call bring in many frames; py-amqp keeps the
    surplus in its own read buffer. Chunks stay small because py-amqp copies the
    surplus on every read.
    """
    transport = amqp_connection.transport
    recv = getattr(transport, "_quick_recv", None)
    if recv is None:  # TLS transports read through the ssl object
        return
    transport._quick_recv = lambda n: recv(n if n > READ_CHUNK else READ_CHUNK)


RECV_SIZE = 65536
_FRAME_END = 0xCE


def read_frames(amqp_connection: Any, timeout: float | None) -> bool:
    """Hand every complete frame that has arrived to py-amqp's frame handler.

    Waits at most ``timeout`` seconds (``None``: for ever) for the first frame;
    returns whether any was handled. py-amqp's own ``drain_events`` reads one
    frame per call, each through a context manager that sets the socket's
    timeout and restores it, and three frames make a delivery: a fifth of our
    processes' reading time. Here one ``recv`` brings in whatever has arrived and
    every whole frame in it is dispatched in a loop. The bytes not yet handled
    stay in py-amqp's read buffer, where its own reads (a synchronous method's
    reply) find them, so both readers can take turns on a connection.

    TLS transports read through their ssl object: py-amqp's reading there.
    """
    transport = amqp_connection.transport
    if type(transport) is not amqp.transport.TCPTransport:
        try:
            amqp_connection.drain_events(timeout=timeout)
        except TimeoutError:
            return False
        return True
    handled = False
    while True:
        buffer = transport._read_buffer
        size = len(buffer)
        if size >= 8:
            frame_type, channel, length = unpack_from(">BHI", buffer, 0)
            end = 7 + length
            if size > end:
                if buffer[end] != _FRAME_END:
                    raise amqp.exceptions.UnexpectedFrame(
                        f"Received frame_end {buffer[end]:#04x} while expecting 0xce"
                    )
                # Taken off the buffer before dispatching: a callback that reads
                # the connection itself must find the next frame, not this one.
                transport._read_buffer = buffer[end + 1 :]
                if not (
                    length == _ACK_LENGTH
                    and buffer[7:11] == _BASIC_ACK
                    and _confirmed(amqp_connection, channel, buffer)
                ):
                    amqp_connection.on_inbound_frame(
                        (frame_type, channel, buffer[7:end])
                    )
                handled = True
                continue
        if handled:
            return True  # every whole frame handled; the rest is on its way
        try:
            data = _recv(transport, timeout)
        except TimeoutError:
            return False
        transport._read_buffer += data


_BASIC_ACK = b"\x00\x3c\x00\x50"  # a method frame's class and method ids
_ACK_LENGTH = 4 + 8 + 1  # ids, delivery tag, flags


def _confirmed(amqp_connection: Any, channel_id: int, buffer: bytes) -> bool:
    """Hand a publisher confirm (``basic.ack`` from the broker) to the channel's
    listeners as py-amqp's ``Channel._on_basic_ack`` would; False to leave it to
    py-amqp. One arrives per publish: py-amqp's generic method dispatch (argument
    parser, listener lists) cost more than the rest of handling it."""
    channel = amqp_connection.channels.get(channel_id)
    if channel is None or channel.is_closing or _ACK_SIG in channel._pending:
        return False  # closing, or someone waits on it: py-amqp's rules apply
    delivery_tag, flags = unpack_from(">QB", buffer, 11)
    amqp_connection.bytes_recv += 1
    multiple = bool(flags & 1)
    for callback in channel.events["basic_ack"]:
        callback(delivery_tag, multiple)
    return True


def _recv(transport: Any, timeout: float | None) -> bytes:
    while True:
        try:
            if timeout is None:
                data = transport.sock.recv(RECV_SIZE)
            else:
                with transport.having_timeout(timeout):
                    data = transport.sock.recv(RECV_SIZE)
            break
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno in _RETRYABLE_ERRNOS:
                continue  # as py-amqp's reads retry them
            transport.connected = False  # as py-amqp marks a failed read
            raise
    if not data:
        transport.connected = False
        raise OSError("Server unexpectedly closed connection")
    return data


_RETRYABLE_ERRNOS = {errno.EAGAIN, errno.EINTR}
_ACK_SIG = spec.Basic.Ack


def tune_transport(amqp_connection: Any) -> None:
    """Fewer system calls per message: coalesced writes and read-ahead."""
    CoalescingWriter.install(amqp_connection)
    read_ahead(amqp_connection)


class Waiter:
    """One result a caller waits for on a connection: a confirm, a reply."""

    __slots__ = ("_event", "value", "error", "lost")

    def __init__(self) -> None:
        self._event = concurrency.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.lost: BaseException | None = None

    def ready(self) -> bool:
        return self._event.ready()

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self._event.ready():
            self.value, self.error = value, error
            self._event.send(None)

    def interrupt(self, error: BaseException) -> None:
        """Wake the caller because the connection went away (it may wait again)."""
        if not self._event.ready():
            self.lost = error
            self._event.send(None)

    def wait(self, timeout: float | None) -> bool:
        if not self._event.ready():
            with concurrency.Timeout(timeout, False):
                self._event.wait()
        return self._event.ready()


class ConnectionLost(ConnectionResetError):
    """The connection went away while a caller waited on it."""


class DrainedConnection:
    """A connection shared by many callers, each waiting for its own results.

    Under eventlet (services, patched programs) a reader green thread drains it and
    hands each frame's result to its ``Waiter``: one wake-up per result. In a plain,
    unpatched program there is no hub to run that thread, so a caller waiting for a
    publisher confirm or an RPC reply takes the drain lock and reads frames until its
    own result arrives, handling everyone else's on the way; the others block on the
    lock, then find their result already there.
    """

    def __init__(
        self, config: dict[str, Any], *, uri: str | None = None, purpose: str
    ) -> None:
        self.config = config
        self.uri = uri
        self.purpose = purpose
        self.connection: kombu.Connection | None = None
        self._amqp_connection: Any = None  # its py-amqp connection, when it has one
        self.generation = 0
        self.drain_lock = concurrency.Semaphore(1)
        self._connect_lock = concurrency.Semaphore(1)
        self._on_connect: list[Any] = []
        self._reader: Any = None
        self._waiting: set[Waiter] = set()
        self._on_lost: list[Any] = []

    def on_connect(self, callback: Any) -> None:
        """Run ``callback(connection)`` after every (re)connect, before any reading."""
        self._on_connect.append(callback)

    def on_lost(self, callback: Any) -> None:
        """Run ``callback(error)`` when the reader thread finds the connection gone."""
        self._on_lost.append(callback)

    @property
    def connected(self) -> bool:
        connection = self.connection
        if connection is None:
            return False
        amqp_connection = self._amqp_connection
        if amqp_connection is not None:
            # What kombu's ``connected`` asks in the end, without its two layers
            # (this runs on every publish).
            return bool(amqp_connection.connected)
        return bool(connection.connected)

    @property
    def has_reader(self) -> bool:
        """Whether a reader thread drains the connection (then nobody else may read)."""
        return self._reader is not None

    def ensure_connected(self, max_attempts: int | None = 3) -> kombu.Connection:
        if self.connected:
            return self.connection  # type: ignore[return-value]
        with self._connect_lock:
            if self.connected:
                return self.connection  # type: ignore[return-value]
            self._stop_reader()
            close_quietly(self.connection)
            connection = make_connection(self.config, uri=self.uri)
            connect_with_retry(
                connection, self.config, purpose=self.purpose, max_attempts=max_attempts
            )
            amqp_connection = None
            if channels.is_amqp(connection):
                amqp_connection = connection.connection
                tune_transport(amqp_connection)
            with self.drain_lock:
                for callback in self._on_connect:
                    callback(connection)
            self.connection, self._amqp_connection = connection, amqp_connection
            self.generation += 1
            if concurrency.is_monkey_patched():
                self._reader = concurrency.spawn(
                    self._read_forever, connection, self.generation
                )
            return connection

    def _read_forever(self, connection: kombu.Connection, generation: int) -> None:
        error: BaseException = ConnectionLost("connection closed")
        try:
            if channels.is_amqp(connection):
                amqp_connection = connection.connection
                while True:
                    read_frames(amqp_connection, None)
            while True:
                connection.drain_events()
        except Exception as exc:
            if not is_connection_error(exc, connection):
                # E.g. a frame py-amqp cannot parse: the connection's state is
                # unknown, so it is dropped like a lost one (the next user opens
                # another), and logged as what it is.
                log.error(
                    "unexpected error reading from the broker; dropping the connection",
                    extra={"purpose": self.purpose, "error_type": type(exc).__name__},
                )
            error = ConnectionLost(f"connection lost: {type(exc).__name__}")
        finally:
            if generation == self.generation:
                self._reader = None
                self.reset(generation)
            for callback in self._on_lost:
                callback(error)
            for waiter in list(self._waiting):
                waiter.interrupt(error)

    def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            concurrency.kill(reader)

    def reset(self, generation: int) -> None:
        """Drop the connection of ``generation`` after an error (once, however many saw it)."""
        if generation == self.generation and self.connection is not None:
            connection, self.connection = self.connection, None
            close_quietly(connection)

    def wait_for(self, waiter: Waiter, deadline: concurrency.Deadline) -> bool:
        """Wait until ``waiter`` is set or the deadline passes; whether it was set.

        A waiter failed by a lost connection raises ``ConnectionLost`` (a
        ``ConnectionResetError``); other connection errors propagate too.
        """
        if self._reader is not None:
            self._waiting.add(waiter)
            try:
                waiter.wait(deadline.remaining())
            finally:
                self._waiting.discard(waiter)
            if waiter.lost is not None:
                error, waiter.lost = waiter.lost, None
                waiter._event.reset()
                raise error
        else:
            self._drain_until(waiter, deadline)
        return waiter.ready()

    def _drain_until(self, waiter: Waiter, deadline: concurrency.Deadline) -> None:
        while not waiter.ready():
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                return
            # Uncontended, the lock is free: take it without arming a timer.
            acquired = self.drain_lock.acquire(blocking=False) or (
                self.drain_lock.acquire(timeout=remaining)
                if remaining is not None
                else self.drain_lock.acquire()
            )
            if not acquired:
                return
            try:
                if waiter.ready():
                    return
                connection = self.connection
                if connection is None:
                    raise ConnectionLost("connection lost")
                # Returns at the first frame, whoever it is for; waiters with an
                # earlier deadline give up on the lock at their own deadline.
                try:
                    connection.drain_events(
                        timeout=None if remaining is None else max(remaining, 0.001)
                    )
                except TimeoutError:
                    pass
                except AttributeError as exc:
                    # py-amqp's torn-down transport: a lost connection to callers
                    # (which catch CONNECTION_ERRORS); on a live one, a bug.
                    if is_connection_error(exc, connection):
                        raise ConnectionLost("connection lost") from exc
                    raise
            finally:
                self.drain_lock.release()

    def close(self) -> None:
        self._stop_reader()
        connection, self.connection = self.connection, None
        close_quietly(connection)
