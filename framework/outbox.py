"""Events that cannot be lost: a transactional outbox.

``EventDispatcher`` publishes at once, so a service that commits and then
dispatches loses the event if it dies in between, and fails a call whose change
is already committed if the broker is down. ``OutboxDispatcher`` injects the same
``dispatch(event_type, event_data)``, but inside a database worker it only inserts
the event into an outbox table, in the worker's own transaction: the event is
recorded if and only if the change is committed. An ``OutboxRelay`` in the same
service then publishes committed events to ``<service>.events`` with publisher
confirms and marks them sent::

    # models.py
    class Base(DeclarativeBase): ...
    outbox_table(Base.metadata)

    # migrations/versions/xxxx_outbox.py
    def upgrade() -> None:
        create_outbox_table(op)

    # service.py
    class Service:
        db = Database(Base)
        dispatch = OutboxDispatcher(aggregate=lambda event_type, data: data["id"])

        @rpc
        def rename(self, item_id, name):
            item = self.db.session.get(Item, item_id)
            item.name = name
            self.dispatch("item_renamed", {"id": item_id, "name": name})
            self.db.session.commit()   # the change and its event, together

The events go into the worker's session (``self.db.session``, the one a
``UserStore``-like provider's repository uses too), never into a session from
``get_session()``.

Guarantees, and their price:

* at least once: a crash after publishing but before marking the row sent
  publishes it again, so every message carries the event's id in the
  ``nameko.event_id`` header (in the handler's context data as ``event_id``) for
  handlers to skip duplicates;
* in order per aggregate: events with the same aggregate key are published in
  the order their rows were inserted, one aggregate's next event only after its
  previous one is marked sent; events without an aggregate have no order;
* one publisher per row: relays of several replicas take rows with
  ``FOR UPDATE SKIP LOCKED``, so they share the work and never publish the same
  row at the same time;
* latency: a committed event is published at once by the relay of the replica
  that committed it (woken by the commit), or at the next poll
  (``OUTBOX_POLL_INTERVAL`` seconds) by any replica after a failure.

The event is in the worker's transaction, so it is dispatched only if the worker
commits: a worker that rolls back, or never commits, dispatches nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy
import sqlalchemy.orm
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from framework import concurrency, serialization
from framework.amqp.connection import CONNECTION_ERRORS
from framework.constants import EVENT_ID_CONTEXT_KEY, PERSISTENT
from framework.contextdata import ContextDataProvider
from framework.database import EngineProvider
from framework.events import get_event_exchange
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider, SharedExtension
from framework.messaging import ContainerPublisher, HeaderEncoder

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = [
    "EVENT_ID_CONTEXT_KEY",
    "EVENT_ID_HEADER",
    "EventId",
    "OutboxDispatcher",
    "OutboxRelay",
    "create_outbox_table",
    "drop_outbox_table",
    "outbox_table",
]

DEFAULT_OUTBOX_TABLE = "outbox"
# The header handlers deduplicate on; ``nameko.``-prefixed, so it reaches a
# handler's context data (``worker_ctx.data["event_id"]``) in nameko and here.
EVENT_ID_HEADER = f"nameko.{EVENT_ID_CONTEXT_KEY}"

OUTBOX_POLL_INTERVAL_CONFIG_KEY = "OUTBOX_POLL_INTERVAL"
OUTBOX_BATCH_SIZE_CONFIG_KEY = "OUTBOX_BATCH_SIZE"
OUTBOX_RETENTION_CONFIG_KEY = "OUTBOX_RETENTION"
DEFAULT_POLL_INTERVAL = 1.0  # seconds
DEFAULT_BATCH_SIZE = 100
DEFAULT_RETENTION = 7 * 24 * 3600.0  # seconds a sent row is kept, for inspection
MAX_RETRY_DELAY = 30.0  # seconds between attempts while the broker or database is down
# A row the broker refuses while the connection is fine (a header it cannot encode,
# say) is tried again after this many seconds, doubling up to ``MAX_REFUSED_DELAY``;
# meanwhile the other aggregates' rows go out, and its own aggregate's wait.
FIRST_REFUSED_DELAY = 1.0
MAX_REFUSED_DELAY = 600.0
STOP_GRACE = 5.0  # seconds a stopping relay may take to finish its batch
PURGE_INTERVAL = 600.0  # seconds between deletions of rows older than the retention

# For crash tests only: the process SIGKILLs itself right after a transaction
# holding outbox rows commits, before any relay could publish them.
CRASH_AFTER_COMMIT_ENV = "FRAMEWORK_TEST_CRASH_AFTER_OUTBOX_COMMIT"

_SESSION_FLAG = "framework.outbox.relays"


# -- the table ----------------------------------------------------------------------------


def _columns() -> list[Any]:
    return [
        # BIGINT on PostgreSQL; SQLite autoincrements only an INTEGER key.
        Column(
            "id",
            BigInteger().with_variant(Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("event_type", String(255), nullable=False),
        # Events with the same aggregate are published in the order of ``id``.
        Column("aggregate", String(255), nullable=True),
        Column("body", LargeBinary(), nullable=False),
        Column("content_type", String(255), nullable=False),
        Column("content_encoding", String(64), nullable=False),
        # The dispatching worker's context headers (call id stack...), as JSON.
        Column("headers", Text(), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True),
    ]


def _index_name(name: str) -> str:
    return f"ix_{name}_unsent"


def outbox_table(metadata: MetaData, name: str = DEFAULT_OUTBOX_TABLE) -> Table:
    """Declare the outbox table in a service's metadata (next to its models), so
    its migrations and the drift check know it. Returns the existing one if the
    metadata has it already."""
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        *_columns(),
        # The relay's query: unsent rows (sent_at IS NULL) in id order.
        Index(_index_name(name), "sent_at", "id"),
    )


def create_outbox_table(op: Any, name: str = DEFAULT_OUTBOX_TABLE) -> None:
    """In an alembic revision's ``upgrade()``: create the outbox table (``op`` is
    ``alembic.op``), exactly as ``outbox_table`` declares it."""
    op.create_table(name, *_columns())
    op.create_index(_index_name(name), name, ["sent_at", "id"])


def drop_outbox_table(op: Any, name: str = DEFAULT_OUTBOX_TABLE) -> None:
    """In a revision's ``downgrade()``: the reverse of ``create_outbox_table``."""
    op.drop_index(_index_name(name), table_name=name)
    op.drop_table(name)


