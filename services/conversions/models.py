"""The conversions service's tables. Changing them means a new migration in ``migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "ConversionJob", "StoredFile", "utcnow"]


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoredFile(Base):
    """A file in the shared storage: an upload, or a conversion's input."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # The name the user gave it: shown, never used as a storage path.
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))
    content_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    owner: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    storage_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )


class ConversionJob(Base):
    """One conversion: its request, its state, its progress and its output.

    ``runner`` names the replica running it, so that only that replica's heartbeat
    and result land; ``output_key`` is chosen at creation, so a job run twice
    (after a crash) writes the same single output.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_id: Mapped[str] = mapped_column(String(36), ForeignKey("files.id"))
    input_name: Mapped[str] = mapped_column(String(255))
    input_format: Mapped[str] = mapped_column(String(16))
    input_size: Mapped[int] = mapped_column(BigInteger)
    target_format: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    output_key: Mapped[str] = mapped_column(String(200))
    output_name: Mapped[str] = mapped_column(String(255))
    output_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    output_rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    # The list's order is (created_at, id), newest first, under each filter it
    # takes (owner, state, both, none): each index serves one filter's pages by
    # key (``after``) and its deep pages by number from the index alone.
    __table_args__ = (
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_owner_created_id", "owner", "created_at", "id"),
        Index("ix_jobs_state_created_id", "state", "created_at", "id"),
        Index("ix_jobs_owner_state_created_id", "owner", "state", "created_at", "id"),
    )

    def __repr__(self) -> str:
        return f"<ConversionJob id={self.id} state={self.state}>"
