"""The errors callers of the conversions service can get back: part of its contract.

Registered with ``deserialize_to_instance``, so a caller that imported this module
gets them back from an RPC call as these classes (``except JobNotFound:``). They
travel as their constructor arguments, so every argument is plain data.
"""

from __future__ import annotations

from typing import Any

from framework.exceptions import deserialize_to_instance

__all__ = [
    "ConversionsError",
    "FileNotFound",
    "InvalidOptions",
    "JobNotFound",
    "JobStateConflict",
    "UnsupportedConversion",
]


class ConversionsError(Exception):
    """Base class of every error the conversions service raises on purpose."""


@deserialize_to_instance
class JobNotFound(ConversionsError):
    """No conversion job has the given id."""


@deserialize_to_instance
class FileNotFound(ConversionsError):
    """No registered file has the given id (or its bytes are not in storage)."""


@deserialize_to_instance
class UnsupportedConversion(ConversionsError):
    """The format, or the pair of formats, is not one ``formats()`` lists."""


@deserialize_to_instance
class InvalidOptions(ConversionsError):
    """The arguments were rejected; ``errors`` maps each bad field to the reason.

    ``InvalidOptions("invalid options", {"write.compression": "must be one of ..."})``
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


@deserialize_to_instance
class JobStateConflict(ConversionsError):
    """The job is in a state that does not allow this (cancel a finished job,
    retry a running one)."""
