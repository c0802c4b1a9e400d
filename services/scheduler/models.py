"""The scheduler's tables. Changing them means a new migration in ``migrations/``.

``schedules.next_fire_at`` is the engine's state: the next tick due (UTC), moved
forward by whichever replica claims the due ticks. ``runs`` is both the history and
the claim: its unique ``(schedule_id, scheduled_for)`` is what makes a tick run
once, whatever replicas race for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.scheduler.schemas import (
    MISSED_RUN_SKIP,
    NAME_MAX_LENGTH,
    OUTCOME_RUNNING,
    OVERLAP_SKIP,
)

__all__ = ["Base", "Run", "Schedule", "utcnow"]


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class Schedule(Base):
    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    missed_run_policy: Mapped[str] = mapped_column(String(16), default=MISSED_RUN_SKIP)
    catchup_window_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    overlap_policy: Mapped[str] = mapped_column(String(16), default=OVERLAP_SKIP)
    jitter_seconds: Mapped[int] = mapped_column(Integer, default=0)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=60)
    history_limit: Mapped[int] = mapped_column(Integer, default=100)
    # The next tick to claim; NULL until a replica first computes it (the
    # built-in schedules are inserted by a migration, which does not run cron).
    next_fire_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), index=True
    )
    # overlap_policy queue_one: the one tick waiting for the running run to end.
    queued_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    __table_args__ = ({"sqlite_autoincrement": True},)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    schedule_id: Mapped[int] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE")
    )
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Past this, a run still ``running`` is marked lost by any replica: its own
    # replica would have recorded a timeout long before.
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    replica: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16), default=OUTCOME_RUNNING)
    result_summary: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # The claim: one run per tick of a schedule, across every replica.
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_runs_tick"),
        Index("ix_runs_schedule_id_id", "schedule_id", "id"),
        Index("ix_runs_outcome_deadline", "outcome", "deadline_at"),
        {"sqlite_autoincrement": True},
    )