# -- dispatching into the outbox ------------------------------------------------------------


class OutboxRelay(SharedExtension):
    """Publishes a container's committed outbox rows, then marks them sent.

    One per container and outbox table. It runs in a background thread from
    container start: woken by each commit that wrote events, and every
    ``OUTBOX_POLL_INTERVAL`` seconds for rows left by others (a replica that
    died, a publish that failed).
    """

    container_publisher = ContainerPublisher()

    def __init__(self, table_name: str = DEFAULT_OUTBOX_TABLE) -> None:
        self.table_name = table_name
        self.database: EngineProvider[Any] | None = None
        self.table: Table | None = None
        self._wake = concurrency.Event()
        self._stopping = False
        self._thread: concurrency.GreenThread | None = None
        self._last_purge = 0.0
        # Rows the broker refused: id -> (refusals so far, monotonic time of the
        # next try). Bounded by the rows that are broken, which an operator fixes.
        self._refused: dict[int, tuple[int, float]] = {}

    @property
    def sharing_key(self) -> Any:
        return (type(self), self.table_name)

    def attach(self, database: EngineProvider[Any], table: Table) -> None:
        """Called by each dispatcher at setup: what to read and where."""
        if self.database is not None and self.database is not database:
            raise ConfigurationError(
                f"outbox table {self.table_name!r} is used with two databases; "
                "give each its own table name"
            )
        self.database, self.table = database, table

    def setup(self) -> None:
        config = self.container.config
        self.poll_interval = float(
            config.get(OUTBOX_POLL_INTERVAL_CONFIG_KEY, DEFAULT_POLL_INTERVAL)
        )
        self.batch_size = int(
            config.get(OUTBOX_BATCH_SIZE_CONFIG_KEY, DEFAULT_BATCH_SIZE)
        )
        self.retention = float(
            config.get(OUTBOX_RETENTION_CONFIG_KEY, DEFAULT_RETENTION)
        )
        self.exchange = get_event_exchange(self.container.service_name, config)

    def start(self) -> None:
        if self.database is None:
            return  # no dispatcher registered: nothing to relay
        self._stopping = False
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier=f"outbox relay ({self.table_name})"
        )

    def stop(self) -> None:
        # The batch under way may finish (a row published but not yet marked
        # would be published again); rows not yet published stay in the table
        # for the next start or another replica: stopping loses nothing.
        self._stopping = True
        self.wake()
        if self._thread is not None:
            try:
                with concurrency.Timeout(STOP_GRACE, False):
                    self._thread.wait()
            except Exception:
                pass  # the container logs a managed thread's error itself
            concurrency.kill(self._thread)
            self._thread = None

    def kill(self) -> None:
        self._stopping = True
        if self._thread is not None:
            concurrency.kill(self._thread)
            self._thread = None

    def wake(self) -> None:
        if not self._wake.ready():
            self._wake.send()

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                published = self.relay_once()
            except Exception as exc:
                failures += 1
                delay = min(self.poll_interval * 2 ** (failures - 1), MAX_RETRY_DELAY)
                log.warning(
                    "outbox relay failed; its rows stay unsent and are retried",
                    extra={
                        "service": self.container.service_name,
                        "table": self.table_name,
                        "error_type": type(exc).__name__,
                        "retry_in": delay,
                    },
                )
                self._sleep(delay)
                continue
            failures = 0
            if published < self.batch_size:
                self._sleep(self.poll_interval)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        if self._wake.ready():
            self._wake = concurrency.Event()

    def relay_once(self) -> int:
        """Publish one batch of unsent rows and mark them sent; how many."""
        assert self.database is not None and self.table is not None
        table = self.table
        engine = self.database.engine
        if engine is None:
            return 0
        earlier = table.alias("earlier")
        # Only the first unsent row of each aggregate: a later one waits until
        # its predecessor is marked sent, even when another replica holds it.
        first_of_its_aggregate = table.c.aggregate.is_(
            None
        ) | ~sqlalchemy.exists().where(
            earlier.c.aggregate == table.c.aggregate,
            earlier.c.sent_at.is_(None),
            earlier.c.id < table.c.id,
        )
        now = time.monotonic()
        waiting = [row_id for row_id, (_, at) in self._refused.items() if at > now]
        query = (
            sqlalchemy.select(table)
            .where(table.c.sent_at.is_(None), first_of_its_aggregate)
            .where(table.c.id.not_in(waiting))
            .order_by(table.c.id)
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)
        )
        published: list[int] = []
        with engine.connect() as connection:
            with connection.begin():
                rows = connection.execute(query).all()
                try:
                    for row in rows:
                        if self._publish_or_set_aside(row):
                            published.append(row.id)
                finally:
                    # What went out is marked even if a later row failed, so it
                    # is not published twice.
                    if published:
                        connection.execute(
                            table.update()
                            .where(table.c.id.in_(published))
                            .values(sent_at=datetime.now(UTC))
                        )
            self._purge(connection)
        if published:
            log.debug(
                "outbox rows published",
                extra={"service": self.container.service_name, "count": len(published)},
            )
        return len(published)

    def _publish_or_set_aside(self, row: Any) -> bool:
        """Publish ``row``; whether it went out.

        A lost connection ends the batch (the relay's loop backs off and retries
        it all). Anything else is this row's own problem: it stays unsent, is
        logged once per try at ERROR (its id and type, never its data) and tried
        again later with a growing delay, while the rows of other aggregates go
        out; the later rows of its own aggregate wait for it, in order.
        """
        try:
            self._publish(row)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - the row's, not the relay's
            refusals = self._refused.get(row.id, (0, 0.0))[0] + 1
            delay = min(FIRST_REFUSED_DELAY * 2 ** (refusals - 1), MAX_REFUSED_DELAY)
            self._refused[row.id] = (refusals, time.monotonic() + delay)
            log.error(
                "outbox row could not be published; it stays unsent, and its "
                "aggregate's later events wait for it",
                extra={
                    "service": self.container.service_name,
                    "table": self.table_name,
                    "row_id": row.id,
                    "event_type": row.event_type,
                    "error_type": type(exc).__name__,
                    "refusals": refusals,
                    "retry_in": delay,
                },
            )
            return False
        self._refused.pop(row.id, None)
        return True

    def _publish(self, row: Any) -> None:
        headers = {**json.loads(row.headers), EVENT_ID_HEADER: row.event_id}
        self.container_publisher.publisher.publish_encoded(
            row.body,
            content_type=row.content_type,
            content_encoding=row.content_encoding,
            exchange=self.exchange.name,
            routing_key=row.event_type,
            headers=headers,
            declare=[] if self.exchange.no_declare else [self.exchange],
            delivery_mode=PERSISTENT,
            # The relay's own loop retries, with the row still unsent.
            retry=False,
        )

    def _purge(self, connection: sqlalchemy.Connection) -> None:
        now = time.monotonic()
        if now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        assert self.table is not None
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention)
        with connection.begin():
            connection.execute(
                self.table.delete().where(
                    self.table.c.sent_at.is_not(None), self.table.c.sent_at < cutoff
                )
            )


