"""The one seam between the framework and eventlet.

Everything in the framework that spawns, sleeps, waits or pools goes through this
module. eventlet is in maintenance mode upstream; keeping its surface this small is
how we keep the option to move to another green-thread library.
"""

from __future__ import annotations

import warnings

# eventlet warns on import that it is in maintenance mode; we know, and the seam
# below is our answer to it.
warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")

import eventlet  # noqa: E402
import eventlet.event  # noqa: E402
import eventlet.greenpool  # noqa: E402
import eventlet.patcher  # noqa: E402
import eventlet.queue  # noqa: E402
import eventlet.semaphore  # noqa: E402
import eventlet.timeout  # noqa: E402
import eventlet.wsgi  # noqa: E402
from eventlet.greenthread import GreenThread  # noqa: E402
from greenlet import GreenletExit  # noqa: E402

__all__ = [
    "Event",
    "GreenletExit",
    "GreenPool",
    "GreenThread",
    "Queue",
    "Semaphore",
    "Timeout",
    "green_listen",
    "is_monkey_patched",
    "kill",
    "monkey_patch",
    "sleep",
    "spawn",
    "spawn_after",
    "spawn_n",
    "wsgi_server",
]

Event = eventlet.event.Event
GreenPool = eventlet.greenpool.GreenPool
Queue = eventlet.queue.LightQueue
Semaphore = eventlet.semaphore.Semaphore
Timeout = eventlet.timeout.Timeout
Empty = eventlet.queue.Empty

spawn = eventlet.spawn
spawn_n = eventlet.spawn_n
spawn_after = eventlet.spawn_after
sleep = eventlet.sleep
green_listen = eventlet.listen
wsgi_server = eventlet.wsgi.server


def kill(thread: GreenThread, exc_type: type[BaseException] = GreenletExit) -> None:
    """Kill a green thread; a thread that already finished is left alone."""
    if not thread.dead:
        thread.kill(exc_type)


def monkey_patch() -> None:
    """Make the standard library cooperative (sockets, threads, time, select).

    Idempotent. Must run before kombu, amqp or any database driver opens a socket,
    which is why the CLI and the pytest plugin call it before importing services.
    """
    if not is_monkey_patched():
        eventlet.monkey_patch()


def is_monkey_patched() -> bool:
    return bool(eventlet.patcher.is_monkey_patched("socket"))


class Deadline:
    """Remaining time until a fixed point, for loops that wait in several steps."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._at = None if timeout is None else _now() + timeout

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return max(self._at - _now(), 0.0)

    def expired(self) -> bool:
        return self._at is not None and _now() >= self._at


def _now() -> float:
    import time

    return time.monotonic()


# -- waiting on raw file descriptors (for C drivers such as psycopg2) --------------

import eventlet.hubs  # noqa: E402

__all__ += ["wait_readable", "wait_writable"]


def wait_readable(fd: int, timeout: float | None = None) -> None:
    """Park this green thread until ``fd`` is readable; other threads run meanwhile.

    For C libraries that do their own socket I/O (libpq) and so bypass monkey
    patching: they tell us which descriptor they wait on and we wait in the hub.
    """
    eventlet.hubs.trampoline(fd, read=True, timeout=timeout)


def wait_writable(fd: int, timeout: float | None = None) -> None:
    """Park this green thread until ``fd`` is writable (see ``wait_readable``)."""
    eventlet.hubs.trampoline(fd, write=True, timeout=timeout)


# -- websockets (RFC 6455 handshake and framing, done by eventlet) -----------------

from typing import Any  # noqa: E402

import eventlet.websocket  # noqa: E402

__all__ += ["Full", "websocket_app", "websocket_send_close", "websocket_send_ping"]

Full = eventlet.queue.Full


def websocket_app(handler: Any, max_frame_length: int = 8 << 20) -> Any:
    """A WSGI app that upgrades the request and runs ``handler(ws)`` until it returns.

    ``ws`` has ``send(text)``, ``wait()`` (the next message; ``None`` once the peer
    has closed), ``close()`` and ``socket`` (the raw green socket). Unlike eventlet's
    default, the upgraded connection is not marked idle: a stopping wsgi server
    would otherwise cut it mid-reply, and the owner of the sockets wants to close
    them itself, after flushing what it queued.
    """
    upgrade = eventlet.websocket.WebSocketWSGI(
        handler, max_frame_length=max_frame_length
    )

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("eventlet.set_idle", None)
        return upgrade(environ, start_response)

    return app


def websocket_send_ping(ws: Any) -> None:
    """Send a ping frame: every client answers with a pong, which proves it alive."""
    ws.send(b"", control_code=0x9)


def websocket_send_close(ws: Any) -> None:
    """Send a close frame on ``ws`` but leave the socket open.

    eventlet's ``ws.close()`` also closes the descriptor, which does not wake a
    green thread blocked reading it; the caller shuts the socket down instead, which
    does. Send errors are ignored: the peer may be gone already.
    """
    ws._send_closing_frame(ignore_send_errors=True)


# -- test support ---------------------------------------------------------------------

import eventlet.debug  # noqa: E402

__all__ += ["enable_blocking_detection"]


def enable_blocking_detection(resolution: float = 1.0) -> None:
    """Raise in any green thread that keeps the hub for ``resolution`` seconds.

    That only happens when something blocks without yielding (a C driver, a call
    that monkey patching missed); the pytest plugin's ``--blocking-detection``
    turns this on. Uses SIGALRM, so it is for tests, not for services.
    """
    eventlet.debug.hub_blocking_detection(True, resolution)


# -- CPU-bound work off the hub -------------------------------------------------------

import eventlet.tpool  # noqa: E402

__all__ += ["run_in_thread"]


def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a real OS thread; this green thread waits for it.

    For CPU-heavy C code that releases the GIL (argon2 password hashing, say):
    run on the hub it would stall every green thread of the process for its whole
    duration. The pool has ``EVENTLET_THREADPOOL_SIZE`` threads (default 20).
    """
    return eventlet.tpool.execute(fn, *args, **kwargs)


