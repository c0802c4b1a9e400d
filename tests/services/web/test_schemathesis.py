"""A property-based run of schemathesis against the served ``openapi.json``, with an
admin's bearer token: no request it generates may get a 5xx, and every response
must match the schema the document declares for it.

Bounded so it stays cheap in CI: a few examples per operation, generation only
(no shrinking), no deadline.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from .conftest import App

EXAMPLES_PER_OPERATION = 8
CHECKS = [not_a_server_error, response_schema_conformance]


def test_generated_requests_get_no_5xx_and_match_the_schemas(app: App) -> None:
    token = app.token()
    api = app.api(token)
    document = api.get("/api/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/api/v1/tokens":
            # Wrong passwords would throttle the admin account for the rest.
            continue

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            phases=[Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call(base_url=app.base_url, headers=headers, timeout=20)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:  # collected, so one run reports every operation
                failures.append(f"{case.method} {case.path}: {exc}")

        run()
        checked += 1
    assert checked >= 20
    assert not failures, "\n\n".join(failures[:5])
