"""``framework.database``: the Database provider, its sessions, and transaction_retry.

Unit tests run on SQLite files; the ``integration`` ones on the real PostgreSQL, a
fresh database per module. Eventlet monkey patching comes from the framework's
pytest plugin.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, declarative_base, mapped_column

from framework import concurrency
from framework.containers import ServiceContainer
from framework.database import (
    DATABASE_URL_CONFIG_KEY,
    DB_ENGINE_OPTIONS_KEY,
    DB_URIS_KEY,
    Database,
    DatabaseSession,
    DatabaseUnavailable,
    database_url,
    install_green_psycopg2,
    normalise_url,
    transaction_retry,
)
from framework.exceptions import ConfigurationError
from framework.testing.postgres import fresh_database
from framework.testing.services import dummy, entrypoint_hook


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


# -- helpers ---------------------------------------------------------------------------


def call(container: ServiceContainer, method_name: str, *args: Any) -> Any:
    """Run one worker; its result once its dependencies are torn down."""
    with entrypoint_hook(container, method_name) as hook:
        return hook(*args)


def spawn_call(container: ServiceContainer, method_name: str, *args: Any) -> Any:
    """``call`` in a green thread: ``wait()`` on it for the result."""
    return concurrency.spawn(call, container, method_name, *args)


def provider(container: ServiceContainer) -> Any:
    (found,) = [
        dep
        for dep in container.dependencies
        if isinstance(dep, Database | DatabaseSession)
    ]
    return found


@pytest.fixture
def start(container_factory: Any) -> Any:
    def start(service_cls: type, config: dict[str, Any]) -> ServiceContainer:
        container = container_factory(service_cls, config)
        container.start()
        return container

    return start


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    url = f"sqlite:///{tmp_path}/service.sqlite3"
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


def count_items(url: str) -> int:
    engine = sa.create_engine(normalise_url(url))
    try:
        with engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(Item)
            ).scalar_one()
    finally:
        engine.dispose()


class ItemService:
    name = "items"
    db = Database(Base)

    @dummy
    def add_without_commit(self, name: str) -> None:
        self.db.session.add(Item(name=name))
        self.db.session.flush()

    @dummy
    def add_and_commit(self, name: str) -> None:
        self.db.session.add(Item(name=name))
        self.db.session.commit()

    @dummy
    def add_in_get_session(self, name: str, fail: bool = False) -> None:
        with self.db.get_session() as session:
            session.add(Item(name=name))
            session.flush()
            if fail:
                raise ValueError("business rule broken")

    @dummy
    def load_all(self) -> list[Item]:
        return self.db.session.scalars(sa.select(Item)).all()

    @dummy
    def sessions_seen(self) -> tuple[Any, Any, Any]:
        return self.db.session, self.db.session, self.db.get_session()


# -- configuration ---------------------------------------------------------------------


def test_db_uris_entry_for_the_declarative_base_wins_over_database_url() -> None:
    config = {
        DB_URIS_KEY: {
            "orders:Base": "postgresql://db/orders",
            "orders:Other": "sqlite://",
        },
        DATABASE_URL_CONFIG_KEY: "postgresql://db/fallback",
    }
    assert database_url(config, "orders", "Base") == "postgresql://db/orders"
    assert database_url(config, "orders", "Missing") == "postgresql://db/fallback"


def test_without_configuration_the_database_is_a_sqlite_file_named_after_the_service() -> (
    None
):
    assert database_url({}, "orders", "Base") == "sqlite:///orders.sqlite3"


def test_url_placeholders_name_the_service_and_base_in_both_spellings() -> None:
    config = {
        DATABASE_URL_CONFIG_KEY: "postgresql://u:p{w}d@db/{service_name}_{0[declarative_base_name]}"
    }
    assert (
        database_url(config, "orders", "Base") == "postgresql://u:p{w}d@db/orders_Base"
    )
    untouched = {DATABASE_URL_CONFIG_KEY: "sqlite:///{service_name]}.db"}
    assert database_url(untouched, "orders", "Base") == "sqlite:///{service_name]}.db"


def test_without_a_base_name_the_only_db_uris_entry_of_the_service_is_used() -> None:
    config = {
        DB_URIS_KEY: {"orders:Base": "sqlite:///a.db", "users:Base": "sqlite:///b.db"}
    }
    assert database_url(config, "orders") == "sqlite:///a.db"
    config[DB_URIS_KEY]["orders:Other"] = "sqlite:///c.db"
    with pytest.raises(ConfigurationError, match="several entries"):
        database_url(config, "orders")


def test_a_bare_postgresql_url_means_psycopg2() -> None:
    assert normalise_url("postgresql://db/x").drivername == "postgresql+psycopg2"
    assert normalise_url("postgres://db/x").drivername == "postgresql+psycopg2"
    assert normalise_url("postgresql+pg8000://db/x").drivername == "postgresql+pg8000"


def test_engine_options_from_config_override_the_providers_own(
    start: Any, sqlite_url: str
) -> None:
    class Tuned:
        name = "tuned"
        db = Database(Base, engine_options={"pool_size": 3, "echo": False})

        @dummy
        def noop(self) -> None:
            pass

    container = start(
        Tuned,
        {DATABASE_URL_CONFIG_KEY: sqlite_url, DB_ENGINE_OPTIONS_KEY: {"pool_size": 7}},
    )
    assert provider(container).engine.pool.size() == 7


def test_engine_options_that_are_not_a_mapping_are_a_configuration_error(
    sqlite_url: str,
) -> None:
    container = ServiceContainer(
        ItemService,
        {DATABASE_URL_CONFIG_KEY: sqlite_url, DB_ENGINE_OPTIONS_KEY: "pool_size=7"},
    )
    with pytest.raises(ConfigurationError, match=DB_ENGINE_OPTIONS_KEY):
        container.start()
    container.kill()


def test_legacy_declarative_base_name_keys_db_uris(start: Any, tmp_path: Any) -> None:
    LegacyBase = declarative_base(name="examplebase")

    class Legacy:
        name = "exampleservice"
        db = Database(LegacyBase)

        @dummy
        def url(self) -> str:
            return str(self.db.session.get_bind().url)

    url = f"sqlite:///{tmp_path}/legacy.sqlite3"
    container = start(Legacy, {DB_URIS_KEY: {"exampleservice:examplebase": url}})
    assert call(container, "url") == url


# -- sessions --------------------------------------------------------------------------


def test_worker_session_is_never_committed_for_the_service(
    start: Any, sqlite_url: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    call(container, "add_without_commit", "lost")
    call(container, "add_and_commit", "kept")
    assert [item.name for item in call(container, "load_all")] == ["kept"]


def test_sessions_are_closed_at_worker_teardown(start: Any, sqlite_url: str) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    call(container, "add_and_commit", "kept")
    (item,) = call(container, "load_all")
    worker_session, _, extra_session = call(container, "sessions_seen")
    assert sa.inspect(item).detached
    assert not worker_session.in_transaction() and not list(worker_session)
    assert not extra_session.in_transaction()
    assert provider(container).engine.pool.checkedout() == 0


def test_worker_session_is_opened_once_per_worker_and_get_session_gives_new_ones(
    start: Any, sqlite_url: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    first, again, extra = call(container, "sessions_seen")
    other_worker, _, _ = call(container, "sessions_seen")
    assert first is again
    assert extra is not first
    assert other_worker is not first


def test_get_session_commits_when_the_block_succeeds(
    start: Any, sqlite_url: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    call(container, "add_in_get_session", "kept")
    assert count_items(sqlite_url) == 1


def test_get_session_rolls_back_when_the_block_raises(
    start: Any, sqlite_url: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    with pytest.raises(ValueError, match="business rule broken"):
        call(container, "add_in_get_session", "lost", True)
    assert count_items(sqlite_url) == 0


def test_get_session_rolls_back_and_reraises_when_the_commit_fails(
    start: Any, sqlite_url: str
) -> None:
    class Duplicating:
        name = "duplicating"
        db = Database(Base)

        @dummy
        def add_twice(self) -> bool:
            session = self.db.get_session()
            with pytest.raises(IntegrityError):
                with session:
                    session.add_all([Item(name="same"), Item(name="same")])
            return session.in_transaction()

    container = start(Duplicating, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    assert call(container, "add_twice") is False
    assert count_items(sqlite_url) == 0


def test_get_session_can_close_on_exit(tmp_path: Any) -> None:
    from framework.database import DatabaseWrapper, Session

    engine = sa.create_engine(f"sqlite:///{tmp_path}/wrapper.sqlite3")
    Base.metadata.create_all(engine)
    wrapper = DatabaseWrapper(sa.orm.sessionmaker(bind=engine, class_=Session))
    with wrapper.get_session(close_on_exit=True) as session:
        item = Item(name="closed")
        session.add(item)
    assert sa.inspect(item).detached
    with wrapper.get_session() as session:
        item = Item(name="open")
        session.add(item)
    assert item.id is not None  # still attached: reloaded after the commit
    wrapper.close()
    assert engine.pool.checkedout() == 0


def test_in_memory_sqlite_is_one_database_for_all_workers(start: Any) -> None:
    class Memory:
        name = "memory"
        db = Database(Base)

        @dummy
        def create(self) -> None:
            Base.metadata.create_all(self.db.session.get_bind())

        @dummy
        def add(self, name: str) -> None:
            with self.db.get_session() as session:
                session.add(Item(name=name))

        @dummy
        def count(self) -> int:
            return self.db.session.scalar(sa.select(sa.func.count()).select_from(Item))

    container = start(Memory, {DATABASE_URL_CONFIG_KEY: "sqlite://"})
    call(container, "create")
    for thread in [spawn_call(container, "add", name) for name in ("a", "b")]:
        thread.wait()
    assert call(container, "count") == 2


def test_legacy_database_session_injects_a_session_closed_at_teardown(
    start: Any, sqlite_url: str
) -> None:
    class Legacy:
        name = "legacy"
        session = DatabaseSession(Base)

        @dummy
        def add(self, name: str) -> Any:
            self.session.add(Item(name=name))
            self.session.commit()
            return self.session

    container = start(Legacy, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    session = call(container, "add", "kept")
    assert not session.in_transaction() and not list(session)
    assert count_items(sqlite_url) == 1


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_engine_is_disposed_when_the_container_stops_or_is_killed(
    start: Any, sqlite_url: str, end: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    call(container, "add_and_commit", end)
    closed: list[Any] = []
    sa.event.listen(
        provider(container).engine.pool, "close", lambda *args: closed.append(args)
    )
    getattr(container, end)()
    assert closed, f"pooled connection still open after {end}()"


# -- readiness -------------------------------------------------------------------------


def test_check_passes_when_the_database_answers(start: Any, sqlite_url: str) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    provider(container).check()


def test_check_says_which_database_is_unavailable(start: Any, tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/missing-directory/service.sqlite3"
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: url})
    with pytest.raises(DatabaseUnavailable, match="missing-directory"):
        provider(container).check()


def test_check_before_setup_says_so() -> None:
    with pytest.raises(DatabaseUnavailable, match="not set up"):
        Database(Base).check()


def test_errors_never_carry_the_statements_parameters(
    start: Any, sqlite_url: str
) -> None:
    container = start(ItemService, {DATABASE_URL_CONFIG_KEY: sqlite_url})
    call(container, "add_and_commit", "ann@example.com")

    with pytest.raises(IntegrityError) as caught:
        call(container, "add_and_commit", "ann@example.com")

    assert "ann@example.com" not in str(caught.value)
    assert "hidden due to hide_parameters" in str(caught.value)


# -- transaction_retry -----------------------------------------------------------------


def dropped(invalidated: bool = True) -> OperationalError:
    return OperationalError(
        "SELECT 1",
        {},
        Exception("server closed the connection"),
        connection_invalidated=invalidated,
    )


class DriverError(Exception):
    """A DB-API error carrying a SQLSTATE, as psycopg2's do (``pgcode``)."""

    def __init__(self, pgcode: str) -> None:
        super().__init__(f"SQLSTATE {pgcode}")
        self.pgcode = pgcode