class OutboxDispatcher(DependencyProvider[Callable[..., None]], HeaderEncoder):
    """Injects ``dispatch(event_type, event_data)`` writing to the outbox table in
    the worker's database transaction (see the module's docstring).

    ``database`` names the service's database provider attribute when it has
    several; ``aggregate(event_type, event_data)`` returns the key whose events
    must keep their order (e.g. the user's id), or ``None``.
    """

    def __init__(
        self,
        database: str | None = None,
        aggregate: Callable[[str, Any], Any] | None = None,
        table_name: str = DEFAULT_OUTBOX_TABLE,
    ) -> None:
        self.database_attr = database
        self.aggregate = aggregate
        self.table_name = table_name
        self.relay = OutboxRelay(table_name)
        self.database: EngineProvider[Any] | None = None
        self.table: Table | None = None

    def setup(self) -> None:
        self.database = self._find_database()
        metadata = self.database.declarative_base.metadata
        table = metadata.tables.get(self.table_name)
        if table is None:
            raise ConfigurationError(
                f"{self.container.service_name}: no {self.table_name!r} table in "
                f"{self.database.declarative_base_name}'s metadata; declare it with "
                "framework.outbox.outbox_table(Base.metadata) and create it in a "
                "migration with create_outbox_table(op)"
            )
        self.table = table
        self.relay.attach(self.database, table)

    def _find_database(self) -> EngineProvider[Any]:
        candidates = [
            dependency
            for dependency in self.container.dependencies
            if isinstance(dependency, EngineProvider)
            and (
                self.database_attr is None or dependency.attr_name == self.database_attr
            )
        ]
        if len(candidates) != 1:
            wanted = f" named {self.database_attr!r}" if self.database_attr else ""
            raise ConfigurationError(
                f"{self.container.service_name}: an OutboxDispatcher needs exactly one "
                f"database provider{wanted} on the service, found {len(candidates)}"
            )
        return candidates[0]

    def get_dependency(self, worker_ctx: WorkerContext) -> Callable[..., None]:
        def dispatch(event_type: str, event_data: Any) -> None:
            assert self.database is not None and self.table is not None
            session = self.database.worker_database(worker_ctx).session
            content_type, content_encoding, body = serialization.dumps(
                event_data, self.container.serializer
            )
            if isinstance(body, str):
                body = body.encode(content_encoding or "utf-8")
            aggregate = (
                None
                if self.aggregate is None
                else self.aggregate(event_type, event_data)
            )
            session.execute(
                self.table.insert().values(
                    event_id=str(uuid.uuid4()),
                    event_type=event_type,
                    aggregate=None if aggregate is None else str(aggregate),
                    body=body,
                    content_type=content_type,
                    content_encoding=content_encoding or "binary",
                    headers=json.dumps(
                        self.get_message_headers(worker_ctx), default=str
                    ),
                    created_at=datetime.now(UTC),
                )
            )
            self._wake_relay_after_commit(session)

        return dispatch

    def _wake_relay_after_commit(self, session: sqlalchemy.orm.Session) -> None:
        relays = session.info.get(_SESSION_FLAG)
        if relays is None:
            relays = session.info[_SESSION_FLAG] = set()
            sqlalchemy.event.listen(session, "after_commit", _after_commit)
            sqlalchemy.event.listen(session, "after_rollback", _after_rollback)
        relays.add(self.relay)


def _after_commit(session: sqlalchemy.orm.Session) -> None:
    relays = session.info.get(_SESSION_FLAG) or set()
    if not relays:
        return
    if os.environ.get(CRASH_AFTER_COMMIT_ENV) == "1":
        log.critical(
            "crashing after an outbox commit, as %s asks", CRASH_AFTER_COMMIT_ENV
        )
        os.kill(os.getpid(), signal.SIGKILL)
    for relay in relays:
        relay.wake()
    relays.clear()


def _after_rollback(session: sqlalchemy.orm.Session) -> None:
    relays = session.info.get(_SESSION_FLAG)
    if relays:
        relays.clear()


class EventId(ContextDataProvider):
    """For an event handler: the id of the event being handled (``None`` for
    events not sent through an outbox), to recognise a redelivered duplicate."""

    context_key = EVENT_ID_CONTEXT_KEY
