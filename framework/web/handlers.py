"""``@http``: serve a URL with a service method.

::

    class Catalogue:
        name = "catalogue"

        @http("GET", "/products/<int:product_id>", expected_exceptions=NotFound)
        def get_product(self, request, product_id):
            return {"id": product_id}                     # 200, application/json

        @http("POST,PUT", "/products")
        def save_product(self, request):
            return 201, {"Location": "/products/7"}, ""   # status, headers, body

The method gets the werkzeug ``Request`` and the URL's path values as keyword
arguments. What it returns becomes the response:

* a werkzeug ``Response``: sent as it is;
* ``(status, headers, body)`` or ``(status, body)``; anything else is the body, 200;
* a ``str`` body is ``text/plain; charset=utf-8``; ``bytes`` is
  ``application/octet-stream`` (nameko: a 500); a ``dict`` or ``list`` is encoded as
  JSON, ``application/json`` (nameko: a 500). A ``Content-Type`` in the headers wins.
  Any other body (``None`` included) is a ``TypeError``, so a 500.

Errors: an exception listed in ``expected_exceptions``, or a ``BadRequest`` (a call
that does not fit the method's signature is an ``IncorrectSignature``, one), is a 400;
a werkzeug ``HTTPException`` raised by the method is rendered by werkzeug with its
own status; anything else is a 500. The body is JSON,
``{"error": "<exception type>", "message": "<its text>"}``, never a traceback
(nameko sends ``text/plain`` ``Error: <type>: <text>``). The text of an unexpected
exception (a 500) may hold anything, a SQL statement's parameters included, so it
stays in the service's log: the body says ``"unexpected <type> (correlation id
<id>; ...)"`` and carries ``"correlation_id"``, the worker's call id, under which
the error log has the details. Routing errors (404, 405) and a body over
``WEB_MAX_CONTENT_LENGTH`` (413) are rendered by werkzeug.

Context data (language, request id...) comes from the request headers named in
``HTTP_CONTEXT_HEADERS``; override ``context_data_from_headers`` for more. The
``Authorization`` header is deliberately not mapped: context data is copied into the
headers of every RPC and event the worker sends, and into logs, so a raw credential
would travel the whole system. Verify it at the edge instead, e.g. in an override
that puts the caller's ``user_id`` into the context.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from framework import concurrency
from framework.exceptions import BadRequest, ContainerBeingKilled, is_expected
from framework.extensions import Entrypoint
from framework.logs import log_error, log_worker_error
from framework.web.server import (
    WebServer,
    context_data_from_headers,
    json_error_response,
    new_correlation_id,
)

if TYPE_CHECKING:
    from framework.containers import ExcInfo, WorkerContext

log = logging.getLogger(__name__)


class HttpRequestHandler(Entrypoint):
    """Serves one werkzeug URL rule, for one or more comma-separated methods."""

    server = WebServer()

    def __init__(
        self,
        method: str,
        url: str,
        expected_exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
        sensitive_arguments: str | tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        self.method = method
        self.url = url
        super().__init__(
            expected_exceptions=expected_exceptions,
            sensitive_arguments=sensitive_arguments,
            **kwargs,
        )

    @property
    def methods(self) -> list[str]:
        return [m.strip().upper() for m in self.method.split(",") if m.strip()]

    def setup(self) -> None:
        self.server.register_provider(self)
        # Overrides written before the correlation id existed take `exc` only.
        self._response_takes_correlation_id = (
            "correlation_id"
            in inspect.signature(self.response_from_exception).parameters
        )

    def stop(self) -> None:
        self.server.stop_accepting()
        self.server.unregister_provider(self)

    def kill(self) -> None:
        self.server.unregister_provider(self)

    def get_url_rule(self) -> Rule:
        # werkzeug adds HEAD to every GET rule.
        return Rule(self.url, methods=self.methods, endpoint=self)

    def context_data_from_headers(self, request: Request) -> dict[str, Any]:
        """Context data for the worker; override to add to or replace the mapping."""
        return context_data_from_headers(request, self.container.config)

    def handle_request(self, request: Request) -> Response:
        """Run the method in a worker and wait, in this connection's thread, for it."""
        args = (request,)
        kwargs = dict(getattr(request, "path_values", {}))
        try:
            context_data = self.context_data_from_headers(request)
            self.check_signature(args, kwargs)
            done = concurrency.Event()
            self.container.spawn_worker(
                self,
                args,
                kwargs,
                context_data=context_data,
                handle_result=partial(self._handle_result, done),
            )
            return done.wait()
        except Exception as exc:
            # No worker ran, so no call id: this failure gets an id of its own.
            correlation_id = new_correlation_id()
            if not self._is_expected(exc):
                log_error(
                    log,
                    "could not start an HTTP worker",
                    exc,
                    expected=False,
                    correlation_id=correlation_id,
                    fields={
                        "service": self.container.service_name,
                        "entrypoint": self.method_name,
                    },
                )
            return self._response_from_exception(exc, correlation_id)

    def _handle_result(
        self,
        done: concurrency.Event,
        worker_ctx: WorkerContext,
        result: Any,
        exc_info: ExcInfo | None,
    ) -> tuple[Any, ExcInfo | None]:
        # Converting here, in the worker, makes a result that cannot become a
        # response a failure of the worker, which dependency providers then see.
        response: Response | None = None
        try:
            if exc_info is None:
                try:
                    response = self.response_from_result(result)
                except Exception as exc:
                    # Logged as the worker's failure: type, call id and frames.
                    log_worker_error(log, worker_ctx, exc)
                    exc_info = (type(exc), exc, exc.__traceback__)
            if exc_info is not None:
                response = self._response_from_exception(
                    exc_info[1], worker_ctx.call_id
                )
        finally:
            # Whatever happened above, the connection waiting for us gets an answer.
            if response is None:
                response = json_error_response(
                    RuntimeError(),
                    500,
                    expected=False,
                    correlation_id=worker_ctx.call_id,
                )
            done.send(response)
        return result, exc_info

    def response_from_result(self, result: Any) -> Response:
        if isinstance(result, Response):
            return result
        status: int | str = 200
        headers: Any = None
        body = result
        if isinstance(result, tuple):
            if len(result) == 3:
                status, headers, body = result
            elif len(result) == 2:
                status, body = result
            else:
                raise TypeError(
                    "An HTTP handler returns a body, (status, body) or "
                    f"(status, headers, body); got a tuple of {len(result)}"
                )
        return make_response(body, status, headers)

    def response_from_exception(
        self, exc: BaseException, correlation_id: str | None = None
    ) -> Response:
        """The response for a failure; ``correlation_id`` names an unexpected one
        (the worker's call id). An override may leave ``correlation_id`` out."""
        if isinstance(exc, HTTPException):
            return exc.get_response()
        if isinstance(exc, ContainerBeingKilled):
            return json_error_response(exc, 503, expected=True)
        expected = self.expected_exceptions
        if isinstance(exc, BadRequest) or (expected and isinstance(exc, expected)):
            return json_error_response(exc, 400, expected=True)
        return json_error_response(
            exc, 500, expected=False, correlation_id=correlation_id
        )

    def _response_from_exception(
        self, exc: BaseException, correlation_id: str
    ) -> Response:
        if getattr(self, "_response_takes_correlation_id", True):
            return self.response_from_exception(exc, correlation_id=correlation_id)
        return self.response_from_exception(exc)

    def _is_expected(self, exc: BaseException) -> bool:
        return isinstance(exc, HTTPException | ContainerBeingKilled) or is_expected(
            exc, self.expected_exceptions
        )


def make_response(body: Any, status: int | str = 200, headers: Any = None) -> Response:
    """A ``Response`` from a handler's body, following the conventions above."""
    if isinstance(body, str):
        content_type = "text/plain; charset=utf-8"
    elif isinstance(body, bytes | bytearray):
        content_type = "application/octet-stream"
    elif isinstance(body, dict | list):
        body = json.dumps(body)
        content_type = "application/json"
    else:
        raise TypeError(
            "An HTTP handler's body must be str, bytes, dict or list, "
            f"not {type(body).__name__}"
        )
    if not headers:
        # The common case, built without a lookup: werkzeug's `in` on headers
        # raises and catches a KeyError for a missing name.
        return Response(body, status=status, headers=[("Content-Type", content_type)])
    headers = Headers(headers.items() if isinstance(headers, Mapping) else headers)
    if "Content-Type" not in headers:
        headers["Content-Type"] = content_type
    return Response(body, status=status, headers=headers)


http = HttpRequestHandler.decorator
