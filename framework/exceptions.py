"""Exceptions, and how they travel between services (nameko's error format)."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Iterable
from typing import Any

registry: dict[str, type[BaseException]] = {}


def get_module_path(exc_type: type) -> str:
    """``"<module>.<ClassName>"``, the key an exception is registered under."""
    return f"{exc_type.__module__}.{exc_type.__name__}"


def deserialize_to_instance(exc_type: type[BaseException]) -> type[BaseException]:
    """Class decorator: rebuild this exception as an instance on the calling side.

    The class must be importable under the same module path on both sides.
    nameko registers under its own module paths, so we also register the nameko
    spelling of our built-ins (see the end of this module).
    """
    registry[get_module_path(exc_type)] = exc_type
    return exc_type


class ExtensionNotFound(AttributeError):
    pass


@deserialize_to_instance
class RpcTimeout(Exception):
    """No reply arrived within the RPC timeout. A late reply is dropped."""


class ContainerBeingKilled(Exception):
    """Raised by ``spawn_worker`` once the container has started to die."""


class RemoteError(Exception):
    """An exception raised by a remote service that is not registered locally."""

    def __init__(self, exc_type: str | None = None, value: Any = "") -> None:
        self.exc_type = exc_type
        self.value = value
        super().__init__(f"{exc_type} {value}")


class BadRequest(Exception):
    pass


@deserialize_to_instance
class MalformedRequest(BadRequest):
    pass


@deserialize_to_instance
class MethodNotFound(BadRequest):
    pass


@deserialize_to_instance
class IncorrectSignature(BadRequest):
    pass


class UnknownService(Exception):
    def __init__(self, service_name: str) -> None:
        self._service_name = service_name
        super().__init__(service_name)

    def __str__(self) -> str:
        return f"Unknown service `{self._service_name}`"


class UnserializableValueError(Exception):
    def __init__(self, value: Any) -> None:
        try:
            self.repr_value = repr(value)
        except Exception:
            self.repr_value = "[__repr__ failed]"
        super().__init__()

    @classmethod
    def of_type(cls, value: Any) -> UnserializableValueError:
        """One that names ``value``'s type only: a repr may quote anything."""
        error = cls(None)
        error.repr_value = f"<{type(value).__name__}>"
        return error

    def __str__(self) -> str:
        return f"Unserializable value: `{self.repr_value}`"


class ConfigurationError(Exception):
    pass


class ProxyUsedAcrossThreads(RuntimeError):
    """A standalone RPC proxy was used from an OS thread other than the one that
    started it. Its connection, reply queue and waits belong to that thread;
    give each thread its own proxy."""


class CommandError(Exception):
    pass


class ConnectionNotFound(BadRequest):
    pass


class UndeliverableMessage(Exception):
    """A mandatory message was returned by the broker: nothing is bound to route it."""


class ReplyQueueExpiredWithPendingReplies(Exception):
    """A standalone proxy's reply queue expired while it was disconnected, with
    calls still waiting: their replies went to a queue that no longer exists."""


class PublishConfirmFailed(Exception):
    """The broker nacked a publish, or did not confirm it in time; it may be lost."""


def safe_for_serialization(value: Any) -> Any:
    """Reduce a value to strings, dicts and lists, so any serializer can carry it."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {
            safe_for_serialization(key): safe_for_serialization(val)
            for key, val in value.items()
        }
    if isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        return [safe_for_serialization(item) for item in value]
    try:
        return str(value)
    except Exception:
        return "[__unicode__ failed]"


def wire_path(exc_type: type) -> str:
    """The ``exc_path`` we put on the wire.

    Our built-in exceptions travel under nameko's module path, so that a nameko
    peer rebuilds ``MethodNotFound`` and friends as instances, as it would for its own.
    """
    if exc_type.__module__ == __name__:
        return f"nameko.exceptions.{exc_type.__name__}"
    return get_module_path(exc_type)


def serialize(exc: BaseException) -> dict[str, Any]:
    """nameko's error dict: ``exc_type``, ``exc_path``, ``exc_args``, ``value``."""
    return {
        "exc_type": type(exc).__name__,
        "exc_path": wire_path(type(exc)),
        "exc_args": [safe_for_serialization(arg) for arg in exc.args],
        "value": safe_for_serialization(exc),
    }


