"""The errors callers of the users service can get back: part of its contract.

Each class is registered with ``deserialize_to_instance``, so a caller that has
imported this module gets them back from an RPC call as instances of these
classes (``except UserNotFound:``) instead of ``RemoteError``. They travel as their
constructor arguments, so every argument must be plain data (strings, dicts).
"""

from __future__ import annotations

from framework.exceptions import InvalidFields, deserialize_to_instance

__all__ = [
    "AuthenticationFailed",
    "EmailAlreadyRegistered",
    "InvalidUserData",
    "UserNotFound",
    "UsersError",
]


class UsersError(Exception):
    """Base class of every error the users service raises on purpose."""


@deserialize_to_instance
class UserNotFound(UsersError):
    """No account has the given id (or email)."""


@deserialize_to_instance
class EmailAlreadyRegistered(UsersError):
    """Another account already uses this email (compared case-insensitively)."""


@deserialize_to_instance
class InvalidUserData(InvalidFields, UsersError):
    """The arguments were rejected; ``errors`` maps each bad field to the reason.

    ``InvalidUserData("invalid user data", {"email": "not an email address"})``
    """


@deserialize_to_instance
class AuthenticationFailed(UsersError):
    """Wrong email or password, or the account is deactivated.

    Deliberately one error with one message for all three, so that a caller
    cannot use it to find out which emails have accounts.
    """
