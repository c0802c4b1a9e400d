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
# connection (and a slot of the server's pool) forever. The protocol below reports
# each connection's phase to a guard (``framework.web.connections``) that owns the
# pool and enforces total deadlines on the request line and the headers: a
# sweeper shuts down the socket of a connection past its deadline, which wakes its
# reader here. (A sweep per fraction of a second instead of a timer per request:
# the timers showed in the HTTP profile.) For speed it also parses the common
# request shape itself and builds that request's environ (``_parse_plain_request``,
# ``_plain_environ``). It overrides ``_read_request_line``, ``parse_request`` and
# ``get_environ``, eventlet's and the standard library's;
# tests/framework/web/test_connections.py fails if they change.

import http.client  # noqa: E402
import re  # noqa: E402
import urllib.parse  # noqa: E402
from typing import Protocol  # noqa: E402

__all__ += ["GuardedHttpProtocol", "HttpGuard", "guarded_wsgi_server"]

_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


class HttpGuard(Protocol):
    """What the guarded protocol reports to, and the limits it reads."""

    idle_timeout: float

    def waiting_for_request(self, conn_state: list[Any]) -> None: ...

    def reading_headers(self, conn_state: list[Any]) -> None: ...

    def serving(self, conn_state: list[Any]) -> None: ...

    def cut_short(self, conn_state: list[Any]) -> str | None:
        """Why the guard shut this connection down (evicted, timed out), if it did."""
        ...

    def sweep_forever(self) -> None: ...

    # The pool eventlet's server spawns connections into.
    def spawn(self, fn: Any, *args: Any) -> Any: ...

    def waitall(self) -> None: ...


HEADERS_TIMED_OUT = "headers timed out"

