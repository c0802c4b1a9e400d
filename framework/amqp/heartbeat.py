"""AMQP heartbeats that survive CPU-bound workers.

Heartbeats are normally sent by the consumer loop's green thread. A worker that
computes for a long time without yielding blocks the whole eventlet hub, that
thread included, and the broker drops the connection after two missed
heartbeats: every in-flight message is then redelivered. So each consumer
connection also gets a real OS thread that, whenever nothing was written for half
a heartbeat interval, writes a heartbeat frame to the socket itself.

Frames must never interleave: every write to the socket (by py-amqp, on the green
side) and every heartbeat (here) holds one OS-level lock. py-amqp writes a whole
frame per ``_write`` call, and a heartbeat may legally sit between any two frames.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from framework import concurrency

log = logging.getLogger(__name__)

HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class HeartbeatGuard:
    def __init__(self, amqp_connection: Any, interval: float) -> None:
        self.transport = amqp_connection.transport
        self.interval = interval
        self.lock = concurrency.os_lock()
        self.last_write = time.monotonic()
        self.sent = 0
        self._closed = False
        green_write = self.transport._write

        def locked_write(data: Any) -> None:
            with self.lock:
                green_write(data)
                self.last_write = time.monotonic()

        self.transport._write = locked_write

    @classmethod
    def install(cls, amqp_connection: Any, interval: float) -> HeartbeatGuard | None:
        """Guard a plain TCP connection; TLS sockets can't be written from outside."""
        if not interval or not hasattr(amqp_connection.transport, "_quick_recv"):
            return None
        guard = cls(amqp_connection, interval)
        concurrency.start_os_thread(guard._run, name="amqp-heartbeat")
        return guard

    def close(self) -> None:
        self._closed = True

    def _run(self) -> None:
        period = self.interval / 2
        while not self._closed:
            concurrency.os_sleep(period / 2)
            if self._closed:
                return
            if time.monotonic() - self.last_write < period:
                continue
            try:
                self._send_heartbeat()
            except OSError:
                return  # the connection is gone; the consumer loop reconnects

    def _send_heartbeat(self) -> None:
        sock = self.transport.sock
        if sock is None:
            self._closed = True
            return
        fd = sock.fileno()
        with self.lock:
            data = HEARTBEAT_FRAME
            while data:
                try:
                    written = concurrency.os_write(fd, data)
                except BlockingIOError:
                    # The socket buffer is full: bytes are flowing, so the broker
                    # hears from us anyway. Finish a partial frame, else skip.
                    if data is HEARTBEAT_FRAME:
                        return
                    concurrency.os_sleep(0.001)
                    continue
                data = data[written:]
            self.last_write = time.monotonic()
            self.sent += 1