def is_expected(
    exc: BaseException,
    expected_exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> bool:
    """Whether ``exc``'s message was written for callers, so it may cross the wire.

    True for what the entrypoint declared in ``expected_exceptions``, for the
    framework's own ``BadRequest`` family (a wrong method or signature, said in
    words the caller needs), and for any registered exception
    (``deserialize_to_instance``): registering a type publishes it, with its
    arguments, as part of a service's contract.
    """
    if expected_exceptions and isinstance(exc, expected_exceptions):
        return True
    return isinstance(exc, BadRequest) or get_module_path(type(exc)) in registry


def unexpected_error_message(exc: BaseException, correlation_id: str | None) -> str:
    """The generic text that stands in for an unexpected exception's message.

    It names the type and the correlation id (the call id), which the service's
    error log carries too, so an operator can find the stack frames; the text
    itself may hold anything (SQL parameters, a password hash) and stays home.
    """
    return (
        f"unexpected {type(exc).__name__} "
        f"(correlation id {correlation_id or 'unknown'}; details in the service's log)"
    )


def safe_message(exc: BaseException, expected: bool, correlation_id: str | None) -> str:
    """What a caller may read of ``exc``: its own message if it is expected,
    else ``unexpected_error_message``. For HTTP bodies, websocket frames, etc."""
    if expected:
        return str(safe_for_serialization(exc))
    return unexpected_error_message(exc, correlation_id)


def safe_error(
    exc: BaseException, expected: bool, correlation_id: str | None
) -> dict[str, Any]:
    """nameko's error dict for a reply: ``serialize(exc)`` for an expected
    exception (so a peer rebuilds a registered type with its arguments), and for
    an unexpected one the same keys with the generic message as ``value`` and
    only ``exc_args``. ``exc_type`` and ``exc_path`` stay: types are not secrets
    and callers dispatch on them.
    """
    if expected:
        return serialize(exc)
    message = unexpected_error_message(exc, correlation_id)
    return {
        "exc_type": type(exc).__name__,
        "exc_path": wire_path(type(exc)),
        "exc_args": [message],
        "value": message,
    }


def format_exception_frames(exc: BaseException) -> str:
    """``exc``'s traceback (and those of its causes) without any message text.

    Like ``traceback.format_exception`` but each exception line names only the
    type: a driver's message often quotes the statement's parameters. Frames show
    file, line, function and source line, which is code, not data.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    parts: list[str] = []
    for position, link in enumerate(reversed(chain)):
        if position:
            parts.append("\nwhich led to:\n\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_list(traceback.extract_tb(link.__traceback__)))
        parts.append(f"{get_module_path(type(link))} (message withheld)\n")
    return "".join(parts).rstrip("\n")


def deserialize(data: dict[str, Any]) -> BaseException:
    """Rebuild a registered exception, or a ``RemoteError`` for anything else."""
    exc_type = registry.get(data.get("exc_path", ""))
    if exc_type is not None:
        args = data.get("exc_args", [])
        try:
            return exc_type(*args)
        except Exception:
            pass
    return RemoteError(exc_type=data.get("exc_type"), value=data.get("value", ""))


def _register_nameko_spellings() -> None:
    # A nameko peer sends "nameko.exceptions.MethodNotFound"; rebuild it as ours.
    for name, obj in list(globals().items()):
        if (
            inspect.isclass(obj)
            and issubclass(obj, BaseException)
            and get_module_path(obj) in registry
        ):
            registry[f"nameko.exceptions.{name}"] = obj


_register_nameko_spellings()


class InvalidFields(Exception):
    """Base of a service's "your input was refused" error: a message plus, for each
    bad field, the reason (dotted for nested fields).

    ``InvalidOptions("invalid options", {"write.compression": "must be one of ..."})``

    It travels as its two arguments (both plain data), so a subclass registered with
    ``deserialize_to_instance`` is rebuilt by callers with ``errors`` intact.
    """

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message, dict(errors or {}))

    @property
    def message(self) -> str:
        return self.args[0]

    @property
    def errors(self) -> dict[str, str]:
        return self.args[1]

    def __str__(self) -> str:
        if not self.errors:
            return self.message
        details = "; ".join(
            f"{field}: {reason}" for field, reason in self.errors.items()
        )
        return f"{self.message} ({details})"
