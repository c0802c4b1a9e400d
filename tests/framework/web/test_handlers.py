"""``framework.web.handlers``: ``@http`` routing, return conventions, errors, context.

Through real HTTP against a container in this process (see ``conftest.py``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import requests
from werkzeug.exceptions import Conflict
from werkzeug.wrappers import Request, Response

from framework.exceptions import BadRequest
from framework.extensions import DependencyProvider
from framework.web.handlers import HttpRequestHandler, http
from framework.web.server import json_error_response

TIMEOUT = 5


class ContextData(DependencyProvider):
    """Injects the worker's context data, so a handler can return it."""

    def get_dependency(self, worker_ctx: Any) -> dict[str, Any]:
        return dict(worker_ctx.data)


class NotAllowedToday(Exception):
    pass


class Unexpected(Exception):
    pass


# Stands for what an unexpected error may quote (SQL parameters, a hash). A
# constant, so that the source lines a logged traceback shows do not contain it.
INTERNAL_DETAIL = "the database is on fire"


class InvalidCoupon(BadRequest):
    pass


class Shop:
    name = "shop"

    context = ContextData()

    @http("GET", "/products/<int:product_id>")
    def get_product(self, request: Request, product_id: int) -> Any:
        return {"id": product_id, "id_type": type(product_id).__name__}

    @http("GET", "/files/<path:name>")
    def get_file(self, request: Request, name: str) -> Any:
        return name

    @http("PUT,POST", "/echo")
    def echo(self, request: Request) -> Any:
        return 201, {"X-Method": request.method}, request.get_data()

    @http("GET", "/text")
    def text(self, request: Request) -> Any:
        return "plain words"

    @http("GET", "/bytes")
    def raw_bytes(self, request: Request) -> Any:
        return b"\x00\x01\x02"

    @http("GET", "/list")
    def a_list(self, request: Request) -> Any:
        return [1, "two", None]

    @http("GET", "/status-and-body")
    def status_and_body(self, request: Request) -> Any:
        return 202, "accepted"

    @http("GET", "/csv")
    def csv(self, request: Request) -> Any:
        return 200, [("Content-Type", "text/csv")], "a,b\n1,2\n"

    @http("GET", "/response")
    def response(self, request: Request) -> Any:
        return Response("teapot", status=418, headers={"X-Custom": "yes"})

    @http("GET", "/nothing")
    def nothing(self, request: Request) -> Any:
        return None

    @http("GET", "/long-tuple")
    def long_tuple(self, request: Request) -> Any:
        return 200, {}, "body", "extra"

    @http("GET", "/expected", expected_exceptions=NotAllowedToday)
    def expected(self, request: Request) -> Any:
        raise NotAllowedToday("come back tomorrow")

    @http("GET", "/bad-request")
    def bad_request(self, request: Request) -> Any:
        raise InvalidCoupon("coupon WINTER has expired")

    @http("GET", "/unexpected")
    def unexpected(self, request: Request) -> Any:
        raise Unexpected(INTERNAL_DETAIL)

    @http("GET", "/conflict")
    def conflict(self, request: Request) -> Any:
        raise Conflict()

    @http("GET", "/orders/<int:order_id>")
    def forgets_the_path_value(self, request: Request) -> Any:
        return "never reached"

    @http("GET", "/context")
    def get_context(self, request: Request) -> Any:
        return self.context

    @http("POST", "/json")
    def post_json(self, request: Request) -> Any:
        return {"received": request.get_json()}


@pytest.fixture
def shop(run_service: Any) -> Any:
    return run_service(Shop)


def test_int_converter_passes_an_int_path_value(shop: Any) -> None:
    response = requests.get(shop.url("/products/42"), timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.json() == {"id": 42, "id_type": "int"}


def test_path_that_does_not_convert_is_not_found(shop: Any) -> None:
    response = requests.get(shop.url("/products/forty-two"), timeout=TIMEOUT)

    assert response.status_code == 404


def test_path_converter_takes_slashes(shop: Any) -> None:
    response = requests.get(shop.url("/files/docs/readme.md"), timeout=TIMEOUT)

    assert response.text == "docs/readme.md"


def test_unknown_url_is_a_werkzeug_404(shop: Any) -> None:
    response = requests.get(shop.url("/nowhere"), timeout=TIMEOUT)

    assert response.status_code == 404
    assert "Not Found" in response.text


def test_method_not_routed_is_a_405_listing_the_allowed_ones(shop: Any) -> None:
    response = requests.delete(shop.url("/echo"), timeout=TIMEOUT)

    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"PUT", "POST"}


