"""Serializer configuration: serializer, ACCEPT, SERIALIZERS."""

from __future__ import annotations

import json

import pytest

from framework.exceptions import ConfigurationError
from framework.serialization import setup


def upper_dumps(value):
    return json.dumps(value).upper()


def upper_loads(value):
    return json.loads(value.lower())


def test_defaults_to_json():
    assert setup({}) == ("json", ["json"])


def test_accept_defaults_to_the_serializer():
    assert setup({"serializer": "pickle"}) == ("pickle", ["pickle"])


def test_unknown_serializer_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match='register a serializer for "nope"'):
        setup({"serializer": "nope"})


def test_custom_serializers_are_registered():
    config = {
        "serializer": "upper",
        "ACCEPT": ["upper", "json"],
        "SERIALIZERS": {
            "upper": {
                "encoder": "tests.framework.test_serialization.upper_dumps",
                "decoder": "tests.framework.test_serialization.upper_loads",
                "content_type": "application/x-upper",
            }
        },
    }
    assert setup(config) == ("upper", ["upper", "json"])


def test_fast_json_path_writes_what_kombu_writes():
    import datetime
    import decimal
    import uuid

    import kombu.serialization

    from framework.serialization import dumps, loads

    for payload in (
        {"a": [1, 2.5, None, True, "ü"]},
        [],
        "x",
        {"when": datetime.datetime(2026, 1, 2, 3, 4, 5)},
        {"d": decimal.Decimal("1.5"), "u": uuid.UUID(int=1)},
    ):
        ours = dumps(payload, "json")
        theirs = kombu.serialization.dumps(payload, serializer="json")
        assert ours == theirs
        accept = {"application/json"}
        assert loads(
            ours[2].encode(), ours[0], ours[1], accept
        ) == kombu.serialization.loads(theirs[2], theirs[0], theirs[1], accept=accept)


def test_decoding_refuses_content_types_not_accepted():
    from kombu.exceptions import ContentDisallowed

    from framework.serialization import loads

    with pytest.raises(ContentDisallowed):
        loads(b"{}", "application/json", "utf-8", {"application/x-msgpack"})