# -- real OS threads ---------------------------------------------------------------------
# For the few jobs that must run while the hub is blocked by CPU-bound green code
# (AMQP heartbeats): the unpatched threading, time and os modules.


def start_os_thread(fn: Any, name: str) -> Any:
    """Run ``fn`` in a real daemon thread, outside the eventlet hub."""
    threading = eventlet.patcher.original("threading")
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


def os_lock() -> Any:
    """A lock that also excludes real OS threads (hold it only for non-blocking work)."""
    return eventlet.patcher.original("threading").Lock()


def os_thread_id() -> int:
    """The real OS thread's id: every green thread of one hub shares it."""
    return _os_get_ident()


_os_get_ident = eventlet.patcher.original("_thread").get_ident


def os_sleep(seconds: float) -> None:
    eventlet.patcher.original("time").sleep(seconds)


def os_write(fd: int, data: bytes) -> int:
    return eventlet.patcher.original("os").write(fd, data)


# -- HTTP serving with deadlines on what clients send --------------------------------
# eventlet's wsgi server applies its keep-alive timeout to the wait for a request
# line, one recv at a time, and no timeout at all to the headers that follow: a
# client that sends a request line and one header, then nothing, holds its
# connection (and a slot of the server's pool) forever. The protocol below bounds
# the request line and the headers with total deadlines and reports each
# connection's phase to a guard (``framework.web.connections``) that owns the pool.
# It overrides ``_read_request_line`` and ``parse_request``, eventlet's and the
# standard library's; tests/framework/web/test_connections.py fails if they change.

from typing import Protocol  # noqa: E402

__all__ += ["HttpGuard", "guarded_wsgi_server"]

_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


class HttpGuard(Protocol):
    """What the guarded protocol reports to, and the limits it reads."""

    idle_timeout: float
    header_timeout: float

    def waiting_for_request(self, conn_state: list[Any]) -> None: ...

    def serving(self, conn_state: list[Any]) -> None: ...

    def evicted(self, conn_state: list[Any]) -> bool: ...

    # The pool eventlet's server spawns connections into.
    def spawn(self, fn: Any, *args: Any) -> Any: ...

    def waitall(self) -> None: ...


class _GuardedHttpProtocol(eventlet.wsgi.HttpProtocol):
    guard: HttpGuard  # set on the subclass made for each server

    def _read_request_line(self) -> Any:
        # Idle keep-alive, or a request line trickled in a byte at a time: either
        # way the connection gets `idle_timeout` in total to deliver a line.
        self.guard.waiting_for_request(self.conn_state)
        timer = Timeout(self.guard.idle_timeout)
        try:
            line = super()._read_request_line()
        except Timeout as exc:
            if exc is not timer:
                raise
            return ""
        finally:
            timer.cancel()
        if self.guard.evicted(self.conn_state):
            return ""
        return line

    def parse_request(self) -> bool:
        timer = Timeout(self.guard.header_timeout)
        try:
            parsed = bool(super().parse_request())
        except Timeout as exc:
            if exc is not timer:
                raise
            self.close_connection = 1
            try:
                self.wfile.write(_REQUEST_TIMEOUT_RESPONSE)
                self.wfile.flush()
            except OSError:
                pass
            return False
        finally:
            timer.cancel()
        if self.guard.evicted(self.conn_state):
            # The socket was shut down under the header reader, which took the
            # end of stream for the end of the headers: not a request to serve.
            self.close_connection = 1
            return False
        if parsed:
            self.guard.serving(self.conn_state)
        return parsed

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        # For the application to end the connection after its response (a body
        # left unread after a 408 or 413 is not worth draining).
        environ["framework.close_connection"] = self._close_after_response
        return environ

    def _close_after_response(self) -> None:
        self.close_connection = 1


def guarded_wsgi_server(
    sock: Any,
    app: Any,
    guard: HttpGuard,
    *,
    socket_timeout: float | None,
    **options: Any,
) -> None:
    """eventlet's wsgi server with ``guard`` as its pool and deadlines on requests.

    ``socket_timeout`` bounds every other socket operation once a request line is
    in: reading the body, writing the response.
    """
    protocol = type("GuardedHttpProtocol", (_GuardedHttpProtocol,), {"guard": guard})
    eventlet.wsgi.server(
        sock,
        app,
        protocol=protocol,
        custom_pool=guard,
        keepalive=guard.idle_timeout,
        socket_timeout=socket_timeout,
        **options,
    )