def test_comma_separated_methods_all_reach_the_handler(shop: Any) -> None:
    put = requests.put(shop.url("/echo"), data=b"one", timeout=TIMEOUT)
    post = requests.post(shop.url("/echo"), data=b"two", timeout=TIMEOUT)

    assert (put.headers["X-Method"], put.content) == ("PUT", b"one")
    assert (post.headers["X-Method"], post.content) == ("POST", b"two")


def test_get_rule_also_answers_head(shop: Any) -> None:
    response = requests.head(shop.url("/text"), timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.content == b""


def test_str_body_is_utf8_plain_text(shop: Any) -> None:
    response = requests.get(shop.url("/text"), timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == "plain words"


def test_bytes_body_is_octet_stream(shop: Any) -> None:
    response = requests.get(shop.url("/bytes"), timeout=TIMEOUT)

    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.content == b"\x00\x01\x02"


def test_dict_body_is_json(shop: Any) -> None:
    response = requests.get(shop.url("/products/1"), timeout=TIMEOUT)

    assert response.headers["Content-Type"] == "application/json"


def test_list_body_is_json(shop: Any) -> None:
    response = requests.get(shop.url("/list"), timeout=TIMEOUT)

    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == [1, "two", None]


def test_status_and_body_tuple_sets_the_status(shop: Any) -> None:
    response = requests.get(shop.url("/status-and-body"), timeout=TIMEOUT)

    assert (response.status_code, response.text) == (202, "accepted")


def test_status_headers_body_tuple_sets_headers_and_keeps_their_content_type(
    shop: Any,
) -> None:
    response = requests.get(shop.url("/csv"), timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/csv"
    assert response.text == "a,b\n1,2\n"


def test_werkzeug_response_is_sent_as_it_is(shop: Any) -> None:
    response = requests.get(shop.url("/response"), timeout=TIMEOUT)

    assert response.status_code == 418
    assert response.headers["X-Custom"] == "yes"
    assert response.text == "teapot"


@pytest.mark.parametrize("path", ["/nothing", "/long-tuple"])
def test_result_that_is_not_a_response_is_a_500_type_error(
    shop: Any, path: str
) -> None:
    response = requests.get(shop.url(path), timeout=TIMEOUT)

    assert response.status_code == 500
    assert response.json()["error"] == "TypeError"


def test_expected_exception_is_a_400_with_a_json_body(shop: Any) -> None:
    response = requests.get(shop.url("/expected"), timeout=TIMEOUT)

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "error": "NotAllowedToday",
        "message": "come back tomorrow",
    }


def test_bad_request_subclass_is_a_400(shop: Any) -> None:
    response = requests.get(shop.url("/bad-request"), timeout=TIMEOUT)

    assert response.status_code == 400
    assert response.json() == {
        "error": "InvalidCoupon",
        "message": "coupon WINTER has expired",
    }


def test_unexpected_exception_is_a_500_with_its_type_and_a_correlation_id_not_its_text(
    shop: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        response = requests.get(shop.url("/unexpected"), timeout=TIMEOUT)

    assert response.status_code == 500
    body = response.json()
    correlation_id = body["correlation_id"]
    assert body == {
        "error": "Unexpected",
        "message": f"unexpected Unexpected (correlation id {correlation_id}; "
        "details in the service's log)",
        "correlation_id": correlation_id,
    }
    assert "Traceback" not in response.text
    # The operator finds the failure in the log under that id, without the text.
    logged = [
        record
        for record in caplog.records
        if getattr(record, "correlation_id", None) == correlation_id
    ]
    assert logged
    assert INTERNAL_DETAIL not in caplog.text
    assert INTERNAL_DETAIL not in response.text


def test_a_failure_before_the_worker_starts_is_a_generic_500_too(
    run_service: Any,
) -> None:
    class LeakyHandler(HttpRequestHandler):
        def context_data_from_headers(self, request: Request) -> dict[str, Any]:
            raise RuntimeError("token=hunter2 rejected by the vault")

    class Leaky:
        name = "leaky"

        @LeakyHandler.decorator("GET", "/x")
        def x(self, request: Request) -> Any:
            return "never reached"

    service = run_service(Leaky)

    response = requests.get(service.url("/x"), timeout=TIMEOUT)

    assert response.status_code == 500
    assert response.json()["error"] == "RuntimeError"
    assert response.json()["correlation_id"] in response.json()["message"]
    assert "hunter2" not in response.text


def test_http_exception_raised_by_the_method_keeps_its_status(shop: Any) -> None:
    response = requests.get(shop.url("/conflict"), timeout=TIMEOUT)

    assert response.status_code == 409


def test_method_not_accepting_the_path_values_is_a_400_incorrect_signature(
    shop: Any,
) -> None:
    response = requests.get(shop.url("/orders/7"), timeout=TIMEOUT)

    assert response.status_code == 400
    assert response.json()["error"] == "IncorrectSignature"


def test_request_body_reaches_the_handler(shop: Any) -> None:
    response = requests.post(shop.url("/json"), json={"sku": "A1"}, timeout=TIMEOUT)

    assert response.json() == {"received": {"sku": "A1"}}


def test_chunked_request_body_reaches_the_handler(shop: Any) -> None:
    chunks = iter([b"first,", b"second"])

    response = requests.put(shop.url("/echo"), data=chunks, timeout=TIMEOUT)

    assert response.content == b"first,second"


def test_default_headers_become_context_data_but_authorization_does_not(
    shop: Any,
) -> None:
    headers = {
        "X-Request-Id": "req-1",
        "Accept-Language": "fr-FR",
        "User-Agent": "tests/1.0",
        "Authorization": "Bearer secret",
    }

    response = requests.get(shop.url("/context"), headers=headers, timeout=TIMEOUT)

    assert response.json() == {
        "request_id": "req-1",
        "language": "fr-FR",
        "user_agent": "tests/1.0",
    }


def test_configured_header_mapping_replaces_the_default(run_service: Any) -> None:
    service = run_service(Shop, {"HTTP_CONTEXT_HEADERS": {"X-Tenant": "tenant_id"}})
    headers = {"X-Tenant": "acme", "X-Request-Id": "req-2"}

    response = requests.get(service.url("/context"), headers=headers, timeout=TIMEOUT)

    assert response.json() == {"tenant_id": "acme"}


class AuthenticatedHttp(HttpRequestHandler):
    def context_data_from_headers(self, request: Request) -> dict[str, Any]:
        data = super().context_data_from_headers(request)
        if request.headers.get("Authorization") == "Bearer valid":
            data["user_id"] = "user-7"
        return data


class Account:
    name = "account"

    context = ContextData()

    @AuthenticatedHttp.decorator("GET", "/me")
    def me(self, request: Request) -> Any:
        return self.context


def test_context_data_from_headers_can_be_overridden(run_service: Any) -> None:
    service = run_service(Account)

    response = requests.get(
        service.url("/me"),
        headers={"Authorization": "Bearer valid", "User-Agent": "tests/1.0"},
        timeout=TIMEOUT,
    )

    assert response.json() == {"user_agent": "tests/1.0", "user_id": "user-7"}


def test_json_error_body_is_valid_json_for_any_message() -> None:
    message = 'say "no"\n\\ to \u2603'

    response = json_error_response(NotAllowedToday(message), 400, expected=True)

    assert json.loads(response.get_data())["message"] == message


def test_an_override_of_response_from_exception_without_correlation_id_still_works(
    run_service: Any,
) -> None:
    class Teapot(HttpRequestHandler):
        def response_from_exception(self, exc: BaseException) -> Response:
            return Response(type(exc).__name__, status=418)

    class Kettle:
        name = "kettle"

        @Teapot.decorator("GET", "/boil")
        def boil(self, request: Request) -> Any:
            raise Unexpected(INTERNAL_DETAIL)

    service = run_service(Kettle)

    response = requests.get(service.url("/boil"), timeout=TIMEOUT)

    assert (response.status_code, response.text) == (418, "Unexpected")
