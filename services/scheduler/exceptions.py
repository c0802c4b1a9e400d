"""The errors callers of the scheduler service can get back: part of its contract.

Each class is registered with ``deserialize_to_instance``, so a caller that has
imported this module gets them back from an RPC call as instances of these
classes (``except ScheduleNotFound:``) instead of ``RemoteError``. They travel as
their constructor arguments, so every argument is plain data.
"""

from __future__ import annotations

from framework.exceptions import InvalidFields, deserialize_to_instance

__all__ = ["InvalidSchedule", "ScheduleNotFound", "SchedulerError"]


class SchedulerError(Exception):
    """Base class of every error the scheduler service raises on purpose."""


@deserialize_to_instance
class ScheduleNotFound(SchedulerError):
    """No schedule has the given id."""


@deserialize_to_instance
class InvalidSchedule(InvalidFields, SchedulerError):
    """The schedule (or change, or preview request) was refused; nothing was stored.

    ``errors`` maps each bad field to the reason, dotted for nested fields:
    ``InvalidSchedule("invalid schedule", {"cron": "...", "target.method": "..."})``
    """
