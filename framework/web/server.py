"""The one HTTP server a container runs, shared by its HTTP and websocket entrypoints.

Every route provider (an ``@http`` handler, the websocket server) registers with the
container's ``WebServer`` during ``setup()``; ``start()`` freezes their rules into a
werkzeug ``Map``, binds ``WEB_SERVER_ADDRESS`` and serves with eventlet's wsgi server.
Each connection is handled in a green thread of the server's own pool; the service
method itself runs in a container worker, which is what bounds concurrency
(``max_workers``).

Graceful stop, in the container's order: the first entrypoint to stop makes the
server stop accepting; in-flight requests finish while the container waits for its
workers; then ``WebServer.stop()`` waits for the connections to write their
responses (up to the container's drain timeout) and closes the listening socket.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout
from werkzeug.http import http_date
from werkzeug.routing import Map, MapAdapter, Rule
from werkzeug.wrappers import Request, Response

from framework import concurrency
from framework.constants import (
    DEFAULT_HTTP_CONTEXT_HEADERS,
    DEFAULT_WEB_MAX_CONTENT_LENGTH,
    DEFAULT_WEB_SERVER_ADDRESS,
    HTTP_CONTEXT_HEADERS_CONFIG_KEY,
    WEB_MAX_CONTENT_LENGTH_CONFIG_KEY,
    WEB_SERVER_CONFIG_KEY,
)
from framework.exceptions import ConfigurationError, is_expected, safe_message
from framework.extensions import ProviderCollector, SharedExtension
from framework.logs import log_error
from framework.web.connections import (
    ConnectionGuard,
    ConnectionLimits,
    limits_from_config,
)

log = logging.getLogger(__name__)

WsgiApplication = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Config keys of the server's connection limits (see framework.web.connections):
# WEB_MAX_CONNECTIONS, WEB_IDLE_TIMEOUT, WEB_HEADER_TIMEOUT, WEB_IO_TIMEOUT.
WEB_LIMITS_CONFIG_PREFIX = "WEB_"
# Seconds the whole request body may take to arrive (a 408 after that).
WEB_BODY_TIMEOUT_CONFIG_KEY = "WEB_BODY_TIMEOUT"
# Websocket origins allowed besides the server's own: a list (or comma-separated
# string) of `scheme://host[:port]`, or "*" for any.
WEB_ALLOWED_ORIGINS_CONFIG_KEY = "WEB_ALLOWED_ORIGINS"

DEFAULT_WEB_LIMITS = ConnectionLimits(
    # Connections served at once, keep-alive and websockets included.
    max_connections=1024,
    # An idle keep-alive connection (or one that never sends a request) is kept
    # this long.
    idle_timeout=60.0,
    header_timeout=10.0,
    socket_timeout=30.0,
)
DEFAULT_WEB_BODY_TIMEOUT = 60.0
# Kept for code that read them; the configured limits are on `WebServer.limits`.
MAX_CONNECTIONS = DEFAULT_WEB_LIMITS.max_connections
KEEPALIVE_TIMEOUT = DEFAULT_WEB_LIMITS.idle_timeout
LISTEN_BACKLOG = 128

_ADDRESS = re.compile(r"^(?:(?P<address>\[[^\]]+\]|[^:\[\]]+):)?(?P<port>\d+)$")


class BindAddress(NamedTuple):
    address: str
    port: int


def parse_address(address: str | int) -> BindAddress:
    """``[address:]port`` → ``BindAddress``; without an address, ``""``: every
    IPv4 interface, as for ``socket.bind`` (and nameko's ``parse_address``).

    An IPv6 address goes in brackets: ``[::1]:8000``.
    """
    match = _ADDRESS.match(str(address).strip())
    if match is None:
        raise ConfigurationError(
            f"Misconfigured bind address `{address}`. Should be `[address:]port`"
        )
    host = (match.group("address") or "").strip("[]")
    return BindAddress(host, int(match.group("port")))


def context_data_from_headers(
    request: Request, config: Mapping[str, Any]
) -> dict[str, str]:
    """Context data taken from the request headers named in ``HTTP_CONTEXT_HEADERS``.

    The config maps header name → context key and replaces the default mapping
    (``X-Request-Id``, ``Accept-Language``, ``User-Agent``) as a whole. Empty
    headers are skipped.
    """
    environ = request.environ
    data = {}
    for environ_key, key in _environ_keys(config.get(HTTP_CONTEXT_HEADERS_CONFIG_KEY)):
        value = environ.get(environ_key)
        if value:
            data[key] = value
    return data


_environ_key_cache: dict[Any, list[tuple[str, str]]] = {}


def _environ_keys(mapping: Any) -> list[tuple[str, str]]:
    """``[(WSGI environ key, context key)]`` for a header mapping, computed once:
    on every request, building werkzeug's header view showed in profiles."""
    if mapping is None:
        mapping = DEFAULT_HTTP_CONTEXT_HEADERS
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(
            f"`{HTTP_CONTEXT_HEADERS_CONFIG_KEY}` must map header names to "
            f"context keys, got {mapping!r}"
        )
    cache_key = tuple(mapping.items())
    keys = _environ_key_cache.get(cache_key)
    if keys is None:
        keys = _environ_key_cache[cache_key] = [
            (_environ_name(header), key) for header, key in mapping.items()
        ]
    return keys


def _environ_name(header: str) -> str:
    name = header.upper().replace("-", "_")
    return name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"


def json_error_response(
    exc: BaseException,
    status: int,
    *,
    expected: bool | None = None,
    correlation_id: str | None = None,
) -> Response:
    """``{"error": <exception type>, "message": <text>}``; never a traceback.

    The text is the exception's own only when it is ``expected`` (by default:
    ``framework.exceptions.is_expected``, i.e. a ``BadRequest`` or a registered
    type); otherwise a generic message naming the type and ``correlation_id``
    (also in the body), which the service's error log carries with the details.
    """
    if expected is None:
        expected = is_expected(exc)
    body: dict[str, Any] = {
        "error": type(exc).__name__,
        "message": safe_message(exc, expected, correlation_id),
    }
    if not expected:
        body["correlation_id"] = correlation_id
    return Response(json.dumps(body), status=status, mimetype="application/json")


def new_correlation_id() -> str:
    """An id for a failure that happened outside any worker (so has no call id)."""
    return str(uuid.uuid4())


_MAX_CACHED_ADAPTERS = 64
_MAX_CACHED_MATCHES = 1024


def _wsgi_string(value: str) -> str:
    # WSGI strings are latin-1 decoded bytes; werkzeug decodes them as UTF-8.
    return value.encode("latin-1").decode(errors="replace")


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The ``Date`` header's value, formatted once per second (eventlet formats it
    for every response otherwise, which showed in the HTTP profile)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = http_date(now)
    return _date_cache[1]


