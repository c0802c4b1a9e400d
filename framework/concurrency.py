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

__all__ += ["Full", "websocket_app", "websocket_send_close"]

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
