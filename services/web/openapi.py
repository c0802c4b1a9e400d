"""The OpenAPI 3.1 document of the JSON API, generated from what is served.

Every ``route`` under ``/api/`` describes itself (summary, body, query and response
models, status); the JSON Schemas come from the pydantic models in ``schemas.py``
(and the ones the other services publish), so the document cannot drift from the
validation the routes do.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.web.schemas import Problem

REF_TEMPLATE = "#/components/schemas/{model}"
_VARIABLE = re.compile(r"<(?:(?P<converter>[a-z]+)(?:\([^)]*\))?:)?(?P<name>\w+)>")

ERROR_STATUSES = {
    "400": "Malformed request",
    "401": "No valid bearer token (or wrong credentials)",
    "403": "Not allowed for this user",
    "404": "Not found (or not yours)",
    "409": "Conflicts with the current state",
    "413": "Body too large",
    "422": "Invalid input; `errors` says why, field by field",
    "429": "Too many failed logins; see Retry-After",
    "503": "A service did not answer",
}


def openapi_path(url: str) -> tuple[str, list[dict[str, Any]]]:
    """A werkzeug rule → the OpenAPI path and its path parameters."""
    parameters = []

    def replace(match: re.Match[str]) -> str:
        integer = match.group("converter") == "int"
        parameters.append(
            {
                "name": match.group("name"),
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 0}
                if integer
                else {"type": "string", "pattern": "^[^/]+$"},
            }
        )
        return "{" + match.group("name") + "}"

    return _VARIABLE.sub(replace, url), parameters


def build_document(
    routes: list[Any], title: str = "Web API", version: str = "1"
) -> dict[str, Any]:
    api_routes = [route for route in routes if route.api]
    models: set[type[BaseModel]] = {Problem}
    for route in api_routes:
        for model in (route.body, route.query, route.response):
            if isinstance(model, type) and issubclass(model, BaseModel):
                models.add(model)
    ordered = sorted(models, key=lambda m: m.__name__)
    keys, top = models_json_schema(
        [(model, "validation") for model in ordered], ref_template=REF_TEMPLATE
    )
    components = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return keys[(model, "validation")]

    paths: dict[str, dict[str, Any]] = {}
    for route in api_routes:
        path, parameters = openapi_path(route.url)
        if route.query is not None:
            for name, field in route.query.model_fields.items():
                schema = components[route.query.__name__]["properties"][name]
                parameters.append(
                    {
                        "name": name,
                        "in": "query",
                        "required": field.is_required(),
                        "schema": schema,
                    }
                )
        responses: dict[str, Any] = {}
        success = str(route.status)
        if route.status == 204:
            responses[success] = {"description": "Done"}
        elif route.raw_body and route.method == "GET":
            responses[success] = {
                "description": "The file",
                "content": {
                    route.raw_body: {"schema": {"type": "string", "format": "binary"}}
                },
            }
        elif route.response is not None:
            responses[success] = {
                "description": "Success",
                "content": {"application/json": {"schema": ref(route.response)}},
            }
        else:
            responses[success] = {"description": "Success"}
        for status, description in ERROR_STATUSES.items():
            responses[status] = {
                "description": description,
                "content": {"application/problem+json": {"schema": ref(Problem)}},
            }
        operation: dict[str, Any] = {
            "operationId": route.method_name,
            "summary": route.summary or route.method_name,
            "tags": [route.tag or "api"],
            "parameters": parameters,
            "responses": responses,
        }
        if route.access != "public":
            operation["security"] = [{"bearer": []}]
        else:
            operation["security"] = []
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.body)}},
            }
        elif route.raw_body and route.method != "GET":
            operation["requestBody"] = {
                "required": True,
                "content": {
                    route.raw_body: {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {"type": "string", "format": "binary"}
                            },
                            "required": ["file"],
                        }
                    },
                },
            }
        for method in route.methods:
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Bearer tokens come from POST /api/v1/tokens; errors are "
            "application/problem+json (RFC 9457).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
