"""The web service's own providers: its edge state and the settings it runs with.

* ``EdgeStore``: the service's database (``Database``), injecting an ``EdgeState``:
  login sessions, API tokens and login throttling. Routes are authorized before
  their worker starts, in the connection's thread, so the state object is also
  reachable from there (``EdgeStore.state``).
* ``WebSettings``: the config keys of this service, parsed once at setup.
* ``Principal``: who is calling, as the routes see it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy
import sqlalchemy.orm
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from framework.database import Database
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider
from services.web.models import ApiToken, Base, LoginSession, LoginThrottle, utcnow

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

ROLE_ADMIN = "admin"

# -- config keys and their defaults ---------------------------------------------------
SECRET_KEY_CONFIG_KEY = "SECRET_KEY"
# Written down here on purpose: ENVIRONMENT=production refuses to start with it.
DEVELOPMENT_SECRET_KEY = "web-development-secret-key-not-for-production"
SESSION_IDLE_SECONDS_CONFIG_KEY = "SESSION_IDLE_SECONDS"
SESSION_MAX_SECONDS_CONFIG_KEY = "SESSION_MAX_SECONDS"
SESSION_COOKIE_SECURE_CONFIG_KEY = "SESSION_COOKIE_SECURE"  # "auto", true or false
# Seconds a replica trusts a session or token it looked up (0: every request asks
# the database). Also how late a revocation made on another replica applies here.
CREDENTIAL_CACHE_SECONDS_CONFIG_KEY = "CREDENTIAL_CACHE_SECONDS"
LOGIN_MAX_FAILURES_CONFIG_KEY = "LOGIN_MAX_FAILURES"  # per account, per window
LOGIN_MAX_FAILURES_PER_ADDRESS_CONFIG_KEY = "LOGIN_MAX_FAILURES_PER_ADDRESS"
LOGIN_WINDOW_SECONDS_CONFIG_KEY = "LOGIN_WINDOW_SECONDS"
LOGIN_BLOCK_SECONDS_CONFIG_KEY = "LOGIN_BLOCK_SECONDS"
UPLOAD_MAX_BYTES_CONFIG_KEY = "UPLOAD_MAX_BYTES"
SERVICE_HEALTH_URLS_CONFIG_KEY = "SERVICE_HEALTH_URLS"
RABBIT_MANAGEMENT_URL_CONFIG_KEY = "RABBIT_MANAGEMENT_URL"

DEFAULTS: dict[str, Any] = {
    SECRET_KEY_CONFIG_KEY: DEVELOPMENT_SECRET_KEY,
    SESSION_IDLE_SECONDS_CONFIG_KEY: 30 * 60,
    SESSION_MAX_SECONDS_CONFIG_KEY: 12 * 3600,
    SESSION_COOKIE_SECURE_CONFIG_KEY: "auto",
    CREDENTIAL_CACHE_SECONDS_CONFIG_KEY: 1.0,
    LOGIN_MAX_FAILURES_CONFIG_KEY: 5,
    LOGIN_MAX_FAILURES_PER_ADDRESS_CONFIG_KEY: 20,
    LOGIN_WINDOW_SECONDS_CONFIG_KEY: 15 * 60,
    LOGIN_BLOCK_SECONDS_CONFIG_KEY: 15 * 60,
    UPLOAD_MAX_BYTES_CONFIG_KEY: 100 * 1024 * 1024,
    SERVICE_HEALTH_URLS_CONFIG_KEY: {},
    RABBIT_MANAGEMENT_URL_CONFIG_KEY: "http://guest:guest@127.0.0.1:15672",
}

# A session's last-seen time is written at most this often: every request
# writing it would make every page view a database write.
TOUCH_INTERVAL = timedelta(seconds=60)
TOKEN_PREFIX = "wt_"
# A revocation elsewhere must not wait long: the cache is for bursts of requests.
MAX_CREDENTIAL_CACHE_SECONDS = 10.0
# Credentials a replica keeps at most (then it forgets them all and looks up again).
CREDENTIAL_CACHE_MAX_ENTRIES = 10_000


def _seconds(value: Any, key: str, most: float) -> float:
    refused = ValueError(f"{key} must be a number of seconds from 0 to {most:g}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise refused from None
    if not 0 <= seconds <= most:  # NaN too
        raise refused
    return seconds


@dataclass(frozen=True)
class Settings:
    secret_key: bytes
    session_idle: timedelta
    session_max: timedelta
    cookie_secure: str  # "auto", "true", "false"
    credential_cache_seconds: float
    max_failures: int
    max_failures_per_address: int
    login_window: timedelta
    login_block: timedelta
    upload_max_bytes: int
    service_health_urls: dict[str, str]
    rabbit_management_url: str
    config: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Settings:
        def get(key: str) -> Any:
            value = config.get(key)
            return DEFAULTS[key] if value is None or value == "" else value

        try:
            secret = str(get(SECRET_KEY_CONFIG_KEY))
            if len(secret) < 16:
                raise ValueError(
                    f"{SECRET_KEY_CONFIG_KEY} must be 16 characters or more"
                )
            urls = get(SERVICE_HEALTH_URLS_CONFIG_KEY)
            if not isinstance(urls, dict):
                raise ValueError(f"{SERVICE_HEALTH_URLS_CONFIG_KEY} must be a mapping")
            return cls(
                secret_key=secret.encode(),
                session_idle=timedelta(
                    seconds=int(get(SESSION_IDLE_SECONDS_CONFIG_KEY))
                ),
                session_max=timedelta(seconds=int(get(SESSION_MAX_SECONDS_CONFIG_KEY))),
                cookie_secure=str(get(SESSION_COOKIE_SECURE_CONFIG_KEY)).lower(),
                credential_cache_seconds=_seconds(
                    get(CREDENTIAL_CACHE_SECONDS_CONFIG_KEY),
                    CREDENTIAL_CACHE_SECONDS_CONFIG_KEY,
                    most=MAX_CREDENTIAL_CACHE_SECONDS,
                ),
                max_failures=int(get(LOGIN_MAX_FAILURES_CONFIG_KEY)),
                max_failures_per_address=int(
                    get(LOGIN_MAX_FAILURES_PER_ADDRESS_CONFIG_KEY)
                ),
                login_window=timedelta(
                    seconds=int(get(LOGIN_WINDOW_SECONDS_CONFIG_KEY))
                ),
                login_block=timedelta(seconds=int(get(LOGIN_BLOCK_SECONDS_CONFIG_KEY))),
                upload_max_bytes=int(get(UPLOAD_MAX_BYTES_CONFIG_KEY)),
                service_health_urls={str(k): str(v) for k, v in urls.items()},
                rabbit_management_url=str(get(RABBIT_MANAGEMENT_URL_CONFIG_KEY)),
                config=config,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"web service configuration: {exc}") from None


@dataclass(frozen=True)
class Principal:
    """The caller of a route: a logged-in browser or a bearer token's owner."""

    user_id: int
    role: str
    email: str
    display_name: str
    via: str  # "session" or "token"
    session_id: str | None = None
    csrf_token: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


