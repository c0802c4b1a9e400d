"""Liveness, readiness and metrics over HTTP: one small server per process.

Set ``HEALTH_SERVER_ADDRESS`` (``[address:]port``, e.g. ``0.0.0.0:9000``; port 0
picks a free one) and ``ServiceRunner`` (hence ``framework run``) serves, for every
service it runs, HTTP or not, on that one port:

``GET /health/live``
    200 ``{"status": "live", "services": [...]}`` whenever the process answers. A
    process whose event loop is stuck does not answer, and the probe times out.
``GET /health/ready``
    200 when every container is ready, else 503; the JSON body lists each check::

        {"status": "not ready",
         "checks": [{"service": "orders", "check": "started", "extension": "ServiceContainer",
                     "ok": true, "detail": "running"},
                    {"service": "orders", "check": "QueueConsumer", "extension": "QueueConsumer",
                     "ok": false, "detail": "consumer connection down; reconnecting"},
                    {"service": "orders", "check": "db", "extension": "Database",
                     "ok": true, "detail": "SELECT 1 answered"}]}

    Once the runner begins a graceful stop every container reports not ready, so
    a load balancer stops sending work while in-flight workers drain.
``GET /metrics``
    The Prometheus text format of ``framework.metrics`` (turned on by the server).

The server starts before the containers (liveness answers while they start, and
readiness says they have not) and stops after them. Without a runner:
``HealthServer("127.0.0.1:0", [container]).start()``.

The readiness protocol
----------------------
A container is ready when it is started and every one of its extensions (entrypoints,
dependency providers and their shared sub-extensions) that has a method::

    def health_check(self) -> tuple[bool, str]:   # (ok, detail for humans)

returns ``ok``. ``QueueConsumer`` (consumers registered, connection up) and
``ContainerPublisher`` (the broker takes connections) implement it; any provider
may. A check must answer in ``HEALTH_CHECK_TIMEOUT`` seconds (default 5) or fails;
a check that raises fails with its exception's type and an id as its detail (the
text, which may quote a connection string, goes to the log under that id). Checks run
concurrently, on every request: a probe sees the present, not a cache. A
``framework.database`` provider without ``health_check()`` is checked through its
``check()`` (``SELECT 1``).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from werkzeug.wrappers import Request, Response

from framework import concurrency, metrics
from framework.constants import (
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    HEALTH_CHECK_TIMEOUT_CONFIG_KEY,
    HEALTH_SERVER_CONFIG_KEY,
)
from framework.exceptions import ConfigurationError, unexpected_error_message
from framework.extensions import DependencyProvider, Entrypoint, Extension
from framework.logs import log_error
from framework.web.connections import (
    ConnectionGuard,
    ConnectionLimits,
    limits_from_config,
)

if TYPE_CHECKING:
    from framework.containers import ServiceContainer

log = logging.getLogger(__name__)

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"

# Config keys of the server's connection limits (see framework.web.connections):
# HEALTH_MAX_CONNECTIONS, HEALTH_IDLE_TIMEOUT, HEALTH_HEADER_TIMEOUT, HEALTH_IO_TIMEOUT.
HEALTH_LIMITS_CONFIG_PREFIX = "HEALTH_"
DEFAULT_HEALTH_LIMITS = ConnectionLimits(
    # Probes and scrapes are few. When all slots are taken, a new connection
    # takes the place of one that sent no complete request: silent or half-open
    # connections never keep a probe out.
    max_connections=64,
    idle_timeout=30.0,  # for scrapers that keep their connection open
    header_timeout=5.0,
    socket_timeout=10.0,
)
MAX_CONNECTIONS = DEFAULT_HEALTH_LIMITS.max_connections
KEEPALIVE_TIMEOUT = DEFAULT_HEALTH_LIMITS.idle_timeout

Check = Callable[[], tuple[bool, str]]
Containers = Iterable["ServiceContainer"] | Callable[[], Iterable["ServiceContainer"]]


@runtime_checkable
class HealthCheck(Protocol):
    """An extension that takes part in readiness."""

    def health_check(self) -> tuple[bool, str]: ...


class CheckResult(NamedTuple):
    service: str
    check: str
    extension: str
    ok: bool
    detail: str


def parse_address(address: str | int) -> tuple[str, int]:
    """``"[address:]port"`` → ``(host, port)``; the host defaults to ``0.0.0.0``.

    An IPv6 host goes in brackets: ``[::1]:9000``.
    """
    host, _, port = str(address).strip().rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise ConfigurationError(
            f"{HEALTH_SERVER_CONFIG_KEY} must be `[address:]port`, not {address!r}"
        )
    return host, int(port)


def from_config(config: dict[str, Any], containers: Containers) -> HealthServer | None:
    """The server ``config`` asks for (not started), or ``None`` if it asks for none."""
    address = config.get(HEALTH_SERVER_CONFIG_KEY)
    if address in (None, ""):
        return None
    timeout = float(
        config.get(HEALTH_CHECK_TIMEOUT_CONFIG_KEY, DEFAULT_HEALTH_CHECK_TIMEOUT)
    )
    limits = limits_from_config(
        config, prefix=HEALTH_LIMITS_CONFIG_PREFIX, defaults=DEFAULT_HEALTH_LIMITS
    )
    return HealthServer(address, containers, check_timeout=timeout, limits=limits)


# -- checks -----------------------------------------------------------------------------


def extension_checks(container: ServiceContainer) -> list[tuple[str, Extension, Check]]:
    """``(name, extension, check)`` for every extension of ``container`` with one."""
    found = []
    for extension in container.extensions:
        check = _check_of(extension)
        if check is not None:
            found.append((_check_name(extension), extension, check))
    return sorted(found, key=lambda item: item[0])


def _check_of(extension: Extension) -> Check | None:
    if isinstance(extension, HealthCheck):
        return extension.health_check
    return _database_check(extension)


def _database_check(extension: Extension) -> Check | None:
    # Database providers speak `check()`, raising DatabaseUnavailable. Looked up in
    # sys.modules so that services without a database never import SQLAlchemy.
    database = sys.modules.get("framework.database")
    if database is None or not isinstance(
        extension, database.Database | database.DatabaseSession
    ):
        return None

    def check() -> tuple[bool, str]:
        try:
            extension.check()  # type: ignore[attr-defined]
        except database.DatabaseUnavailable as exc:
            return False, str(exc)
        return True, "SELECT 1 answered"

    return check


def _check_name(extension: Extension) -> str:
    if isinstance(extension, DependencyProvider) and extension.attr_name:
        return extension.attr_name
    if isinstance(extension, Entrypoint) and extension.method_name:
        return extension.method_name
    return type(extension).__name__


def _run_check(check: Check, timeout: float) -> tuple[bool, str]:
    timer = concurrency.Timeout(timeout)
    try:
        ok, detail = check()
        return bool(ok), str(detail)
    except concurrency.Timeout as exc:
        if exc is not timer:
            raise
        return False, f"no answer within {timeout}s"
    except Exception as exc:
        # Its text may hold a connection string or a driver's message: it goes to
        # the log, under an id that the probe's answer names.
        correlation_id = str(uuid.uuid4())
        log_error(
            log,
            "health check failed",
            exc,
            expected=False,
            correlation_id=correlation_id,
        )
        return False, unexpected_error_message(exc, correlation_id)
    finally:
        timer.cancel()


# -- the server ---------------------------------------------------------------------------


class HealthServer:
    """Serves ``/health/live``, ``/health/ready`` and ``/metrics`` for ``containers``.

    ``containers`` is a collection, or a callable returning the current one (the
    runner passes its own, so services added later are included).
    """

    def __init__(
        self,
        address: str | int,
        containers: Containers,
        *,
        check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT,
        limits: ConnectionLimits = DEFAULT_HEALTH_LIMITS,
    ) -> None:
        self.address = parse_address(address)
        self._containers = containers
        self.check_timeout = check_timeout
        self.limits = limits
        self.stopping = False
        self._last_ready: bool | None = None
        self._sock: Any = None
        self._thread: concurrency.GreenThread | None = None
        self._connections: ConnectionGuard | None = None

    @property
    def containers(self) -> list[ServiceContainer]:
        source = self._containers
        return list(source() if callable(source) else source)

    @property
    def port(self) -> int:
        """The port bound (the configured one, or the one the OS picked for 0)."""
        if self._sock is None:
            raise RuntimeError("the health server is not listening")
        return self._sock.getsockname()[1]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._sock is not None:
            return
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # No SO_REUSEPORT: two processes on one port would split the probes
            # between them, each answering for its own services only.
            self._sock = concurrency.green_listen(
                (host, port), family=family, reuse_port=False
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve health checks on {HEALTH_SERVER_CONFIG_KEY}="
                f"{host}:{port}: {exc}"
            ) from exc
        metrics.enable()
        self.stopping = False
        self._connections = ConnectionGuard(self.limits, name="health")
        self._thread = concurrency.spawn(self._serve)
        log.info(
            "health server listening",
            extra={"address": host, "port": self.port},
        )

    def _serve(self) -> None:
        assert self._connections is not None
        concurrency.guarded_wsgi_server(
            self._sock,
            self.wsgi_app,
            self._connections,
            socket_timeout=self.limits.socket_timeout,
            log_output=False,
            debug=False,
        )

    def mark_stopping(self) -> None:
        """Report not ready from now on: the services are about to stop."""
        self.stopping = True

    def stop(self) -> None:
        """Close the socket and drop open connections; probes are cheap to repeat."""
        if self._thread is not None:
            concurrency.kill(self._thread)
            self._thread = None
        if self._connections is not None:
            self._connections.kill_all()
            self._connections = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    # -- answers ----------------------------------------------------------------------------

    def liveness(self) -> dict[str, Any]:
        return {
            "status": "live",
            "services": [container.service_name for container in self.containers],
        }

    def readiness(self) -> tuple[bool, list[CheckResult]]:
        """``(ready, results)``: every check of every container, run concurrently."""
        containers = self.containers
        results: list[CheckResult] = []
        pending = []
        for container in containers:
            service = container.service_name
            running, detail = self._container_state(container)
            results.append(
                CheckResult(
                    service, "started", type(container).__name__, running, detail
                )
            )
            for name, extension, check in extension_checks(container):
                thread = concurrency.spawn(_run_check, check, self.check_timeout)
                pending.append((service, name, type(extension).__name__, thread))
        for service, name, extension_type, thread in pending:
            ok, detail = thread.wait()
            results.append(CheckResult(service, name, extension_type, ok, detail))
        ready = bool(containers) and all(result.ok for result in results)
        return ready, results

    def _container_state(self, container: ServiceContainer) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not container.started:
            return False, "not started"
        failing = getattr(container, "failing_hooks", None)
        if failing:
            # The container keeps serving (a failing hook fails only its worker),
            # but a dependency that fails every worker must not look healthy.
            hooks = ", ".join(f"{hook} ({error})" for hook, error in failing.items())
            return False, f"running, but dependency hooks failing: {hooks}"
        return True, "running"

    # -- HTTP ---------------------------------------------------------------------------------

    def wsgi_app(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self._dispatch(request)
        except Exception as exc:
            correlation_id = str(uuid.uuid4())
            log_error(
                log,
                "health endpoint failed",
                exc,
                expected=False,
                correlation_id=correlation_id,
                fields={"path": request.path},
            )
            body = {
                "error": type(exc).__name__,
                "message": unexpected_error_message(exc, correlation_id),
                "correlation_id": correlation_id,
            }
            response = _json(body, 500)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        routes = {
            LIVE_PATH: self._live,
            READY_PATH: self._ready,
            METRICS_PATH: self._metrics,
        }
        handler = routes.get(request.path.rstrip("/") or "/")
        if handler is None:
            return _json(
                {"error": "NotFound", "paths": sorted(routes)},
                404,
            )
        if request.method not in ("GET", "HEAD"):
            response = _json({"error": "MethodNotAllowed"}, 405)
            response.headers["Allow"] = "GET, HEAD"
            return response
        return handler()

    def _live(self) -> Response:
        return _json(self.liveness(), 200)

    def _ready(self) -> Response:
        ready, results = self.readiness()
        # Logged on changes only: a probe every few seconds through an outage
        # would otherwise bury everything else.
        if ready != self._last_ready:
            self._last_ready = ready
            if ready:
                log.info("ready")
            else:
                failing = [
                    f"{r.service}.{r.check}: {r.detail}" for r in results if not r.ok
                ]
                log.warning("not ready", extra={"failing": failing or ["no services"]})
        body = {
            "status": "ready" if ready else "not ready",
            "checks": [result._asdict() for result in results],
        }
        return _json(body, 200 if ready else 503)

    def _metrics(self) -> Response:
        return Response(metrics.render(), status=200, content_type=metrics.CONTENT_TYPE)


def _json(body: Any, status: int) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")
