"""Static files, the OpenAPI document and its docs page."""

from __future__ import annotations

from typing import Any

from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.utils import send_from_directory
from werkzeug.wrappers import Request, Response

from services.web.exceptions import NotFound
from services.web.http import MEMBER, PUBLIC, STATIC, json_response, render, route
from services.web.openapi import build_document

STATIC_MAX_AGE = 3600


class DocsRoutes:
    routes: Any

    @route("GET", "/static/<path:filename>", access=PUBLIC)
    def static_file(self, request: Request, filename: str) -> Response:
        try:
            response = send_from_directory(
                STATIC, filename, request.environ, max_age=STATIC_MAX_AGE
            )
        except WerkzeugNotFound:
            raise NotFound("no such file") from None
        response.headers["Cache-Control"] = f"public, max-age={STATIC_MAX_AGE}"
        return response

    @route("GET", "/api/v1/openapi.json", summary="This document", tag="docs")
    def api_openapi(self, request: Request) -> Response:
        return json_response(build_document(self.routes))

    @route("GET", "/docs/openapi.json", access=MEMBER)
    def openapi_download(self, request: Request) -> Response:
        return json_response(build_document(self.routes))

    @route("GET", "/docs", access=MEMBER)
    def docs_page(self, request: Request) -> Response:
        document = build_document(self.routes)
        operations = [
            {"path": path, "method": method.upper(), **operation}
            for path, methods in document["paths"].items()
            for method, operation in methods.items()
        ]
        return render(request, "docs.html", document=document, operations=operations)
