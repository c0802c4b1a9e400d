"""fit_headers: what a republished message keeps of its headers (no broker)."""

from __future__ import annotations

from framework.amqp.frames import DEFAULT_FRAME_MAX, fit_headers, properties_size


def nested(depth: int) -> dict:
    table: dict = {}
    for _ in range(depth):
        table = {"a": table}
    return table


def test_headers_that_fit_are_kept_as_they_are():
    headers = {"nameko.call_id_stack": ["a.b.c"], "x": 1}
    assert fit_headers(headers, {"content_type": "application/json"}) is headers


def test_the_largest_headers_go_first_and_protected_ones_stay():
    headers = {
        "x-dead-letter-reason": "undecodable (JSONDecodeError)",
        "big": "x" * DEFAULT_FRAME_MAX,
        "medium": "y" * 1000,
        "small": 1,
    }
    kept = fit_headers(headers, {}, protected=("x-dead-letter-reason",))
    assert kept == {
        "x-dead-letter-reason": "undecodable (JSONDecodeError)",
        "medium": "y" * 1000,
        "small": 1,
        "x-dropped-headers": ["big"],
    }
    assert properties_size({"application_headers": kept}) < DEFAULT_FRAME_MAX


def test_a_header_too_deep_to_encode_again_is_dropped():
    kept = fit_headers({"deep": nested(5000), "ok": "yes"}, {})
    assert kept == {"ok": "yes", "x-dropped-headers": ["deep"]}
