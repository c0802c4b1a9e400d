"""How the web service serves HTTP: its server, its route entrypoint, its pages.

Built on ``framework.web`` without changing it:

* ``EdgeServer`` (a ``WebServer``) serves an ``EdgeWsgiApp`` that adds the security
  headers to every response (errors and static files included), answers routing
  errors as problem+json under ``/api/`` and as pages elsewhere, and leaves the
  body of upload routes unread so the route streams it into storage instead of
  the framework buffering it whole in memory.
* ``route(method, url, access=...)`` is ``@http`` plus authorization, done in the
  connection's thread before a worker is spent on the request: the API takes only
  ``Authorization: Bearer`` tokens (never cookies, so no CSRF is possible there);
  the panel takes only the session cookie and checks the CSRF token of every
  state-changing request. The worker finds the caller in ``request.principal``.
* The websocket server and hub are subclassed only to live on ``EdgeServer`` (the
  framework's shared extensions are one per class) and to refuse upgrades
  without a live session.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request, Response

from framework.web.handlers import HttpRequestHandler
from framework.web.server import WebServer, WsgiApp
from framework.web.websocket import (
    WebSocketHub,
    WebSocketHubProvider,
    WebSocketRpc,
    WebSocketServer,
)
from services.web.dependencies import Principal, Settings, find_edge_state
from services.web.exceptions import (
    EXPECTED_EXCEPTIONS,
    BadRequest,
    CsrfFailed,
    Forbidden,
    NotAuthenticated,
    Problem,
    problem_for,
)

log = logging.getLogger(__name__)

PUBLIC = "public"
MEMBER = "member"
ADMIN = "admin"
ACCESS_LEVELS = (PUBLIC, MEMBER, ADMIN)

API_PREFIX = "/api/"
SESSION_COOKIE = "web_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# The websocket's context carries the session's public handle, never its cookie,
# and whose it is (to close a user's sockets when their rights change).
SESSION_CONTEXT_KEY = "web_session_id"
USER_CONTEXT_KEY = "web_user_id"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# No inline script or style anywhere: every script is a file under /static.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    # Compiled once per process: the templates ship with the code, so checking
    # each file's modification time on every page would buy nothing.
    auto_reload=False,
)


def is_api(path: str) -> bool:
    return path.startswith(API_PREFIX)


# -- responses --------------------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: Any = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers, mimetype="application/json"
    )


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    return Response(
        json.dumps(problem.body(instance)),
        status=problem.status,
        headers=problem.headers,
        content_type="application/problem+json",
    )


def render(
    request: Request | None, template: str, status: int = 200, **context: Any
) -> Response:
    """A page: ``template`` rendered with the caller and their CSRF token."""
    principal = getattr(request, "principal", None) if request is not None else None
    html = templates.get_template(template).render(
        principal=principal,
        csrf_token=principal.csrf_token if principal is not None else "",
        path=request.path if request is not None else "",
        **context,
    )
    return Response(html, status=status, mimetype="text/html")


def error_page(problem: Problem, request: Request | None = None) -> Response:
    response = render(request, "error.html", status=problem.status, problem=problem)
    response.headers.extend(problem.headers)
    return response


def redirect(location: str, status: int = 303) -> Response:
    return Response("", status=status, headers={"Location": location})


def safe_next(target: str | None, default: str = "/") -> str:
    """Where to go after login: only a path on this site, never elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    if "\\" in target or any(ord(ch) < 32 for ch in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def login_redirect(request: Request) -> Response:
    target = request.full_path.rstrip("?") if request.method == "GET" else "/"
    return redirect("/login?next=" + quote(target, safe="/"))


def error_response(request: Request, exc: BaseException) -> Response:
    problem = problem_for(exc)
    if problem.status >= 500 and not isinstance(exc, HTTPException):
        # The type only: an unexpected error's text may quote data (SQL parameters).
        log.error(
            "unexpected error",
            extra={"path": request.path, "error_type": type(exc).__name__},
        )
    if is_api(request.path) or wants_json(request):
        return problem_response(problem, request.path)
    if isinstance(exc, NotAuthenticated):
        return login_redirect(request)
    return error_page(problem, request)


# -- the server -----------------------------------------------------------------------


class EdgeWsgiApp(WsgiApp):
    server: EdgeServer

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        def start_with_headers(status: str, headers: list, exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            headers.extend(
                (name, value)
                for name, value in SECURITY_HEADERS
                if name.lower() not in present
            )
            if "cache-control" not in present:
                headers.append(("Cache-Control", "no-store"))
            return start_response(status, headers, exc_info)

        return super().__call__(environ, start_with_headers)

    def dispatch(self, request: Request) -> Any:
        try:
            return super().dispatch(request)
        except HTTPException as exc:
            if exc.code in (408, 413):
                # The rest of the body is still on the wire: the connection
                # cannot carry another request.
                close = request.environ.get("framework.close_connection")
                if close is not None:
                    close()
            return error_response(request, exc)

    def read_body(self, request: Request) -> None:
        limit = self.server.streaming_paths.get(request.path)
        if limit is not None:
            # The route streams it; werkzeug's stream stops at this limit.
            request.max_content_length = limit
            return
        super().read_body(request)


class EdgeServer(WebServer):
    """The container's web server, serving ``EdgeWsgiApp``."""

    def __init__(self) -> None:
        super().__init__()
        self.streaming_paths: dict[str, int] = {}

    def get_wsgi_app(self) -> Any:
        return EdgeWsgiApp(self)


# -- routes ---------------------------------------------------------------------------


class Route(HttpRequestHandler):
    """``@route("GET", "/path", access=MEMBER)``: an authorized HTTP route.

    API routes (under ``/api/``) also describe themselves for the OpenAPI document:
    ``summary``, ``body`` (a pydantic model of the JSON body), ``query`` (a
    pydantic model of the query string), ``response`` (the model of a success) and
    ``status`` (its code).
    """

    server = EdgeServer()

    def __init__(
        self,
        method: str,
        url: str,
        access: str = MEMBER,
        summary: str = "",
        body: Any = None,
        query: Any = None,
        response: Any = None,
        status: int = 200,
        streaming: bool = False,
        raw_body: str | None = None,
        tag: str | None = None,
        json_errors: bool = False,
        **kwargs: Any,
    ) -> None:
        if access not in ACCESS_LEVELS:
            raise ValueError(f"access must be one of {ACCESS_LEVELS}, not {access!r}")
        self.access = access
        self.summary = summary
        self.body = body
        self.query = query
        self.response = response
        self.status = status
        self.streaming = streaming
        self.raw_body = raw_body
        self.tag = tag
        # A panel route called by our scripts: errors as problem+json, not pages.
        self.json_errors = json_errors
        kwargs.setdefault("expected_exceptions", EXPECTED_EXCEPTIONS)
        super().__init__(method, url, **kwargs)

    @property
    def api(self) -> bool:
        return is_api(self.url)

    def setup(self) -> None:
        super().setup()
        if self.streaming:
            settings = Settings.from_config(self.container.config)
            self.server.streaming_paths[self.url] = settings.upload_max_bytes

    def handle_request(self, request: Request) -> Response:
        try:
            request.principal = self.authorize(request)  # type: ignore[attr-defined]
        except Exception as exc:
            return error_response(request, exc)
        response = super().handle_request(request)
        problem = getattr(response, "problem", None)
        if problem is not None and request.principal is not None:  # type: ignore[attr-defined]
            # The worker's error page knew nothing of the caller: again, with
            # the navigation of their pages.
            response = error_page(problem, request)
        return response

    def authorize(self, request: Request) -> Principal | None:
        state = find_edge_state(self.container)
        if self.api:
            # Bearer tokens only: a cookie the browser adds on its own is never
            # taken as the caller's consent here.
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            principal = (
                state.token_principal(token.strip())
                if scheme.lower() == "bearer"
                else None
            )
        else:
            principal = state.session_principal(request.cookies.get(SESSION_COOKIE))
        if self.access == PUBLIC:
            return principal
        if principal is None:
            raise NotAuthenticated("log in, or send a valid bearer token")
        if self.access == ADMIN and not principal.is_admin:
            raise Forbidden("this needs an administrator")
        if not self.api and request.method not in SAFE_METHODS:
            check_csrf(request, principal.csrf_token)
        return principal

    def response_from_exception(
        self, exc: BaseException, correlation_id: str | None = None
    ) -> Response:
        problem = problem_for(exc)
        if problem.status >= 500 and correlation_id:
            problem.detail += f" (reference {correlation_id})"
        if problem.status >= 500 and not isinstance(exc, HTTPException):
            # The type only: an unexpected error's text may quote data.
            log.error(
                "unexpected error",
                extra={"url": self.url, "error_type": type(exc).__name__},
            )
        if self.api or self.json_errors:
            return problem_response(problem)
        if isinstance(exc, NotAuthenticated):
            return redirect("/login")
        response = error_page(problem)
        response.problem = problem  # type: ignore[attr-defined]
        return response


def check_csrf(request: Request, expected: str | None) -> None:
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD) or ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise CsrfFailed(
            "the form is out of date or was not sent by this site; reload the page"
        )


route = Route.decorator


# -- websockets -----------------------------------------------------------------------


class EdgeSocketServer(WebSocketServer):
    server = EdgeServer()

    def handle_request(self, request: Request) -> Any:
        state = find_edge_state(self.container)
        if state.session_principal(request.cookies.get(SESSION_COOKIE)) is None:
            return Response("log in first", status=401, mimetype="text/plain")
        return super().handle_request(request)

    def context_data_from_headers(self, request: Request) -> dict[str, Any]:
        data = super().context_data_from_headers(request)
        principal = find_edge_state(self.container).session_principal(
            request.cookies.get(SESSION_COOKIE)
        )
        if principal is not None:
            data[SESSION_CONTEXT_KEY] = principal.session_id
            data[USER_CONTEXT_KEY] = principal.user_id
        return data


class EdgeSocketRpc(WebSocketRpc):
    server = EdgeSocketServer()


class EdgeSocketHub(WebSocketHub):
    """The framework's hub, plus closing the sockets of a user or a session."""

    def __init__(self, server: WebSocketServer) -> None:
        super().__init__(server)
        self._sockets = server

    def close_sockets(
        self, user_id: int | None = None, session_id: str | None = None
    ) -> int:
        """Close this replica's sockets of the user (or the session); their pages
        reconnect, and are authorized again, with the rights they have now."""
        closed = 0
        for info in list(self._sockets.sockets.values()):
            context = info.data.context_data
            if (user_id is not None and context.get(USER_CONTEXT_KEY) == user_id) or (
                session_id is not None
                and context.get(SESSION_CONTEXT_KEY) == session_id
            ):
                info.socket.close()
                closed += 1
        return closed


class EdgeHub(WebSocketHubProvider):
    server = EdgeSocketServer()

    def setup(self) -> None:
        self.hub = EdgeSocketHub(self.server)


socket_rpc = EdgeSocketRpc.decorator


# -- request parsing --------------------------------------------------------------------


def parse_json(request: Request, model: Any) -> Any:
    """The JSON body validated by ``model`` (422 listing every bad field)."""
    if request.mimetype != "application/json":
        raise BadRequest("send a JSON body (Content-Type: application/json)")
    try:
        data = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return model.model_validate(data)


def parse_args(request: Request, model: Any, ignore: tuple[str, ...] = ()) -> Any:
    """The query string validated by ``model``; a repeated key counts once (the
    last); keys in ``ignore`` are for the page, not the model."""
    return model.model_validate(
        {
            key: request.args.getlist(key)[-1]
            for key in request.args
            if key not in ignore
        }
    )


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")
