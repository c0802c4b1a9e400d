"""SQLAlchemy for services: the ``Database`` dependency provider (nameko-sqlalchemy's API).

Which database a service uses (first match wins)::

    DB_URIS:                       # nameko-sqlalchemy's key, per declarative base
      "orders:Base": postgresql://db/orders
    DATABASE_URL: postgresql://db/orders     # the usual one: one URL per service
    # neither: sqlite:///<service_name>.sqlite3, a file in the working directory

``{service_name}`` and ``{declarative_base_name}`` in a URL are replaced, so one
shared config can give every service its own database
(``DATABASE_URL: postgresql://db/{service_name}``). nameko's spelling
``{0[service_name]}`` works too. ``postgresql://`` means psycopg2.

``DB_ENGINE_OPTIONS`` (a mapping, e.g. ``{pool_size: 20}``) is passed to
``create_engine`` over the provider's ``engine_options``: deployment tunes the pool,
not code.

psycopg2 talks to the server from C (libpq), where monkey patching cannot reach, so
by default a query would block every green thread of the process. When a provider
is set up with a PostgreSQL URL it installs a psycopg2 wait callback that parks the
querying green thread in the eventlet hub instead. That puts psycopg2 in its
asynchronous mode, which does not support ``COPY`` or large objects.
"""

from __future__ import annotations

import functools
import logging
import operator
import random
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy
import sqlalchemy.orm
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from framework import concurrency
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider, Injected
from framework.utils import sanitize_url

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = [
    "DATABASE_URL_CONFIG_KEY",
    "DB_ENGINE_OPTIONS_KEY",
    "DEFAULT_DATABASE_URL",
    "DB_URIS_KEY",
    "Database",
    "DatabaseSession",
    "DatabaseUnavailable",
    "DatabaseWrapper",
    "EngineProvider",
    "Session",
    "create_engine",
    "database_url",
    "engine_options",
    "install_green_psycopg2",
    "is_retryable",
    "normalise_url",
    "sqlstate",
    "transaction_retry",
]

DB_URIS_KEY = "DB_URIS"
DATABASE_URL_CONFIG_KEY = "DATABASE_URL"
DB_ENGINE_OPTIONS_KEY = "DB_ENGINE_OPTIONS"

DEFAULT_DATABASE_URL = "sqlite:///{service_name}.sqlite3"
DEFAULT_CHECK_TIMEOUT = 5.0  # seconds; a readiness probe must answer quickly


class DatabaseUnavailable(Exception):
    """``Database.check()`` could not run ``SELECT 1``; the message says why."""


# -- configuration -------------------------------------------------------------------


_PLACEHOLDER = re.compile(
    r"\{(?:0\[(service_name|declarative_base_name)\]|(service_name|declarative_base_name))\}"
)


def database_url(
    config: dict[str, Any], service_name: str, declarative_base_name: str | None = None
) -> str:
    """The URL a service's database provider (and its migrations) connect to.

    Without ``declarative_base_name`` (migrations given only a ``MetaData``) a
    ``DB_URIS`` entry is used if it is the only one for the service.
    """
    url = _db_uris_entry(config, service_name, declarative_base_name)
    if url is None:
        url = config.get(DATABASE_URL_CONFIG_KEY) or DEFAULT_DATABASE_URL
    names = {
        "service_name": service_name,
        "declarative_base_name": declarative_base_name or "",
    }
    # Only our two placeholders are replaced (nameko ran the whole URL through
    # str.format, which breaks on a password containing a brace).
    return _PLACEHOLDER.sub(
        lambda match: names[match.group(1) or match.group(2)], str(url)
    )


def _db_uris_entry(
    config: dict[str, Any], service_name: str, declarative_base_name: str | None
) -> str | None:
    uris = config.get(DB_URIS_KEY) or {}
    if declarative_base_name is not None:
        return uris.get(f"{service_name}:{declarative_base_name}")
    candidates = [key for key in uris if key.partition(":")[0] == service_name]
    if len(candidates) > 1:
        raise ConfigurationError(
            f"{DB_URIS_KEY} has several entries for service {service_name!r} "
            f"({', '.join(sorted(candidates))}); say which declarative base to use"
        )
    return uris[candidates[0]] if candidates else None


