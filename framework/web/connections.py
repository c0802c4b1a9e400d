"""How many connections a server holds, and for how long a client may keep one silent.

Every HTTP server the framework runs (the ``WebServer`` of a container, the health
server of a process) serves its connections through a ``ConnectionGuard``:

* at most ``max_connections`` at once, websockets included;
* a connection waiting for a request (idle keep-alive, or a request line still
  coming) is closed after ``idle_timeout`` seconds; the request's headers must
  arrive within ``header_timeout`` seconds of its request line (else a 408); each
  later read of the body, and each write of the response, may wait at most
  ``socket_timeout`` seconds (``WebServer`` also bounds the whole body);
* when every slot is taken, a new connection takes the slot of the connection
  that has waited longest for its next request, or is still sending its request
  line or headers: a client that opens connections and sends nothing (or half a
  request) can delay others by no more than the time to accept one. Only when
  every connection is busy (a handler running, a response being written, a
  websocket) does a new one wait, in the listen backlog.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from framework import concurrency
from framework.exceptions import ConfigurationError
from framework.logs import log_error

log = logging.getLogger(__name__)

_EVICTION_LOG_INTERVAL = 10.0  # seconds between two records of evictions


@dataclass(frozen=True)
class ConnectionLimits:
    """A server's limits; see the module docstring for what each bounds."""

    max_connections: int
    idle_timeout: float
    header_timeout: float
    socket_timeout: float

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(
                f"max_connections must be at least 1, not {self.max_connections}"
            )
        for name in ("idle_timeout", "header_timeout", "socket_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")