def _plain_response(
    response: Response, environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """What ``response(environ, start_response)`` does, for the common case of a
    plain werkzeug ``Response`` holding its body in memory, in a few steps instead
    of werkzeug's general path; anything else takes that path."""
    body = response.response
    status = response.status_code
    if (
        not isinstance(body, list)
        or response.direct_passthrough
        # Close callbacks run in werkzeug's path (if werkzeug ever renames this
        # attribute, every response takes that path: slower, still right).
        or getattr(response, "_on_close", True)
        or status < 200
        or status in (204, 304)
        or environ.get("REQUEST_METHOD") == "HEAD"
    ):
        return response(environ, start_response)
    headers = response.headers.to_wsgi_list()
    # One pass over the names: werkzeug's `in` raises and catches a KeyError for
    # each missing header.
    names = {name.lower() for name, _ in headers}
    if "content-length" not in names or not names.isdisjoint(_REWRITTEN_HEADERS):
        return response(environ, start_response)
    if "date" not in names:
        headers.append(("Date", _http_date()))
    start_response(response.status, headers)
    return body


# Headers werkzeug may rewrite on the way out (relative locations).
_REWRITTEN_HEADERS = frozenset({"location", "content-location"})


class RouteProvider(Protocol):
    """What the server needs from an extension that serves a URL."""

    def get_url_rule(self) -> Rule: ...

    def handle_request(self, request: Request) -> WsgiApplication: ...


class WsgiApp:
    """Routes a request to its provider and returns the provider's WSGI response.

    The body is read here, in the connection's thread and within
    ``WEB_MAX_CONTENT_LENGTH``, so a slow or oversized upload never holds a worker.
    """

    def __init__(self, server: WebServer) -> None:
        self.server = server
        # URL map adapters by what they are bound to (host, scheme, script name):
        # binding one per request showed in the HTTP profile.
        self._adapters: dict[tuple[Any, ...], MapAdapter] = {}
        self._matches: dict[tuple[Any, ...], tuple[Rule, Mapping[str, Any]]] = {}
        self._adapters_map: Map | None = None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        if "eventlet.input" in environ:
            # eventlet's input stream stops at the end of the body, chunked or not;
            # saying so lets werkzeug read chunked bodies (it returns an empty body
            # otherwise) and enforce the size limit while reading.
            environ.setdefault("wsgi.input_terminated", True)
        # Not populating environ["werkzeug.request"]: that makes request and environ
        # a reference cycle, garbage for the cyclic collector on every request.
        request = Request(environ, populate_request=False)
        request.max_content_length = self.server.max_content_length
        try:
            response = self.dispatch(request)
        except HTTPException as exc:
            response = exc.get_response(environ)
            if exc.code in (408, 413) and "framework.close_connection" in environ:
                # The rest of the body is not worth reading, as eventlet would
                # to reuse the connection: close it after the response.
                environ["framework.close_connection"]()
        except Exception as exc:
            correlation_id = new_correlation_id()
            log_error(
                log,
                "error routing a request",
                exc,
                expected=False,
                correlation_id=correlation_id,
                fields={"method": request.method, "path": request.path},
            )
            response = json_error_response(
                exc, 500, expected=False, correlation_id=correlation_id
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "http request",
                extra={
                    "service": self.server.container.service_name,
                    "method": request.method,
                    "path": request.path,
                    "status": getattr(response, "status_code", None),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
        if type(response) is Response:
            return _plain_response(response, environ, start_response)
        return response(environ, start_response)

    def match(self, environ: dict[str, Any]) -> tuple[Rule, Mapping[str, Any]]:
        """The rule and path values for a request (werkzeug's routing exceptions
        for no match, a wrong method or a redirect)."""
        url_map = self.server.url_map
        if "HTTP_UPGRADE" in environ:
            # A websocket upgrade matches websocket rules only: werkzeug's own
            # binding works that out from the headers.
            return url_map.bind_to_environ(environ).match(return_rule=True)
        if self._adapters_map is not url_map:
            self._adapters = {}
            self._matches = {}
            self._adapters_map = url_map
        key = (
            environ.get("HTTP_HOST"),
            environ.get("SERVER_NAME"),
            environ.get("SERVER_PORT"),
            environ.get("wsgi.url_scheme"),
            environ.get("SCRIPT_NAME"),
        )
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        # Matches by path and method too: werkzeug's matcher makes a reference
        # cycle (a recursive closure) on every call, which keeps the cyclic
        # garbage collector busy, and with it the tail latency.
        matched = self._matches.get((key, path, method))
        if matched is not None:
            return matched
        adapter = self._adapters.get(key)
        if adapter is None:
            if len(self._adapters) >= _MAX_CACHED_ADAPTERS:
                self._adapters.clear()  # a client inventing Host headers
            adapter = self._adapters[key] = url_map.bind_to_environ(environ)
        matched = adapter.match(
            _wsgi_string(path),
            method,
            return_rule=True,
            query_args=_wsgi_string(environ.get("QUERY_STRING", "")),
        )
        if len(self._matches) >= _MAX_CACHED_MATCHES:
            self._matches.clear()  # a client walking through many URLs
        self._matches[key, path, method] = matched
        return matched

    def dispatch(self, request: Request) -> WsgiApplication:
        environ = request.environ
        rule, values = self.match(environ)
        # A copy: the match may be cached and shared with later requests.
        request.path_values = dict(values)  # type: ignore[attr-defined]
        if not rule.websocket and (
            environ.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in environ
        ):
            timer = concurrency.Timeout(self.server.body_timeout)
            try:
                self.read_body(request)
            except concurrency.Timeout as exc:
                if exc is not timer:
                    raise
                raise RequestTimeout(
                    f"The request body did not arrive within "
                    f"{self.server.body_timeout:g} seconds."
                ) from None
            except TimeoutError:
                # One read waited longer than the IO timeout.
                raise RequestTimeout("The request body stopped arriving.") from None
            finally:
                timer.cancel()
        provider: RouteProvider = rule.endpoint  # type: ignore[assignment]
        return provider.handle_request(request)

    def read_body(self, request: Request) -> None:
        environ = request.environ
        if (
            not environ.get("CONTENT_LENGTH")
            and "HTTP_TRANSFER_ENCODING" not in environ
        ):
            return  # no body (a plain GET): nothing to read or limit
        limit = request.max_content_length
        if limit is None:
            request.get_data(cache=True)
            return
        if (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()
        # A chunked body has no declared length, and werkzeug silently truncates a
        # stream at the limit; reading one byte past it tells "exactly the limit"
        # from "more". The stream is created (and its limit fixed) by this read.
        request.max_content_length = limit + 1
        # Cached on the request: get_data(), json and form all read from the cache.
        data = request.get_data(cache=True)
        request.max_content_length = limit
        if len(data) > limit:
            raise RequestEntityTooLarge()


# The protocol every connection of a WebServer is served with (nameko's name): the
# HTTP/1.1 protocol of eventlet's wsgi server with the guard's deadlines and slot
# accounting, and the common request shape parsed without the email package (see
# framework.concurrency.guarded_wsgi_server, which subclasses it per server).
HttpOnlyProtocol: type = concurrency.GuardedHttpProtocol


class BaseHTTPServer:
    """nameko's name (``six.moves.BaseHTTPServer``) for the module of the request
    handler ``HttpOnlyProtocol`` derives from, for code that patches that class.
    eventlet derives from its own green copy of ``http.server``, so the standard
    library's ``http.server.BaseHTTPRequestHandler`` is another class."""

    BaseHTTPRequestHandler: type = next(
        cls
        for cls in HttpOnlyProtocol.__mro__
        if cls.__name__ == "BaseHTTPRequestHandler"
    )


class WsgiServer:
    """What ``WebServer.get_wsgi_server`` returns by default: the WSGI application
    to serve on ``sock``, served by ``WebServer`` with ``protocol`` behind its
    connection guard (cap, idle and header deadlines, socket timeouts)."""

    def __init__(
        self,
        sock: Any,
        app: WsgiApplication,
        protocol: type = HttpOnlyProtocol,
        debug: bool = False,
    ) -> None:
        self.sock = sock
        self.app = app
        self.protocol = protocol
        self.debug = debug


def served_application(wsgi_server: Any) -> WsgiApplication:
    """The application of what ``get_wsgi_server`` returned (a ``WsgiServer`` or
    eventlet's ``wsgi.Server``); ``ConfigurationError`` if it has none or asks
    for another protocol, which this server cannot run behind its guard."""
    app = getattr(wsgi_server, "app", None)
    if not callable(app):
        raise ConfigurationError(
            f"get_wsgi_server() returned {wsgi_server!r}, which has no WSGI "
            "application in `app`; return a WsgiServer"
        )
    protocol = getattr(wsgi_server, "protocol", HttpOnlyProtocol)
    if protocol is not HttpOnlyProtocol:
        raise ConfigurationError(
            f"get_wsgi_server() asked for the protocol {protocol!r}; connections "
            "are served with HttpOnlyProtocol only (it enforces the connection "
            "limits and timeouts)"
        )
    return app


class WebServer(ProviderCollector, SharedExtension):
    """The container's HTTP server, shared by every route provider.

    Override points: ``get_wsgi_app()`` (wrap it in middleware),
    ``get_wsgi_server()`` (serve another application) and
    ``get_wsgi_server_options()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.url_map: Map = Map()
        self._sock: Any = None
        self._server_thread: concurrency.GreenThread | None = None
        self._connections: ConnectionGuard | None = None
        self._wsgi_server: Any = None
        self._accepting = False

    @property
    def bind_address(self) -> BindAddress:
        return parse_address(
            self.container.config.get(WEB_SERVER_CONFIG_KEY, DEFAULT_WEB_SERVER_ADDRESS)
        )

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the OS's pick for 0)."""
        if self._sock is None:
            raise RuntimeError("the web server is not listening")
        return self._sock.getsockname()[1]

    @property
    def accepting(self) -> bool:
        """Whether new connections are being accepted (started and not stopping)."""
        return self._accepting

    @property
    def max_content_length(self) -> int | None:
        return self.container.config.get(
            WEB_MAX_CONTENT_LENGTH_CONFIG_KEY, DEFAULT_WEB_MAX_CONTENT_LENGTH
        )

    @property
    def limits(self) -> ConnectionLimits:
        return limits_from_config(
            self.container.config,
            prefix=WEB_LIMITS_CONFIG_PREFIX,
            defaults=DEFAULT_WEB_LIMITS,
        )

    @property
    def body_timeout(self) -> float:
        return float(
            self.container.config.get(
                WEB_BODY_TIMEOUT_CONFIG_KEY, DEFAULT_WEB_BODY_TIMEOUT
            )
        )

    def setup(self) -> None:
        # A misconfigured address or limit fails setup, early.
        self.bind_address  # noqa: B018
        self.limits  # noqa: B018

    def start(self) -> None:
        if self._sock is not None:
            return
        rules = [provider.get_url_rule() for provider in self._providers]
        self.url_map = Map(rules)
        address = self.bind_address
        family = socket.AF_INET6 if ":" in address.address else socket.AF_INET
        # No SO_REUSEPORT (eventlet's default): a second service started on the
        # same port must fail loudly, not silently take half of the traffic.
        self._sock = concurrency.green_listen(
            (address.address, address.port),
            family=family,
            backlog=LISTEN_BACKLOG,
            reuse_port=False,
        )
        # Nagle's algorithm off (accepted connections inherit it): a response
        # written in more than one piece (a page over about 16 KB) would keep its
        # last piece until the client acknowledged the first, which a keep-alive
        # client delays by up to 40 ms, on every such request.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections = ConnectionGuard(self.limits, name="web")
        self._wsgi_server = self.get_wsgi_server(self._sock, self.get_wsgi_app())
        self._accepting = True
        self._server_thread = self.container.spawn_managed_thread(
            self._serve, identifier="web_server"
        )
        log.info(
            "web server listening",
            extra={
                "service": self.container.service_name,
                "address": address.address,
                "port": self.port,
                "routes": sorted(rule.rule for rule in rules),
            },
        )

    def get_wsgi_app(self) -> WsgiApplication:
        """The WSGI application served; override to wrap it in middleware."""
        return WsgiApp(self)

    def get_wsgi_server(
        self,
        sock: Any,
        wsgi_app: WsgiApplication,
        protocol: type = HttpOnlyProtocol,
        debug: bool = False,
    ) -> Any:
        """What serves the listening socket, made once at ``start()``: by
        default a ``WsgiServer`` of ``wsgi_app`` (``get_wsgi_app()``).

        An override may return its own ``WsgiServer`` or another object with
        the same ``app`` attribute, such as eventlet's ``wsgi.Server``: its
        application is then served, always through this server's connection
        cap and timeouts, with ``HttpOnlyProtocol``, and without tracebacks
        sent to clients (``debug`` is not honoured).
        """
        return WsgiServer(sock, wsgi_app, protocol=protocol, debug=debug)

    def get_wsgi_server_options(self) -> dict[str, Any]:
        """Keyword arguments for eventlet's wsgi server (see ``wsgi_server``); the
        pool, keep-alive and socket timeouts come from ``limits``."""
        return {
            # Access logging is WsgiApp's (structured); errors never reach eventlet
            # because WsgiApp turns them into responses.
            "log_output": False,
            "debug": False,
        }

    def _serve(self) -> None:
        assert self._connections is not None
        app = served_application(self._wsgi_server)
        concurrency.guarded_wsgi_server(
            self._sock,
            app,
            self._connections,
            socket_timeout=self._connections.limits.socket_timeout,
            **self.get_wsgi_server_options(),
        )

    def stop_accepting(self) -> None:
        """Take no new connections; idle keep-alive ones are closed, busy ones finish.

        Called by the first entrypoint that stops, so nothing new arrives while
        the container drains its workers.
        """
        if not self._accepting:
            return
        self._accepting = False
        if self._server_thread is not None:
            # Interrupts accept(); eventlet's server then closes idle connections
            # and waits, in its own thread, for the busy ones before it closes the
            # listening socket.
            concurrency.kill(self._server_thread)

    def stop(self) -> None:
        """Let the connections write their responses, then close the socket.

        Runs after the container drained its workers. A connection still busy
        after the drain deadline (a slow reader, or one whose worker was killed at
        the deadline) is cut.
        """
        self.stop_accepting()
        self.wait_for_providers()
        if not self._wait_for_server(self.container.drain_timeout):
            log.warning(
                "closing %d connections still open after the drain deadline",
                self.active_connections,
                extra={"service": self.container.service_name},
            )
            self._kill_connections()
            self._wait_for_server(None)
        self._close_socket()

    def kill(self) -> None:
        self._accepting = False
        if self._server_thread is not None:
            concurrency.kill(self._server_thread)
        self._kill_connections()
        self._close_socket()

    @property
    def active_connections(self) -> int:
        if self._connections is None:
            return 0
        return self._connections.running()

    def _wait_for_server(self, timeout: float | None) -> bool:
        if self._server_thread is None:
            return True
        with concurrency.Timeout(timeout, False):
            try:
                self._server_thread.wait()
            except concurrency.GreenletExit:
                pass
            return True
        return False

    def _kill_connections(self) -> None:
        if self._connections is None:
            return
        self._connections.kill_all()

    def _close_socket(self) -> None:
        # eventlet's server closes it when it exits, but not if it was killed
        # before it ever ran.
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
