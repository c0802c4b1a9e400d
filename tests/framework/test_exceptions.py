"""How exceptions travel: nameko's error dict, registered types, RemoteError."""

from __future__ import annotations

from framework.exceptions import (
    IncorrectSignature,
    InvalidFields,
    MethodNotFound,
    RemoteError,
    UnknownService,
    UnserializableValueError,
    deserialize,
    deserialize_to_instance,
    format_exception_frames,
    is_expected,
    safe_error,
    safe_for_serialization,
    safe_message,
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


SECRET = "hunter2-$argon2id$v=19$m=65536"


def _raise_chained() -> None:
    key = SECRET[::-1]
    try:
        {}[key]
    except KeyError as exc:
        raise ValueError(f"INSERT ... parameters ({SECRET!r})") from exc


def test_an_unexpected_error_reaches_callers_as_its_type_and_correlation_id_only():
    exc = ValueError(f"bad row: {SECRET}")

    error = safe_error(exc, expected=False, correlation_id="users.create.42")

    assert SECRET not in repr(error)
    assert error["exc_type"] == "ValueError"
    assert "ValueError" in error["value"] and "users.create.42" in error["value"]
    assert error["exc_args"] == [error["value"]]
    assert safe_message(exc, False, "users.create.42") == error["value"]
    rebuilt = deserialize(error)
    assert isinstance(rebuilt, RemoteError) and SECRET not in str(rebuilt)


def test_an_expected_error_keeps_its_message_and_is_rebuilt_by_callers():
    error = safe_error(Registered("over the limit"), True, "svc.m.1")

    assert error == serialize(Registered("over the limit"))
    assert deserialize(error).args == ("over the limit",)
    assert safe_message(KeyError("k"), True, None) == "'k'"


def test_declared_bad_request_and_registered_errors_are_expected_others_not():
    assert is_expected(KeyError("k"), (KeyError,))
    assert is_expected(MethodNotFound("m"))
    assert is_expected(Registered("r"))
    assert not is_expected(ValueError("v"), (KeyError,))
    assert not is_expected(ValueError("v"))


def test_exception_frames_name_types_and_functions_but_no_message_text():
    try:
        _raise_chained()
    except ValueError as exc:
        text = format_exception_frames(exc)

    assert SECRET not in text and SECRET[::-1] not in text
    assert "builtins.KeyError" in text and "builtins.ValueError" in text
    assert "_raise_chained" in text


@deserialize_to_instance
class InvalidWidget(InvalidFields):
    """A service's own refusal, as services declare theirs."""


def test_a_refusal_with_field_errors_travels_as_its_arguments_and_comes_back_whole():
    exc = InvalidWidget(
        "invalid widget", {"size": "must be positive", "tags.0": "empty"}
    )
    assert str(exc) == "invalid widget (size: must be positive; tags.0: empty)"
    data = serialize(exc)
    assert data["exc_args"] == [
        "invalid widget",
        {"size": "must be positive", "tags.0": "empty"},
    ]
    rebuilt = deserialize(data)
    assert type(rebuilt) is InvalidWidget
    assert (rebuilt.message, rebuilt.errors) == (exc.message, exc.errors)


def test_a_refusal_without_field_errors_reads_as_its_message():
    exc = InvalidWidget("nothing to change")
    assert (str(exc), exc.errors) == ("nothing to change", {})