class ConnectionGuard:
    """The pool a server's connections run in, and what each of them is doing.

    eventlet's server hands every accepted connection to ``spawn()``; the guarded
    protocol (``framework.concurrency.guarded_wsgi_server``) reports when a
    connection waits for a request, reads its headers, and is being served; the
    server runs ``sweep_forever()``, which shuts down connections past their
    deadline.
    """

    def __init__(self, limits: ConnectionLimits, name: str = "http") -> None:
        self.limits = limits
        self.name = name
        self.idle_timeout = limits.idle_timeout
        self.header_timeout = limits.header_timeout
        self.evictions = 0
        self.timeouts = 0
        self._pool = concurrency.GreenPool(limits.max_connections)
        # Connections waiting for (or still reading) a request, longest waiting
        # first (dicts keep insertion order): id(conn_state) -> (conn_state,
        # deadline on the monotonic clock, whether its request line is in).
        self._waiting: dict[int, tuple[list[Any], float, bool]] = {}
        # Connections shut down by the guard, and why.
        self._cut: dict[int, str] = {}
        self._last_eviction_log = -_EVICTION_LOG_INTERVAL

    @property
    def sweep_interval(self) -> float:
        # Deadlines are kept to within a quarter of the shortest one.
        shortest = min(self.idle_timeout, self.header_timeout)
        return min(max(shortest / 4, 0.05), 1.0)

    # -- reported by the protocol ---------------------------------------------------

    def waiting_for_request(self, conn_state: list[Any]) -> None:
        key = id(conn_state)
        self._waiting.pop(key, None)
        self._waiting[key] = (conn_state, time.monotonic() + self.idle_timeout, False)

    def reading_headers(self, conn_state: list[Any]) -> None:
        key = id(conn_state)
        if key in self._waiting:  # keeps its place: it has waited since then
            deadline = time.monotonic() + self.header_timeout
            self._waiting[key] = (conn_state, deadline, True)

    def serving(self, conn_state: list[Any]) -> None:
        self._waiting.pop(id(conn_state), None)

    def cut_short(self, conn_state: list[Any]) -> str | None:
        return self._cut.get(id(conn_state))

    # -- the pool eventlet's server uses ----------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any) -> concurrency.GreenThread:
        """Run ``fn(conn_state)`` in a slot; when none is free, evict to make one."""
        if self._pool.free() == 0:
            self._evict_one()
        conn_state = args[0] if args else None
        thread = self._pool.spawn(self._serve_connection, fn, args)
        if conn_state is not None:
            # A connection counts as waiting from its accept until its first
            # request line is in (the protocol says so too, once it runs).
            self.waiting_for_request(conn_state)
            thread.link(self._forget, conn_state)
        return thread

    def _serve_connection(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            # An unexpected error on one connection (a socket error other than a
            # reset, say) ends that connection only, and is logged in the
            # service's format (type and frames: its text could quote the
            # request) instead of being printed by eventlet. nameko's container
            # died of it: one client could take the service down.
            log_error(
                log,
                "error serving a connection",
                exc,
                expected=False,
                correlation_id=None,
                fields={"server": self.name},
            )
            sock = args[0][1] if args and len(args[0]) > 1 else None
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def waitall(self) -> None:
        self._pool.waitall()

    def running(self) -> int:
        return self._pool.running()

    def waiting(self) -> int:
        """Accepted connections waiting for a slot (every one is busy)."""
        return self._pool.waiting()

    @property
    def coroutines_running(self) -> set[concurrency.GreenThread]:
        return self._pool.coroutines_running

    def kill_all(self) -> None:
        for thread in list(self._pool.coroutines_running):
            concurrency.kill(thread)

    # -- deadlines ---------------------------------------------------------------------

    def sweep_forever(self) -> None:
        while True:
            concurrency.sleep(self.sweep_interval)
            self.sweep()

    def sweep(self) -> None:
        """Shut down every connection past its deadline."""
        now = time.monotonic()
        expired = [
            (key, conn_state, in_headers)
            for key, (conn_state, deadline, in_headers) in self._waiting.items()
            if deadline <= now
        ]
        for key, conn_state, in_headers in expired:
            del self._waiting[key]
            self.timeouts += 1
            if in_headers:
                # Its request line is in: the reader sees the end of the headers,
                # and answers 408 on the still open write side.
                self._cut[key] = concurrency.HEADERS_TIMED_OUT
                _shutdown(conn_state[1], socket.SHUT_RD)
            else:
                self._cut[key] = "idle"
                _shutdown(conn_state[1], socket.SHUT_RDWR)

    # -- internals -------------------------------------------------------------------------

    def _forget(self, _thread: Any, conn_state: list[Any]) -> None:
        key = id(conn_state)
        self._waiting.pop(key, None)
        self._cut.pop(key, None)

    def _evict_one(self) -> None:
        if not self._waiting:
            return  # every connection is busy: the new one waits for a slot
        key, (conn_state, _, _) = next(iter(self._waiting.items()))
        del self._waiting[key]
        self._cut[key] = "evicted"
        self.evictions += 1
        now = time.monotonic()
        if now - self._last_eviction_log >= _EVICTION_LOG_INTERVAL:
            # At most one record per interval: under a flood of silent
            # connections, one per eviction would flood the log instead.
            self._last_eviction_log = now
            log.warning(
                "connection cap reached: closing connections that sent no "
                "complete request, to make room",
                extra={
                    "server": self.name,
                    "max_connections": self.limits.max_connections,
                    "evictions": self.evictions,
                },
            )
        # Wakes its reader with an end of stream; the slot frees when its thread
        # ends, which spawn() then waits for.
        _shutdown(conn_state[1], socket.SHUT_RDWR)


def _shutdown(sock: Any, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def limits_from_config(
    config: Any,
    *,
    prefix: str,
    defaults: ConnectionLimits,
) -> ConnectionLimits:
    """``ConnectionLimits`` from ``<prefix>MAX_CONNECTIONS``, ``<prefix>IDLE_TIMEOUT``,
    ``<prefix>HEADER_TIMEOUT`` and ``<prefix>IO_TIMEOUT``, each optional."""
    try:
        return ConnectionLimits(
            max_connections=int(
                config.get(f"{prefix}MAX_CONNECTIONS", defaults.max_connections)
            ),
            idle_timeout=float(
                config.get(f"{prefix}IDLE_TIMEOUT", defaults.idle_timeout)
            ),
            header_timeout=float(
                config.get(f"{prefix}HEADER_TIMEOUT", defaults.header_timeout)
            ),
            socket_timeout=float(
                config.get(f"{prefix}IO_TIMEOUT", defaults.socket_timeout)
            ),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid {prefix}* connection limit: {exc}") from exc