@dataclass(frozen=True)
class NewCredential:
    """A credential just made: the secret itself (shown once) and its row's id."""

    secret: str
    id: Any


class CredentialCache:
    """Sessions and tokens this replica looked up, trusted for ``max_age`` seconds.

    Looking the caller up in the database was a transaction on every request,
    about a fifth of a list request's CPU in this service. Only credentials
    found valid are kept (an unknown cookie or token always asks the database),
    keyed by their digest, each until the earliest of ``max_age`` after it was
    read and the session's own idle or absolute expiry.

    What revokes a credential through this replica (logout, a token revoked, a
    user deactivated, deleted, demoted or their password reset, the users
    service's events) forgets the user's entries at once, so it applies to the
    very next request here. Another replica's revocation reaches this one's
    database row at once and this cache within ``max_age``: that is the bound.
    A lookup that was reading while something was forgotten is not kept (the
    generation moved), so a revocation cannot be undone by a read that raced it.
    Wall-clock time, as the expiries are: a clock set back forgets everything.
    """

    def __init__(
        self,
        max_age: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = CREDENTIAL_CACHE_MAX_ENTRIES,
    ) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[Principal, float, float]] = {}
        self.generation = 0

    def get(self, key: str) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        principal, read_at, valid_until = entry
        now = self._clock()
        if not read_at <= now < valid_until:
            self._entries.pop(key, None)
            return None
        return principal

    def put(
        self,
        key: str,
        principal: Principal,
        generation: int,
        expires_at: datetime | None = None,
    ) -> None:
        """Keep ``principal`` if nothing was forgotten since ``generation``."""
        if self.max_age <= 0 or generation != self.generation:
            return
        now = self._clock()
        valid_until = now + self.max_age
        if expires_at is not None:
            valid_until = min(valid_until, expires_at.timestamp())
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (principal, now, valid_until)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()

    def forget_user(self, user_id: int) -> None:
        self.generation += 1
        for key, (principal, _, _) in list(self._entries.items()):
            if principal.user_id == user_id:
                self._entries.pop(key, None)

    def forget_session(self, session_id: str) -> None:
        self.generation += 1
        for key, (principal, _, _) in list(self._entries.items()):
            if principal.session_id == session_id:
                self._entries.pop(key, None)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; we only ever store UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class EdgeState:
    """Sessions, tokens and throttling over one sessionmaker; each method is one
    short transaction, so it is safe from any green thread."""

    def __init__(self, sessionmaker: sqlalchemy.orm.sessionmaker, settings: Settings):
        self._sessionmaker = sessionmaker
        self.settings = settings
        self.credentials = CredentialCache(settings.credential_cache_seconds)

    def digest(self, secret: str) -> str:
        return hmac.new(
            self.settings.secret_key, secret.encode(), hashlib.sha256
        ).hexdigest()

    # -- login sessions ----------------------------------------------------------------

    def create_session(self, user: dict[str, Any]) -> NewCredential:
        secret = secrets.token_urlsafe(32)
        now = utcnow()
        row = LoginSession(
            id=secrets.token_hex(16),
            token_hash=self.digest(secret),
            csrf_token=secrets.token_urlsafe(32),
            user_id=int(user["id"]),
            role=str(user["role"]),
            email=str(user["email"]),
            display_name=str(user["display_name"]),
            created_at=now,
            last_seen_at=now,
        )
        with self._sessionmaker() as session, session.begin():
            # Each login sweeps the sessions that can no longer be used.
            swept = session.execute(
                delete(LoginSession).where(
                    (LoginSession.last_seen_at < now - self.settings.session_idle)
                    | (LoginSession.created_at < now - self.settings.session_max)
                    | LoginSession.revoked_at.is_not(None)
                )
            )
            session.add(row)
        if swept.rowcount:  # type: ignore[attr-defined]
            # Gone from the database, so gone from here (which rows, it does not say).
            self.credentials.clear()
        return NewCredential(secret, row.id)

    def session_principal(self, cookie: str | None) -> Principal | None:
        """The live session the cookie names (its last-seen time refreshed), or None.

        From the replica's ``CredentialCache`` when it was read there lately."""
        if not cookie or len(cookie) > 200:
            return None
        digest = self.digest(cookie)
        key = "session:" + digest
        cached = self.credentials.get(key)
        if cached is not None:
            return cached
        generation = self.credentials.generation
        found = self._live_session(LoginSession.token_hash == digest)
        if found is None:
            return None
        principal, expires_at = found
        self.credentials.put(key, principal, generation, expires_at)
        return principal

    def session_principal_by_id(self, session_id: str | None) -> Principal | None:
        """The live session with this public id: always from the database (a
        websocket's subscribe, not every request)."""
        if not session_id:
            return None
        found = self._live_session(LoginSession.id == session_id)
        return found[0] if found is not None else None

    def _live_session(self, condition: Any) -> tuple[Principal, datetime] | None:
        """The session, and when it expires if not used before then."""
        now = utcnow()
        with self._sessionmaker() as session, session.begin():
            row = session.scalars(select(LoginSession).where(condition)).one_or_none()
            if row is None or row.revoked_at is not None:
                return None
            ends = _aware(row.created_at) + self.settings.session_max
            if (
                now > ends
                or now - _aware(row.last_seen_at) > self.settings.session_idle
            ):
                return None
            if now - _aware(row.last_seen_at) > TOUCH_INTERVAL:
                row.last_seen_at = now
            principal = Principal(
                user_id=row.user_id,
                role=row.role,
                email=row.email,
                display_name=row.display_name,
                via="session",
                session_id=row.id,
                csrf_token=row.csrf_token,
            )
            return principal, min(
                ends, _aware(row.last_seen_at) + self.settings.session_idle
            )

    def revoke_session(self, session_id: str) -> None:
        with self._sessionmaker() as session, session.begin():
            session.execute(
                update(LoginSession)
                .where(LoginSession.id == session_id, LoginSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        self.credentials.forget_session(session_id)

    def revoke_user_sessions(self, user_id: int) -> int:
        with self._sessionmaker() as session, session.begin():
            result = session.execute(
                update(LoginSession)
                .where(
                    LoginSession.user_id == user_id, LoginSession.revoked_at.is_(None)
                )
                .values(revoked_at=utcnow())
            )
        self.credentials.forget_user(user_id)
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- API tokens --------------------------------------------------------------------

    def create_token(
        self, user: dict[str, Any], name: str
    ) -> tuple[str, dict[str, Any]]:
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = ApiToken(
            user_id=int(user["id"]),
            role=str(user["role"]),
            name=name,
            token_hash=self.digest(secret),
            prefix=secret[:10],
            created_at=utcnow(),
        )
        with self._sessionmaker() as session, session.begin():
            session.add(row)
            session.flush()
            payload = _token_payload(row)
        return secret, payload

    def token_principal(self, secret: str | None) -> Principal | None:
        """The live token's owner, or None; cached like sessions."""
        if not secret or len(secret) > 200:
            return None
        digest = self.digest(secret)
        key = "token:" + digest
        cached = self.credentials.get(key)
        if cached is not None:
            return cached
        generation = self.credentials.generation
        principal = self._live_token(digest)
        if principal is not None:
            self.credentials.put(key, principal, generation)
        return principal

    def _live_token(self, digest: str) -> Principal | None:
        now = utcnow()
        with self._sessionmaker() as session, session.begin():
            row = session.scalars(
                select(ApiToken).where(ApiToken.token_hash == digest)
            ).one_or_none()
            if row is None or row.revoked_at is not None:
                return None
            if (
                row.last_used_at is None
                or now - _aware(row.last_used_at) > TOUCH_INTERVAL
            ):
                row.last_used_at = now
            return Principal(
                user_id=row.user_id,
                role=row.role,
                email="",
                display_name="",
                via="token",
            )

    def list_tokens(self, user_id: int) -> list[dict[str, Any]]:
        with self._sessionmaker() as session:
            rows = session.scalars(
                select(ApiToken)
                .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                .order_by(ApiToken.id)
            )
            return [_token_payload(row) for row in rows]

    def revoke_token(self, user_id: int, token_id: int) -> bool:
        with self._sessionmaker() as session, session.begin():
            result = session.execute(
                update(ApiToken)
                .where(
                    ApiToken.id == token_id,
                    ApiToken.user_id == user_id,
                    ApiToken.revoked_at.is_(None),
                )
                .values(revoked_at=utcnow())
            )
        # The cache does not know which entry is this token: the user's go.
        self.credentials.forget_user(user_id)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def revoke_user_tokens(self, user_id: int) -> int:
        with self._sessionmaker() as session, session.begin():
            result = session.execute(
                update(ApiToken)
                .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        self.credentials.forget_user(user_id)
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- what the users service tells us ------------------------------------------------

    def user_changed(self, user: dict[str, Any]) -> None:
        """Keep the copies of a user's role and names current."""
        user_id = int(user["id"])
        with self._sessionmaker() as session, session.begin():
            session.execute(
                update(LoginSession)
                .where(LoginSession.user_id == user_id)
                .values(
                    role=user["role"],
                    email=user["email"],
                    display_name=user["display_name"],
                )
            )
            session.execute(
                update(ApiToken)
                .where(ApiToken.user_id == user_id)
                .values(role=user["role"])
            )
        self.credentials.forget_user(user_id)

    def forget_user(self, user_id: int) -> None:
        with self._sessionmaker() as session, session.begin():
            session.execute(delete(LoginSession).where(LoginSession.user_id == user_id))
            session.execute(delete(ApiToken).where(ApiToken.user_id == user_id))
        self.credentials.forget_user(user_id)

    # -- login throttling ---------------------------------------------------------------

    def login_retry_after(self, keys: list[str]) -> int | None:
        """Seconds until a login for these keys may be tried again; None: now."""
        now = utcnow()
        with self._sessionmaker() as session:
            rows = session.scalars(
                select(LoginThrottle).where(LoginThrottle.key.in_(keys))
            )
            waits = [
                (_aware(row.blocked_until) - now).total_seconds()
                for row in rows
                if row.blocked_until is not None and _aware(row.blocked_until) > now
            ]
        return max(1, int(max(waits)) + 1) if waits else None

    def login_failed(self, account_key: str, address_key: str) -> None:
        # Two failures for a new key at once both insert its row; the loser
        # counts again on top of the winner's row.
        try:
            self._count_failure(account_key, address_key)
        except IntegrityError:
            self._count_failure(account_key, address_key)

    def _count_failure(self, account_key: str, address_key: str) -> None:
        now = utcnow()
        limits = {
            account_key: self.settings.max_failures,
            address_key: self.settings.max_failures_per_address,
        }
        with self._sessionmaker() as session, session.begin():
            # Rows of windows long over are forgotten, so guessing at many
            # accounts cannot grow the table without bound.
            stale = now - self.settings.login_window - self.settings.login_block
            session.execute(
                delete(LoginThrottle).where(
                    LoginThrottle.window_started_at < stale,
                    LoginThrottle.key.not_in(list(limits)),
                )
            )
            for key, limit in limits.items():
                row = session.get(LoginThrottle, key, with_for_update=True)
                if row is None:
                    row = LoginThrottle(key=key, failures=0, window_started_at=now)
                    session.add(row)
                elif now - _aware(row.window_started_at) > self.settings.login_window:
                    row.failures = 0
                    row.window_started_at = now
                    row.blocked_until = None
                row.failures += 1
                if row.failures >= limit:
                    row.blocked_until = now + self.settings.login_block
                session.flush()

    def login_succeeded(self, account_key: str) -> None:
        with self._sessionmaker() as session, session.begin():
            session.execute(
                delete(LoginThrottle).where(LoginThrottle.key == account_key)
            )


def _token_payload(row: ApiToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": _aware(row.created_at).isoformat(),
        "last_used_at": _aware(row.last_used_at).isoformat()
        if row.last_used_at
        else None,
    }


class EdgeStore(Database):
    """The web database, injecting an ``EdgeState`` (also at ``.state``)."""

    def __init__(self) -> None:
        super().__init__(Base)
        self.state: EdgeState | None = None

    def setup(self) -> None:
        super().setup()
        settings = Settings.from_config(self.container.config)
        self.state = EdgeState(self.sessionmaker, settings)  # type: ignore[arg-type]

    def get_dependency(self, worker_ctx: WorkerContext) -> EdgeState:  # type: ignore[override]
        assert self.state is not None
        return self.state

    def worker_teardown(self, worker_ctx: WorkerContext) -> None:
        pass


def find_edge_state(container: Any) -> EdgeState:
    """The container's ``EdgeState``, for code that runs outside a worker."""
    for extension in container.extensions:
        if isinstance(extension, EdgeStore) and extension.state is not None:
            return extension.state
    raise ConfigurationError("the web service needs an EdgeStore dependency")


class Routes(DependencyProvider):
    """Injects the container's routes (the ``route`` entrypoints), for the OpenAPI
    document: it is generated from what is actually served."""

    def get_dependency(self, worker_ctx: WorkerContext) -> list[Any]:
        from services.web.http import Route

        return sorted(
            (e for e in self.container.entrypoints if isinstance(e, Route)),
            key=lambda route: (route.url, route.method),
        )