def failed_with(pgcode: str, kind: type[DBAPIError] = OperationalError) -> DBAPIError:
    return kind("UPDATE t SET x = 1", {}, DriverError(pgcode))


class Flaky:
    """Fails with the given errors, then returns ``"done"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, *args: Any) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class RecordingSession:
    def __init__(self, in_transaction: bool = False) -> None:
        self.rollbacks = 0
        self._in_transaction = in_transaction

    def in_transaction(self) -> bool:
        return self._in_transaction

    def rollback(self) -> None:
        self.rollbacks += 1


def test_transaction_retry_bare_retries_once_after_an_operational_error() -> None:
    flaky = Flaky(dropped())
    assert transaction_retry(flaky)() == "done"
    assert flaky.calls == 2

    flaky = Flaky(dropped(), dropped())
    with pytest.raises(OperationalError):
        transaction_retry(flaky)()
    assert flaky.calls == 2


def test_transaction_retry_gives_up_after_total_retries() -> None:
    flaky = Flaky(*[dropped() for _ in range(4)])
    with pytest.raises(OperationalError):
        transaction_retry(total=3)(flaky)()
    assert flaky.calls == 4


@pytest.mark.parametrize(
    "error",
    [
        failed_with("40001"),  # serialization failure
        failed_with("40P01"),  # deadlock detected
        failed_with("08006"),  # connection failure
        failed_with("57P01"),  # the server is shutting down
        # psycopg2 raises a serialization failure as TransactionRollbackError,
        # which SQLAlchemy may wrap as another DBAPIError class.
        failed_with("40001", DBAPIError),
    ],
)
def test_transaction_retry_retries_the_retryable_sqlstates(error: DBAPIError) -> None:
    flaky = Flaky(error)
    assert transaction_retry(total=2)(flaky)() == "done"
    assert flaky.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        ValueError("not a database problem"),
        failed_with("23505", IntegrityError),  # unique violation: would fail again
        failed_with("22003", DataError),  # numeric value out of range
        dropped(invalidated=False),  # no SQLSTATE, connection fine (SQLite's lock)
    ],
)
def test_transaction_retry_leaves_other_errors_alone(error: Exception) -> None:
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        transaction_retry(total=3)(flaky)()
    assert flaky.calls == 1


def test_transaction_retry_rolls_back_the_session_before_every_retry() -> None:
    class Service:
        def __init__(self) -> None:
            self.db = type("Db", (), {"session": RecordingSession()})()

        @transaction_retry(session=operator.attrgetter("db.session"), total=3)
        def work(self) -> str:
            return flaky(self)

    flaky = Flaky(dropped(invalidated=True), failed_with("40P01"), failed_with("40001"))
    service = Service()
    assert service.work() == "done"
    assert service.db.session.rollbacks == 3


def test_transaction_retry_does_not_retry_one_step_of_an_open_transaction() -> None:
    # Rolling back would silently lose the steps before it: the retry belongs
    # around the whole transaction.
    session = RecordingSession(in_transaction=True)
    flaky = Flaky(failed_with("40001"))
    with pytest.raises(OperationalError):
        transaction_retry(session=session, total=3)(flaky)()
    assert (flaky.calls, session.rollbacks) == (1, 0)


def test_transaction_retry_backs_off_exponentially_up_to_the_cap_with_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(concurrency, "sleep", delays.append)
    monkeypatch.setattr(random, "random", lambda: 0.0)
    flaky = Flaky(*[dropped() for _ in range(5)])
    transaction_retry(total=5, backoff_factor=0.1, backoff_max=1.0)(flaky)()
    assert delays == pytest.approx([0, 0.2, 0.4, 0.8, 1.0])

    delays.clear()
    monkeypatch.setattr(random, "random", lambda: 1.0)  # the most jitter: half
    flaky = Flaky(*[dropped() for _ in range(3)])
    transaction_retry(total=3, backoff_factor=0.1)(flaky)()
    assert delays == pytest.approx([0, 0.1, 0.2])


# -- psycopg2 on the hub -----------------------------------------------------------------


def test_green_psycopg2_replaces_eventlets_callback_and_installs_once() -> None:
    install_green_psycopg2()
    installed = psycopg2.extensions.get_wait_callback()
    install_green_psycopg2()
    assert psycopg2.extensions.get_wait_callback() is installed
    assert installed.__module__ == "framework.database"


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database for this module with the tables, dropped afterwards."""
    with fresh_database("test_database") as url:
        engine = sa.create_engine(normalise_url(url))
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url


