"""The users service's tables. Changing them means a new migration in ``migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, CheckConstraint, DateTime, Index, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from framework.outbox import outbox_table
from services.users.schemas import (
    DISPLAY_NAME_MAX_LENGTH,
    EMAIL_MAX_LENGTH,
    ROLE_MEMBER,
    ROLES,
)

__all__ = ["Base", "User", "outbox", "utcnow"]


class Base(DeclarativeBase):
    pass


# Events waiting to be published: written in the same transaction as the change
# they announce, published by the service's outbox relay (framework.outbox).
outbox = outbox_table(Base.metadata)


def utcnow() -> datetime:
    return datetime.now(UTC)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Stored normalised (schemas.normalise_email: NFKC + case folding), so the
    # unique index below compares identities, not spellings.
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH))
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_MAX_LENGTH))
    role: Mapped[str] = mapped_column(String(16), default=ROLE_MEMBER, index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # argon2id, PHC string format (parameters and salt included).
    password_hash: Mapped[str] = mapped_column(String(255))
    # Set here rather than by the server, so SQLite (unit tests) and PostgreSQL
    # agree on what a row looks like.
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        # The one guard against two accounts with one email: it also settles the
        # race between two replicas bootstrapping the same admin account.
        Index("uq_users_email", email, unique=True),
        CheckConstraint(
            "role IN (" + ", ".join(f"'{role}'" for role in ROLES) + ")",
            name="ck_users_role",
        ),
        # Ids are never reused, so an id another service still holds from a
        # user_deleted event cannot come to mean someone else. PostgreSQL's serial
        # already behaves so; SQLite reuses the highest rowid without this.
        {"sqlite_autoincrement": True},
    )

    def __repr__(self) -> str:
        # Never the password hash: reprs end up in logs.
        return f"<User id={self.id} role={self.role} active={self.is_active}>"