# The standard library's limits on request headers (http.client).
_MAX_HEADERS = 100
_MAX_HEADER_LINE = 65536
# RFC 9110 token: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class GuardedHttpProtocol(eventlet.wsgi.HttpProtocol):
    guard: HttpGuard  # set on the subclass made for each server
    # The headers of the request `_parse_plain_request` read, for get_environ.
    _plain_headers: list[tuple[str, str]] | None = None
    _addresses: dict[str, str] | None = None  # this connection's, for the environ

    def _read_request_line(self) -> Any:
        guard = self.guard
        guard.waiting_for_request(self.conn_state)
        line = super()._read_request_line()
        if guard.cut_short(self.conn_state) is not None:
            return ""  # what was read is a fragment: close without answering
        if line:
            guard.reading_headers(self.conn_state)
        return line

    def parse_request(self) -> bool:
        self._plain_headers = None
        parsed = self._parse_plain_request()
        if parsed is None:
            parsed = bool(super().parse_request())
        reason = self.guard.cut_short(self.conn_state)
        if reason is None:
            if parsed:
                self.guard.serving(self.conn_state)
            return parsed
        # The socket was shut down under the header reader, which took the end
        # of stream for the end of the headers: not a request to serve.
        self.close_connection = 1
        if reason == HEADERS_TIMED_OUT:
            try:
                self.wfile.write(_REQUEST_TIMEOUT_RESPONSE)
                self.wfile.flush()
            except OSError:
                pass
        return False

    def _parse_plain_request(self) -> bool | None:
        """The standard library's ``parse_request`` for the common shape of
        request, ``METHOD target HTTP/1.x`` and well-formed headers, without the
        email package (its header parser was a tenth of an HTTP request's cost);
        ``None`` for any other request line, which the standard library parses.
        Header lines that are not ``token: value`` (obsolete folding included) are
        a 400: servers and proxies that read them differently are how requests
        get smuggled."""
        raw = self.raw_requestline
        if not raw.endswith(b"\r\n"):
            return None
        words = raw[:-2].split(b" ")
        if len(words) != 3 or not words[0] or not words[1]:
            return None
        version = words[2]
        if version == b"HTTP/1.1":
            keep_alive = self.protocol_version >= "HTTP/1.1"
        elif version == b"HTTP/1.0":
            keep_alive = False
        else:
            return None
        self.command = words[0].decode("latin-1")
        self.path = words[1].decode("latin-1")
        self.request_version = version.decode("latin-1")
        self.requestline = raw[:-2].decode("latin-1")
        self.close_connection = True
        headers = http.client.HTTPMessage()
        plain: list[tuple[str, str]] = []
        count = 0
        while True:
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            count += 1
            if count > _MAX_HEADERS:
                self.send_error(431, "Too many headers")
                return False
            if len(line) > _MAX_HEADER_LINE:
                self.send_error(431, "Line too long")
                return False
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or _HEADER_NAME.fullmatch(name) is None:
                self.send_error(400, "Bad header line")
                return False
            value = value.strip(" \t\r\n")
            headers[name] = value
            plain.append((name, value))
        self.headers = headers
        self._plain_headers = plain
        connection = headers.get("Connection", "").lower()
        if connection == "close":
            keep_alive = False
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            keep_alive = True
        self.close_connection = not keep_alive
        # `Expect: 100-continue` needs nothing here: eventlet's input stream
        # answers it when the application first reads the body.
        return True

    def get_environ(self) -> dict[str, Any]:
        plain = self._plain_headers
        if plain is None:
            environ = super().get_environ()
        else:
            environ = self._plain_environ(plain)
            self._plain_headers = None
        # For the application to end the connection after its response (a body
        # left unread after a 408 or 413 is not worth draining).
        environ["framework.close_connection"] = self._close_after_response
        return environ

    def _plain_environ(self, headers: list[tuple[str, str]]) -> dict[str, Any]:
        """eventlet's ``get_environ`` for a request ``_parse_plain_request`` read,
        from its header list, with the addresses looked up once per connection
        (eventlet asks the kernel for the socket's name on every request).
        tests/framework/web/test_connections.py compares the two."""
        environ = self.server.get_environ()
        environ["REQUEST_METHOD"] = self.command
        environ["SCRIPT_NAME"] = ""
        path, question, query = self.path.partition("?")
        environ["RAW_PATH_INFO"] = path
        environ["PATH_INFO"] = urllib.parse.unquote(path, encoding="latin1")
        if question:
            environ["QUERY_STRING"] = query
        content_type = content_length = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-type" and content_type is None:
                content_type = value
            elif lowered == "content-length" and content_length is None:
                content_length = value
        environ["CONTENT_TYPE"] = content_type or "text/plain"
        if content_length:
            environ["CONTENT_LENGTH"] = content_length
        environ["SERVER_PROTOCOL"] = "HTTP/1.0"  # as eventlet says
        addresses = self._addresses
        if addresses is None:
            server = eventlet.wsgi.addr_to_host_port(self.request.getsockname())
            client = eventlet.wsgi.addr_to_host_port(self.client_address)
            addresses = self._addresses = {
                "SERVER_NAME": server[0],
                "SERVER_PORT": str(server[1]),
                "REMOTE_ADDR": client[0],
                "REMOTE_PORT": str(client[1]),
            }
        environ.update(addresses)
        environ["GATEWAY_INTERFACE"] = "CGI/1.1"
        environ["headers_raw"] = tuple(headers)
        for name, value in headers:
            key = self.formalize_key_naming(name)
            if not key or key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                continue
            key = "HTTP_" + key
            if key in environ:
                environ[key] += "," + value
            else:
                environ[key] = value
        if environ.get("HTTP_EXPECT", "").lower() == "100-continue":
            wfile, wfile_line = self.wfile, b"HTTP/1.1 100 Continue\r\n"
        else:
            wfile, wfile_line = None, None
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        if not chunked and content_length is None:
            content_length = "0"  # no length, not chunked: no body (RFC 9112 6.3)
        environ["wsgi.input"] = environ["eventlet.input"] = eventlet.wsgi.Input(
            self.rfile,
            content_length,
            self.connection,
            wfile=wfile,
            wfile_line=wfile_line,
            chunked_input=chunked,
        )
        environ["eventlet.posthooks"] = []
        conn_state = self.conn_state

        def set_idle() -> None:
            conn_state[2] = eventlet.wsgi.STATE_IDLE

        environ["eventlet.set_idle"] = set_idle
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
    protocol = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
    sweeper = spawn(guard.sweep_forever)
    try:
        eventlet.wsgi.server(
            sock,
            app,
            protocol=protocol,
            custom_pool=guard,
            keepalive=guard.idle_timeout,
            socket_timeout=socket_timeout,
            **options,
        )
    finally:
        kill(sweeper)


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
    # Out of multiprocessing's own bookkeeping: every start() polls the exit pipe
    # of each child in it, from whichever green thread starts, and eventlet
    # refuses a second waiter on a descriptor that the child's own green thread
    # is waiting on (below). Only that thread ever looks at this child.
    multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
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


# -- live debugging --------------------------------------------------------------------


def backdoor_server(port: int, namespace: dict[str, Any]) -> tuple[GreenThread, int]:
    """An interactive Python console for live debugging, on ``127.0.0.1:port``.

    Loopback only: whoever reaches it runs any code as the service, so it must
    never listen on a network interface (reach it from elsewhere through an SSH
    tunnel). ``port`` 0 takes a free port. Returns the serving green thread (kill
    it to close the console) and the port.
    """
    listener = eventlet.listen(("127.0.0.1", port))
    return serve_backdoor(listener, namespace), listener.getsockname()[1]


def serve_backdoor(listener: Any, namespace: dict[str, Any]) -> GreenThread:
    """The console of ``backdoor_server`` on a socket the caller bound (a green
    listening socket, e.g. from ``green_listen``); the serving green thread."""
    import eventlet.backdoor

    return eventlet.spawn(eventlet.backdoor.backdoor_server, listener, locals=namespace)
