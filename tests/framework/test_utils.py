"""``framework.utils``: argument redaction for logs and listings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from framework.utils import REDACTED, get_redacted_args


class Service:
    def method(self, a: Any, b: Any, *rest: Any, **options: Any) -> None:
        pass


def entrypoint(sensitive: str | tuple[str, ...]) -> Any:
    return SimpleNamespace(
        container=SimpleNamespace(service_cls=Service),
        method_name="method",
        sensitive_arguments=sensitive,
    )


@pytest.mark.parametrize(
    ("path", "b", "redacted"),
    [
        ("b.x[0]", {"x": ["s", "t"]}, {"x": [REDACTED, "t"]}),
        ("b.x[0]", {"x": ("s", "t")}, {"x": [REDACTED, "t"]}),
        ("b[1]", ["p", "s"], ["p", REDACTED]),
        ("b[1].p", [{}, {"p": "s", "q": 1}], [{}, {"p": REDACTED, "q": 1}]),
        ("b.x[0].y", {"x": [{"y": "s"}]}, {"x": [{"y": REDACTED}]}),
        ("b.x.1", {"x": ["p", "s"]}, {"x": ["p", REDACTED]}),
        ("b", b"s", REDACTED),
        # paths that match nothing change nothing
        ("b.x[5]", {"x": ["p"]}, {"x": ["p"]}),
        ("b.x[0]", {"x": "sss"}, {"x": "sss"}),
        ("b.y", {"x": 1}, {"x": 1}),
    ],
)
def test_sensitive_paths_with_keys_and_indexes_are_redacted(
    path: str, b: Any, redacted: Any
) -> None:
    assert get_redacted_args(entrypoint(path), 1, b) == {"a": 1, "b": redacted}


def test_variadic_arguments_are_reached_by_their_names() -> None:
    recorded = get_redacted_args(
        entrypoint(("rest[0]", "options.token")), 1, 2, "s", "t", token="x", n=1
    )

    assert recorded == {
        "a": 1,
        "b": 2,
        "rest": [REDACTED, "t"],
        "options": {"token": REDACTED, "n": 1},
    }


def test_the_caller_s_arguments_are_not_modified() -> None:
    b = {"x": ["s"]}

    get_redacted_args(entrypoint("b.x[0]"), 1, b)

    assert b == {"x": ["s"]}
