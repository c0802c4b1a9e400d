"""How exceptions travel: nameko's error dict, registered types, RemoteError."""

from __future__ import annotations

from framework.exceptions import (
    IncorrectSignature,
    MethodNotFound,
    RemoteError,
    UnknownService,
    UnserializableValueError,
    deserialize,
    deserialize_to_instance,
    safe_for_serialization,
    serialize,
)


@deserialize_to_instance
class Registered(Exception):
    pass


def test_serialize_produces_nameko_error_dict():
    assert serialize(ValueError("bad", 1)) == {
        "exc_type": "ValueError",
        "exc_path": "builtins.ValueError",
        "exc_args": ["bad", "1"],
        "value": "('bad', 1)",
    }


def test_builtin_framework_errors_travel_under_nameko_paths():
    assert (
        serialize(MethodNotFound("x"))["exc_path"] == "nameko.exceptions.MethodNotFound"
    )


def test_registered_errors_are_rebuilt_as_instances_from_either_spelling():
    for path in (
        "nameko.exceptions.MethodNotFound",
        "framework.exceptions.MethodNotFound",
    ):
        exc = deserialize(
            {
                "exc_type": "MethodNotFound",
                "exc_path": path,
                "exc_args": ["m"],
                "value": "m",
            }
        )
        assert isinstance(exc, MethodNotFound) and exc.args == ("m",)
    assert isinstance(
        deserialize(serialize(IncorrectSignature("sig"))), IncorrectSignature
    )
    assert isinstance(deserialize(serialize(Registered("r"))), Registered)


def test_unregistered_errors_become_remote_errors():
    exc = deserialize(serialize(KeyError("k")))
    assert isinstance(exc, RemoteError)
    assert exc.exc_type == "KeyError" and exc.value == "'k'"
    assert str(exc) == "KeyError 'k'"


def test_safe_for_serialization_reduces_to_plain_types():
    class Odd:
        def __str__(self):
            return "odd"

    assert safe_for_serialization({"a": (1, Odd())}) == {"a": ["1", "odd"]}


def test_error_messages():
    assert str(UnknownService("svc")) == "Unknown service `svc`"
    assert (
        str(UnserializableValueError(object))
        == "Unserializable value: `<class 'object'>`"
    )
