"""The errors callers of the conversions service can get back: part of its contract.

Registered with ``deserialize_to_instance``, so a caller that imported this module
gets them back from an RPC call as these classes (``except JobNotFound:``). They
travel as their constructor arguments, so every argument is plain data.
"""

from __future__ import annotations

from framework.exceptions import InvalidFields, deserialize_to_instance

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
class InvalidOptions(InvalidFields, ConversionsError):
    """The arguments were rejected; ``errors`` maps each bad field to the reason.

    ``InvalidOptions("invalid options", {"write.compression": "must be one of ..."})``
    """


@deserialize_to_instance
class JobStateConflict(ConversionsError):
    """The job is in a state that does not allow this (cancel a finished job,
    retry a running one)."""
