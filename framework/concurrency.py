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


# -- CPU-bound work in a child process ----------------------------------------------
# For work that holds the GIL or the CPU for long (a data conversion): a thread
# would still stall the hub through the GIL, a child process does not, can be
# killed at once (cancel), and takes its memory with it. Children come from a
# forkserver: a clean interpreter, not this eventlet-patched one, started once, that
# forks each child with the preloaded modules already imported (tens of
# milliseconds per child instead of most of a second for a fresh interpreter).

import multiprocessing  # noqa: E402
import os as _os  # noqa: E402
import pickle  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

__all__ += [
    "ChildProcessDied",
    "ProcessCancelled",
    "preload_for_processes",
    "run_in_process",
]

_process_preload: list[str] = []


class ProcessCancelled(Exception):
    """``should_stop`` asked for it: the child process was killed."""


class ChildProcessDied(Exception):
    """The child process ended without a result (killed, crashed, out of memory)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(
            f"the child process ended without a result (exit code {exitcode})"
        )
        self.exitcode = exitcode


def preload_for_processes(modules: Sequence[str]) -> None:
    """Modules the forkserver imports once, so each child starts with them.

    Effective before the first ``run_in_process`` of this process only: the
    forkserver starts then.
    """
    for module in modules:
        if module not in _process_preload:
            _process_preload.append(module)


def _process_context() -> Any:
    context = multiprocessing.get_context("forkserver")
    # This module too: the child runs ``_child_main`` from it, and importing
    # eventlet (imported, never patched, in the children) costs most of a second.
    context.set_forkserver_preload([__name__, *_process_preload])
    return context


def run_in_process(
    fn: Callable[..., Any],
    *args: Any,
    on_message: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_interval: float = 0.25,
    **kwargs: Any,
) -> Any:
    """``fn(send, *args, **kwargs)`` in a child process; its result, or its exception.

    ``send(message)`` in the child calls ``on_message(message)`` here, in this
    green thread; ``should_stop()`` runs here at least every ``poll_interval``
    seconds, and when it returns true the child is killed (SIGKILL: at once,
    whatever it is doing) and ``ProcessCancelled`` raised. So does an exception
    in either callback, after killing the child. ``fn``, the arguments, the
    messages and the result must pickle; ``fn`` must be importable by name.

    The child exits by itself when this process dies, even by ``kill -9``: it
    watches its pipe to us.
    """
    context = _process_context()
    ours, theirs = context.Pipe(duplex=True)
    process = context.Process(
        target=_child_main, args=(theirs, fn, args, kwargs), daemon=True
    )
    process.start()
    theirs.close()
    try:
        while True:
            try:
                wait_readable(ours.fileno(), timeout=poll_interval)
            except Timeout:
                pass
            while ours.poll(0):
                try:
                    kind, value, detail = ours.recv()
                except EOFError:
                    process.join(timeout=5)
                    raise ChildProcessDied(process.exitcode) from None
                if kind == "message":
                    if on_message is not None:
                        on_message(value)
                elif kind == "result":
                    return value
                else:
                    raise value from _RemoteTraceback(detail)
            if should_stop is not None and should_stop():
                raise ProcessCancelled("stopped on request")
    finally:
        _end_process(process)
        ours.close()


def _end_process(process: Any) -> None:
    if process.is_alive():
        process.kill()
    # The sentinel turns readable when the child is gone; waiting on it parks this
    # green thread only, where join() would block the whole hub.
    try:
        wait_readable(process.sentinel, timeout=5)
    except Timeout:
        pass
    process.join(timeout=0)
    if process.exitcode is not None:
        process.close()


class _RemoteTraceback(Exception):
    """The child's traceback, chained to the exception it raised."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _child_main(
    conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
) -> None:
    # Runs in the child, which nothing monkey-patched (unless the parent's main
    # module patches at import, outside ``if __name__ == "__main__"``: children
    # import it). Real threads regardless, so that the watcher can block.
    threading = eventlet.patcher.original("threading")

    # The parent's eventlet made the socket non-blocking, and the flag travels
    # with the descriptor: without this the reads and writes below fail with
    # EAGAIN instead of waiting.
    _os.set_blocking(conn.fileno(), True)
    lock = threading.Lock()

    def send(message: Any) -> None:
        with lock:
            conn.send(("message", message, None))

    def exit_when_parent_goes() -> None:
        # We never send the child anything: any readable end is end of file.
        try:
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        _os._exit(1)

    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    try:
        result = fn(send, *args, **kwargs)
        reply: tuple[str, Any, Any] = ("result", result, None)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        detail = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that cannot travel
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        reply = ("error", exc, detail)
    with lock:
        conn.send(reply)
    conn.close()
