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