def engine_options(
    config: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``create_engine`` keyword arguments: code defaults, then ``DB_ENGINE_OPTIONS``."""
    from_config = config.get(DB_ENGINE_OPTIONS_KEY) or {}
    if not isinstance(from_config, dict):
        raise ConfigurationError(
            f"{DB_ENGINE_OPTIONS_KEY} must be a mapping of create_engine arguments, "
            f"not {type(from_config).__name__}"
        )
    return {**(defaults or {}), **from_config}


def normalise_url(url: str | URL) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg2, the driver we ship.

    SQLAlchemy 2.1 picked psycopg 3 for a bare ``postgresql://``; it is not
    installed, and the green wait callback below is written for psycopg2.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


def create_engine(url: str | URL, options: dict[str, Any] | None = None) -> Engine:
    """An engine for ``url`` with the framework's defaults under ``options``.

    * server databases get ``pool_pre_ping`` so a connection the server dropped
      while idle in the pool is replaced at checkout instead of failing a worker;
    * an in-memory SQLite database is one shared connection: SQLAlchemy's default
      pool keeps one per thread, and with monkey patching every green thread is a
      thread, so each worker would see its own empty database;
    * PostgreSQL gets the green psycopg2 wait callback;
    * statement parameters are left out of error messages and logs
      (``hide_parameters``): they are emails, password hashes, tokens, and an
      error's text travels to logs and sometimes further.
    """
    parsed = normalise_url(url)
    options = dict(options or {})
    options.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        if _is_memory_sqlite(parsed) and "poolclass" not in options:
            options["poolclass"] = StaticPool
            connect_args = dict(options.get("connect_args") or {})
            connect_args.setdefault("check_same_thread", False)
            options["connect_args"] = connect_args
    else:
        options.setdefault("pool_pre_ping", True)
    if parsed.get_driver_name() == "psycopg2":
        install_green_psycopg2()
    return sqlalchemy.create_engine(parsed, **options)


# -- psycopg2 on the eventlet hub ------------------------------------------------------


def install_green_psycopg2() -> None:
    """Make psycopg2 wait for the server in the hub, not in libpq. Idempotent.

    The callback is process-wide, as psycopg2 offers it. One installed by another
    library (psycogreen, say) is left in place.
    """
    import psycopg2.extensions

    current = psycopg2.extensions.get_wait_callback()
    if current is _wait_green:
        return
    # eventlet.monkey_patch() installs a callback of its own; ours replaces it
    # because it also cancels the statement of a green thread killed mid-query.
    if current is not None and not getattr(current, "__module__", "").startswith(
        "eventlet."
    ):
        log.warning(
            "psycopg2 already has a wait callback; leaving it",
            extra={"callback": repr(current)},
        )
        return
    psycopg2.extensions.set_wait_callback(_wait_green)
    log.debug("installed the green psycopg2 wait callback")


def _wait_green(conn: Any) -> None:
    """psycopg2's wait protocol: ``poll()`` says what the connection waits for."""
    from psycopg2 import OperationalError as DriverOperationalError
    from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

    while True:
        state = conn.poll()
        if state == POLL_OK:
            return
        if state not in (POLL_READ, POLL_WRITE):
            raise DriverOperationalError(f"unexpected psycopg2 poll() state {state!r}")
        try:
            _wait_for(conn, state)
        except BaseException:
            # The green thread is being killed or timed out mid-query. Without a
            # cancel the server keeps running the statement (and holding its locks)
            # until it next writes to the closed socket.
            _cancel(conn)
            raise


def _wait_for(conn: Any, state: int) -> None:
    from psycopg2.extensions import POLL_READ

    if state == POLL_READ:
        concurrency.wait_readable(conn.fileno())
    else:
        concurrency.wait_writable(conn.fileno())


def _cancel(conn: Any) -> None:
    from psycopg2.extensions import POLL_OK

    try:
        conn.cancel()  # blocks briefly: libpq opens a socket to send the cancel
        while (state := conn.poll()) != POLL_OK:
            _wait_for(conn, state)
    except Exception:
        # The cancelled statement ends in an error (or the connection is gone):
        # expected; the caller re-raises what interrupted it.
        pass


# -- sessions --------------------------------------------------------------------------


class Session(sqlalchemy.orm.Session):
    """A session that, used as a context manager, commits or rolls back.

    Leaving the ``with`` block normally commits (and rolls back, re-raising, if the
    commit fails); leaving it with an exception rolls back. It closes on exit only
    if ``close_on_exit`` is set, so objects stay usable after the block; the
    provider closes it at worker teardown either way.
    """

    close_on_exit: bool = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                try:
                    self.commit()
                except BaseException:
                    self.rollback()
                    raise
            else:
                self.rollback()
        finally:
            if self.close_on_exit:
                self.close()


class DatabaseWrapper:
    """What a worker gets as ``self.db``: its session(s) and the engine.

    ``session`` is opened on first use and is never committed for you: call
    ``self.db.session.commit()``, or use ``with self.db.get_session() as session:``.
    Every session it handed out is closed at worker teardown.
    """

    def __init__(self, session_factory: Callable[[], sqlalchemy.orm.Session]) -> None:
        self._session_factory = session_factory
        self._worker_session: sqlalchemy.orm.Session | None = None
        self._sessions: list[sqlalchemy.orm.Session] = []

    @property
    def session(self) -> sqlalchemy.orm.Session:
        if self._worker_session is None:
            self._worker_session = self._session_factory()
        return self._worker_session

    def get_session(self, close_on_exit: bool = False) -> sqlalchemy.orm.Session:
        """A new session; as a context manager it commits or rolls back (``Session``)."""
        session = self._session_factory()
        session.close_on_exit = close_on_exit  # type: ignore[attr-defined]
        self._sessions.append(session)
        return session

    def close(self) -> None:
        sessions = self._sessions
        if self._worker_session is not None:
            sessions = [self._worker_session, *sessions]
        self._worker_session = None
        self._sessions = []
        for session in sessions:
            try:
                session.close()
            except Exception:
                # One broken session (its connection dropped) must not leave the
                # others holding connections.
                log.warning("closing a session failed", exc_info=True)


class EngineProvider(DependencyProvider[Injected]):
    """An engine per container: created in ``setup``, disposed in ``stop``/``kill``.

    The base of every SQL provider. A service-specific store injects its own
    repository object over the worker's session and inherits the engine, the
    teardown and readiness::

        class UserStore(EngineProvider[UserRepository]):
            def get_dependency(self, worker_ctx):
                return UserRepository(self.worker_database(worker_ctx))
    """

    def __init__(
        self,
        declarative_base: Any,
        session_options: dict[str, Any] | None = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.declarative_base = declarative_base
        self.session_options = session_options or {}
        self.engine_options = engine_options or {}
        self.url: str | None = None
        self.engine: Engine | None = None
        self.sessionmaker: sqlalchemy.orm.sessionmaker | None = None
        # What each live worker was given, to close at its teardown. Weak, so a
        # worker that never reaches teardown (killed hard) is not kept alive.
        self._given: weakref.WeakKeyDictionary[WorkerContext, DatabaseWrapper] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def declarative_base_name(self) -> str:
        return self.declarative_base.__name__

    def setup(self) -> None:
        config = self.container.config
        service_name = self.container.service_name
        self.url = database_url(config, service_name, self.declarative_base_name)
        self.engine = create_engine(
            self.url, engine_options(config, self.engine_options)
        )
        self.sessionmaker = sqlalchemy.orm.sessionmaker(
            bind=self.engine, class_=Session, **self.session_options
        )
        log.info(
            "database configured",
            extra={"service": service_name, "url": sanitize_url(str(self.url))},
        )

    def stop(self) -> None:
        self._dispose()

    def kill(self) -> None:
        self._dispose()

    def _dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    def worker_database(self, worker_ctx: WorkerContext) -> DatabaseWrapper:
        """The worker's ``DatabaseWrapper``, made on first use, closed at teardown.

        One per worker, so everything in a worker that asks for it (the injected
        repository, an outbox dispatcher) shares ``session`` and its transaction.
        """
        wrapper = self._given.get(worker_ctx)
        if wrapper is None:
            wrapper = DatabaseWrapper(self.sessionmaker)  # type: ignore[arg-type]
            self._given[worker_ctx] = wrapper
        return wrapper

    def worker_teardown(self, worker_ctx: WorkerContext) -> None:
        wrapper = self._given.pop(worker_ctx, None)
        if wrapper is not None:
            wrapper.close()

    def health_check(self) -> tuple[bool, str]:
        """Readiness (``framework.health``): does the database answer ``SELECT 1``?"""
        try:
            self.check()
        except DatabaseUnavailable as exc:
            return False, str(exc)
        return True, "SELECT 1 answered"

    def check(self, timeout: float | None = DEFAULT_CHECK_TIMEOUT) -> None:
        """Run ``SELECT 1``; raise ``DatabaseUnavailable`` unless it answers in time.

        For readiness probes. It borrows a pooled connection, so a pool exhausted
        by busy workers for longer than ``timeout`` also reports unavailable.
        """
        if self.engine is None:
            raise DatabaseUnavailable(f"{self!r} is not set up")
        url = sanitize_url(str(self.url))
        timer = concurrency.Timeout(timeout)
        try:
            with self.engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT 1"))
        except concurrency.Timeout as exc:
            if exc is not timer:
                raise
            raise DatabaseUnavailable(
                f"{url}: no answer to SELECT 1 within {timeout}s"
            ) from None
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"{url}: {exc}") from exc
        finally:
            timer.cancel()


# The name before EngineProvider was public.
_EngineProvider = EngineProvider


class Database(EngineProvider[DatabaseWrapper]):
    """Injects a ``DatabaseWrapper``: ``self.db.session``, ``self.db.get_session()``."""

    def get_dependency(self, worker_ctx: WorkerContext) -> DatabaseWrapper:
        return self.worker_database(worker_ctx)


class DatabaseSession(EngineProvider[sqlalchemy.orm.Session]):
    """nameko-sqlalchemy's older provider: injects a plain session, closed at teardown."""

    def get_dependency(self, worker_ctx: WorkerContext) -> sqlalchemy.orm.Session:
        return self.worker_database(worker_ctx).session


# -- retrying transient failures ----------------------------------------------------------

# Failures PostgreSQL documents as "retry the transaction": a serialization failure
# (REPEATABLE READ / SERIALIZABLE) and a deadlock victim. Connection trouble is
# told by SQLAlchemy (``connection_invalidated``) or by SQLSTATE class 08 and the
# server going away (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot
# connect now).
SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset(
    {SERIALIZATION_FAILURE, DEADLOCK_DETECTED, "57P01", "57P02", "57P03"}
)
CONNECTION_EXCEPTION_CLASS = "08"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (PostgreSQL's ``pgcode``), if it has one."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_retryable(exc: BaseException) -> bool:
    """Whether running the transaction again may succeed: a lost connection, a
    serialization failure or a deadlock. Constraint violations, bad data and
    programming errors would fail the same way again."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = sqlstate(exc)
    if code is None:
        return False
    return code in RETRYABLE_SQLSTATES or code.startswith(CONNECTION_EXCEPTION_CLASS)


def transaction_retry(
    wrapped: Callable[..., Any] | None = None,
    session: Any = None,
    total: int = 1,
    backoff_factor: float = 0,
    backoff_max: float | None = None,
) -> Any:
    """Run the decorated function again when its transaction fails transiently.

    Retries what ``is_retryable`` says may succeed the next time (a connection
    lost, a serialization failure, a deadlock) up to ``max(total, 1)`` times; any
    other error is raised at once. Before each retry ``session`` (a session, or
    ``operator.attrgetter("db.session")`` applied to the first argument, the
    service instance) is rolled back, so the retry runs in a fresh transaction:
    after a deadlock or serialization failure PostgreSQL refuses every statement
    of the aborted one. The first retry runs at once, later ones after
    ``backoff_factor * 2 ** (n - 1)`` seconds (capped at ``backoff_max``), each
    with up to 50% random jitter so that two transactions that deadlocked each
    other do not collide again in step.

    The whole function runs again: keep other effects (calls, events not in the
    outbox) out of it. When ``session`` already has a transaction open on entry,
    the function is one step of a larger transaction whose earlier steps a
    rollback would lose, so it runs without retrying: the retry belongs around
    the whole transaction. Usable bare (``@transaction_retry``) or with arguments.
    """
    if wrapped is None:
        return functools.partial(
            transaction_retry,
            session=session,
            total=total,
            backoff_factor=backoff_factor,
            backoff_max=backoff_max,
        )

    @functools.wraps(wrapped)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        resolved = _resolve_session(session, args)
        if resolved is not None and resolved.in_transaction():
            return wrapped(*args, **kwargs)
        retries = max(total, 1)
        attempt = 0
        while True:
            try:
                return wrapped(*args, **kwargs)
            except DBAPIError as exc:
                if attempt >= retries or not is_retryable(exc):
                    raise
                attempt += 1
                log.warning(
                    "transaction failed transiently, retrying",
                    extra={
                        "function": getattr(wrapped, "__qualname__", repr(wrapped)),
                        "attempt": attempt,
                        "error_type": type(exc.orig).__name__,
                        "sqlstate": sqlstate(exc),
                        "connection_invalidated": exc.connection_invalidated,
                    },
                )
                if resolved is not None:
                    _rollback(resolved)
                concurrency.sleep(
                    _jittered(_backoff(attempt, backoff_factor, backoff_max))
                )

    return retrying


def _resolve_session(session: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(session, operator.attrgetter):
        return session(args[0]) if args else None
    return session


def _rollback(session: Any) -> None:
    try:
        session.rollback()
    except SQLAlchemyError:
        # The connection is gone: the rollback cannot reach the server, which
        # has ended the transaction with the connection. The session is reset.
        log.debug("rollback before a retry failed", exc_info=True)


def _backoff(attempt: int, factor: float, maximum: float | None) -> float:
    if attempt <= 1:
        return 0.0
    delay = factor * 2 ** (attempt - 1)
    return delay if maximum is None else min(delay, maximum)


def _jittered(delay: float) -> float:
    return delay * (1 - random.random() / 2) if delay else 0.0
