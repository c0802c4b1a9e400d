"""``@cron(expr, tz=..., cluster_once=False, overlap=...)``: run a method on a calendar.

The expression is parsed by croniter: five fields (minute hour day month weekday),
six with a leading seconds field (``"*/10 * * * * *"``: every ten seconds), or an
alias (``@hourly``, ``@daily``, ``@midnight``, ``@weekly``, ``@monthly``,
``@yearly``, ``@annually``). Times are computed in ``tz`` (an IANA name), so a
``"30 2 * * *"`` job in ``Europe/Paris`` runs at half past two Paris time all year.

Daylight saving time, as Vixie cron does it:

* on the day clocks skip 02:00-03:00, a 02:30 job fires once, at 03:00 (the first
  instant after the gap);
* on the day clocks repeat 02:00-03:00, a job whose hour is fixed fires once, at the
  first 02:30; a job that fires every hour or more often (hour field ``*``) follows
  elapsed time and fires in both passes, as its period promises.

``CronSchedule`` is the expression alone (used by the scheduler service too);
``Cron`` is the entrypoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

log = logging.getLogger(__name__)

__all__ = [
    "CronSchedule",
    "InvalidCronExpression",
    "OVERLAP_ALLOW",
    "OVERLAP_POLICIES",
    "OVERLAP_QUEUE_ONE",
    "OVERLAP_SKIP",
]

# What a tick does when the previous run of the same entrypoint is still going.
OVERLAP_SKIP = "skip"  # drop this tick (logged)
OVERLAP_ALLOW = "allow"  # run it alongside
OVERLAP_QUEUE_ONE = "queue_one"  # run it when the current one ends; later ones drop
OVERLAP_POLICIES = (OVERLAP_SKIP, OVERLAP_ALLOW, OVERLAP_QUEUE_ONE)

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class InvalidCronExpression(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


class CronSchedule:
    """A cron expression in a time zone: its fire times, DST handled.

    ``CronSchedule("30 2 * * *", "Europe/Paris").next_after(moment)`` is the first
    fire time strictly after ``moment`` (an aware datetime), in the schedule's zone.
    Raises ``InvalidCronExpression`` at construction for a bad expression or zone.
    """

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidCronExpression("a cron expression must be a non-empty string")
        self.expression = " ".join(expression.split())
        self.tz_name = tz
        self.tz = _zone(tz)
        fields = ALIASES.get(self.expression.lower(), self.expression).split()
        if len(fields) not in (5, 6):
            raise InvalidCronExpression(
                f"{expression!r} has {len(fields)} fields; a cron expression has 5 "
                "(minute hour day month weekday), 6 with a leading seconds field, "
                f"or is one of {', '.join(ALIASES)}"
            )
        self.has_seconds = len(fields) == 6
        self._fields = " ".join(fields)
        try:
            croniter(
                self._fields,
                datetime(2000, 1, 1, tzinfo=self.tz),
                second_at_beginning=self.has_seconds,
            )
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidCronExpression(
                f"{expression!r} is not a valid cron expression: {exc}"
            ) from None
        hour_field = fields[2] if self.has_seconds else fields[1]
        # With a fixed hour, the second pass of a repeated hour is the same wall
        # clock time again: Vixie cron (and people) expect it once.
        self._wall_clock = hour_field != "*"

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, {self.tz_name!r})"

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment`` (aware), in ``self.tz``."""
        return next(self.iter_after(moment))

    def iter_after(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``moment``, in order, forever."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        # croniter counts from the start of the current second (or minute), so
        # start from a whole one and drop anything not strictly later.
        # Aware datetimes sharing a tzinfo compare by wall time, ignoring ``fold``:
        # in a repeated hour that is wrong, so compare in UTC.
        floor = moment.astimezone(UTC)
        iterator = croniter(
            self._fields,
            moment.astimezone(self.tz),
            second_at_beginning=self.has_seconds,
        )
        while True:
            candidate = iterator.get_next(datetime)
            if candidate.astimezone(UTC) <= floor:
                continue
            if self._wall_clock and _second_pass(candidate):
                continue
            yield candidate

    def next_times(self, moment: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``moment``."""
        times = self.iter_after(moment)
        return [next(times) for _ in range(count)]

    def between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Fire times in ``(start, end]``."""
        ceiling = end.astimezone(UTC)
        for moment in self.iter_after(start):
            if moment.astimezone(UTC) > ceiling:
                return
            yield moment


def _zone(name: Any) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise InvalidCronExpression("a time zone must be an IANA name such as UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidCronExpression(
            f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'"
        ) from None


def _second_pass(moment: datetime) -> bool:
    """Whether ``moment`` is the later of two instants with the same wall time."""
    naive = moment.replace(tzinfo=None)
    tz = moment.tzinfo
    first = naive.replace(tzinfo=tz, fold=0).utcoffset()
    second = naive.replace(tzinfo=tz, fold=1).utcoffset()
    return first != second and moment.utcoffset() == second and first != second
