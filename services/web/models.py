"""The web service's own tables: edge state only (login sessions, API tokens, login
throttling). Business data stays in the services that own it. Changing these means
a new migration in ``migrations/``.

Credentials are never stored: a session cookie and an API token are random strings
of which only an HMAC (keyed with ``SECRET_KEY``) is kept, so a copy of this
database lets nobody log in.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ApiToken", "Base", "LoginSession", "LoginThrottle", "utcnow"]


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class LoginSession(Base):
    """A browser's login: found by the HMAC of its cookie, revocable server-side."""

    __tablename__ = "web_sessions"

    # A public handle (not the credential): what a websocket's context carries.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(Integer, index=True)
    # A copy of the user's role and names, kept current by the users service's
    # events, so that authorizing a request needs no call to it.
    role: Mapped[str] = mapped_column(String(16))
    email: Mapped[str] = mapped_column(String(254))
    display_name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class ApiToken(Base):
    """A personal bearer token for the JSON API, listed and revocable in the panel."""

    __tablename__ = "web_api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, shown in the list so its owner can tell
    # tokens apart; too short to guess the rest from.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    revoked_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )

    __table_args__ = ({"sqlite_autoincrement": True},)


class LoginThrottle(Base):
    """Failed logins of one account or one address, in the current window."""

    __tablename__ = "web_login_throttle"

    # "account:<email lower-cased>" or "address:<ip>"
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    blocked_until: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