@pytest.fixture
def pg_items(pg_url: str) -> str:
    engine = sa.create_engine(normalise_url(pg_url))
    with engine.begin() as connection:
        connection.execute(sa.delete(Item))
    engine.dispose()
    return pg_url


def backend_state(pg_url: str, pid: int) -> str | None:
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cursor.fetchone()
    connection.close()
    return row[0] if row else None


def terminate_backend(pg_url: str, pid: int) -> None:
    connection = psycopg2.connect(pg_url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
    connection.close()


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = concurrency.Deadline(timeout)
    while not predicate():
        if deadline.expired():
            raise AssertionError(f"still not true after {timeout}s: {predicate}")
        concurrency.sleep(0.02)


class PgService:
    name = "pgservice"
    db = Database(Base)
    attempts: list[int] = []
    events: dict[str, concurrency.Event] = {}

    @dummy
    def backend_pid_in_open_transaction(self) -> int:
        pid = self.db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        self.events["pid"].send(pid)
        self.events["release"].wait()
        return pid

    @dummy
    def add_and_wait(self, name: str) -> None:
        self.db.session.add(Item(name=name))
        self.db.session.flush()
        self.events["added"].send()
        self.events["release"].wait()
        self.db.session.commit()

    @dummy
    def count(self) -> int:
        return self.db.session.scalar(sa.select(sa.func.count()).select_from(Item))

    @dummy
    def add_in_get_session(self, name: str, fail: bool = False) -> None:
        with self.db.get_session() as session:
            session.add(Item(name=name))
            session.flush()
            if fail:
                raise ValueError("business rule broken")

    @dummy
    @transaction_retry(session=operator.attrgetter("db.session"))
    def add_surviving_a_dropped_connection(self, name: str, pg_url: str) -> int:
        self.attempts.append(1)
        pid = self.db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        if len(self.attempts) == 1:
            terminate_backend(pg_url, pid)
        self.db.session.add(Item(name=name))
        self.db.session.commit()
        return len(self.attempts)

    @dummy
    @transaction_retry(session=operator.attrgetter("db.session"))
    def append_under_repeatable_read(self, item_id: int, suffix: str) -> int:
        self.attempts.append(1)
        session = self.db.session
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        session.execute(sa.text("SELECT count(*) FROM items"))  # takes the snapshot
        if len(self.attempts) == 1:
            self.events["added"].send()
            self.events["release"].wait()
        session.execute(
            sa.text("UPDATE items SET name = name || :suffix WHERE id = :id"),
            {"suffix": suffix, "id": item_id},
        )
        session.commit()
        return len(self.attempts)

    @dummy
    @transaction_retry(session=operator.attrgetter("db.session"))
    def touch_a_then_b(self) -> int:
        self.attempts.append(1)
        session = self.db.session
        if len(self.attempts) == 1:
            # This transaction finds the deadlock first, so it is the victim.
            session.execute(sa.text("SET LOCAL deadlock_timeout = '100ms'"))
        session.execute(sa.text("UPDATE items SET name = name WHERE name = 'a'"))
        if len(self.attempts) == 1:
            self.events["added"].send()
            self.events["release"].wait()
        session.execute(sa.text("UPDATE items SET name = name WHERE name = 'b'"))
        session.commit()
        return len(self.attempts)

    @dummy
    def sleep_in_database(self, seconds: float) -> str:
        self.events["sleeping"].send()
        self.db.session.execute(
            sa.text("SELECT pg_sleep(:seconds)"), {"seconds": seconds}
        )
        return "slow"

    @dummy
    def select_one(self) -> str:
        self.db.session.execute(sa.text("SELECT 1"))
        return "fast"

    @dummy
    def backend_pid_then_sleep(self, seconds: float) -> None:
        pid = self.db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        self.events["pid"].send(pid)
        self.db.session.execute(
            sa.text("SELECT pg_sleep(:seconds)"), {"seconds": seconds}
        )


@pytest.fixture
def pg_container(start: Any, pg_items: str) -> ServiceContainer:
    PgService.attempts = []
    PgService.events = {
        name: concurrency.Event() for name in ("added", "release", "sleeping", "pid")
    }
    return start(PgService, {DATABASE_URL_CONFIG_KEY: pg_items})


@pytest.mark.integration
def test_postgres_transaction_of_the_worker_session_ends_at_teardown(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    worker = spawn_call(pg_container, "backend_pid_in_open_transaction")
    pid = PgService.events["pid"].wait()
    assert backend_state(pg_url, pid) == "idle in transaction"
    PgService.events["release"].send()
    assert worker.wait() == pid
    # The pooled connection stays open, but no longer inside a transaction.
    assert backend_state(pg_url, pid) == "idle"


@pytest.mark.integration
def test_postgres_get_session_commits_or_rolls_back(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    call(pg_container, "add_in_get_session", "kept")
    with pytest.raises(ValueError):
        call(pg_container, "add_in_get_session", "lost", True)
    assert count_items(pg_url) == 1


@pytest.mark.integration
def test_postgres_workers_do_not_see_each_others_uncommitted_work(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    writer = spawn_call(pg_container, "add_and_wait", "pending")
    PgService.events["added"].wait()
    assert call(pg_container, "count") == 0
    PgService.events["release"].send()
    writer.wait()
    assert call(pg_container, "count") == 1


@pytest.mark.integration
def test_transaction_retry_survives_a_connection_terminated_by_the_server(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    attempts = call(
        pg_container, "add_surviving_a_dropped_connection", "survivor", pg_url
    )
    assert attempts == 2
    assert count_items(pg_url) == 1


def insert_items(pg_url: str, *names: str) -> list[int]:
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        ids = []
        for name in names:
            cursor.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))
            ids.append(cursor.fetchone()[0])
    connection.close()
    return ids


def blocked_lock_waits(pg_url: str) -> int:
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        (count,) = cursor.fetchone()
    connection.close()
    return count


@pytest.mark.integration
def test_transaction_retry_reruns_a_real_serialization_failure_in_a_new_transaction(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    (item_id,) = insert_items(pg_url, "item")
    worker = spawn_call(pg_container, "append_under_repeatable_read", item_id, "+a")
    PgService.events["added"].wait()  # its snapshot is taken
    with psycopg2.connect(pg_url) as other, other.cursor() as cursor:
        cursor.execute("UPDATE items SET name = name || '+b' WHERE id = %s", (item_id,))
    other.close()
    PgService.events["release"].send()

    # The first attempt's UPDATE fails with SQLSTATE 40001; the second, in a new
    # transaction with a new snapshot, sees the other change and keeps it.
    assert worker.wait() == 2
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM items WHERE id = %s", (item_id,))
        assert cursor.fetchone() == ("item+b+a",)
    connection.close()


@pytest.mark.integration
def test_transaction_retry_reruns_the_victim_of_a_real_deadlock(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    insert_items(pg_url, "a", "b")
    worker = spawn_call(pg_container, "touch_a_then_b")
    PgService.events["added"].wait()  # the worker holds row a
    other = psycopg2.connect(pg_url)
    try:
        cursor = other.cursor()
        cursor.execute("SET deadlock_timeout = '10s'")  # so it is not the victim
        cursor.execute("UPDATE items SET name = name WHERE name = 'b'")
        PgService.events["release"].send()
        wait_until(lambda: blocked_lock_waits(pg_url) > 0)  # the worker waits for b
        # Waits for a, held by the worker waiting for b: a deadlock, which the
        # worker's transaction detects first and dies of (SQLSTATE 40P01).
        takes_a = concurrency.spawn(
            cursor.execute, "UPDATE items SET name = name WHERE name = 'a'"
        )
        takes_a.wait()
        other.commit()
    finally:
        other.close()

    assert worker.wait() == 2


@pytest.mark.integration
def test_a_worker_waiting_on_postgres_does_not_block_the_other_workers(
    pg_container: ServiceContainer,
) -> None:
    finished: list[str] = []
    slow = spawn_call(pg_container, "sleep_in_database", 2)
    slow.link(lambda thread: finished.append(thread.wait()))
    PgService.events["sleeping"].wait()
    fast = call(pg_container, "select_one")
    finished.append(fast)
    slow.wait()
    assert finished == ["fast", "slow"]


@pytest.mark.integration
def test_killing_a_worker_cancels_its_statement_on_the_server(
    pg_container: ServiceContainer, pg_url: str
) -> None:
    caller = spawn_call(pg_container, "backend_pid_then_sleep", 60)
    pid = PgService.events["pid"].wait()
    wait_until(lambda: backend_state(pg_url, pid) == "active")
    pg_container.kill()
    concurrency.kill(caller)  # its worker is gone; it would only wait to time out
    wait_until(lambda: backend_state(pg_url, pid) != "active")


@pytest.mark.integration
def test_check_against_postgres(start: Any, pg_url: str) -> None:
    container = start(PgService, {DATABASE_URL_CONFIG_KEY: pg_url})
    provider(container).check()
    refused = start(
        ItemService,
        {DATABASE_URL_CONFIG_KEY: "postgresql://postgres@127.0.0.1:1/nowhere"},
    )
    with pytest.raises(DatabaseUnavailable, match="127.0.0.1:1"):
        provider(refused).check()
