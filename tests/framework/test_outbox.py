"""``framework.outbox``: events written in the worker's transaction, published by
the relay once committed.

On the real PostgreSQL (a fresh database for the module) and the real RabbitMQ (a
vhost per test); a broker outage is a TCP proxy we cut, as the users service's
readiness tests do. The crash between commit and publish (``kill -9``) is tested
on the users service as a process (``tests/services/users/test_outbox.py``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from framework.containers import ServiceContainer
from framework.database import DATABASE_URL_CONFIG_KEY, Database, normalise_url
from framework.events import event_handler
from framework.exceptions import ConfigurationError
from framework.outbox import (
    EVENT_ID_HEADER,
    OUTBOX_POLL_INTERVAL_CONFIG_KEY,
    EventId,
    OutboxDispatcher,
    outbox_table,
)
from framework.testing.postgres import fresh_database
from framework.testing.services import dummy, entrypoint_hook, entrypoint_waiter
from tests.helpers import TcpProxy, wait_for


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


outbox = outbox_table(Base.metadata)


def item_of(event_type: str, event_data: dict[str, Any]) -> str:
    return event_data["item"]


class Shop:
    name = "shop"
    db = Database(Base)
    dispatch = OutboxDispatcher(aggregate=item_of)

    @dummy
    def add(self, name: str, fail: bool = False) -> None:
        self.db.session.add(Item(name=name))
        self.dispatch("item_added", {"item": name, "n": 0})
        if fail:
            raise ValueError("business rule broken")
        self.db.session.commit()

    @dummy
    def event(self, item: str, n: int) -> None:
        self.dispatch("item_changed", {"item": item, "n": n})
        self.db.session.commit()


class ShopListener:
    name = "shop_listener"
    event_id = EventId()

    @event_handler("shop", "item_added")
    def on_item_added(self, payload: dict[str, Any]) -> str | None:
        return self.event_id


class NoOutboxBase(DeclarativeBase):
    pass


class Forgetful:
    name = "forgetful"
    db = Database(NoOutboxBase)
    dispatch = OutboxDispatcher()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database for this module with the tables, dropped afterwards."""
    with fresh_database("test_outbox") as url:
        engine = sa.create_engine(normalise_url(url))
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url


@pytest.fixture
def pg_shop(pg_url: str) -> str:
    """The module's database with empty tables."""
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute("TRUNCATE items, outbox RESTART IDENTITY")
    connection.close()
    return pg_url


@pytest.fixture
def shop_config(rabbit_config: dict[str, Any], pg_shop: str) -> dict[str, Any]:
    return {
        **rabbit_config,
        DATABASE_URL_CONFIG_KEY: pg_shop,
        OUTBOX_POLL_INTERVAL_CONFIG_KEY: 0.05,
    }


@pytest.fixture
def start(container_factory: Any) -> Any:
    def start(config: dict[str, Any]) -> ServiceContainer:
        container = container_factory(Shop, config)
        container.start()
        return container

    return start


@pytest.fixture
def broker_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(5672)
    yield proxy
    proxy.close()


def call(container: ServiceContainer, method_name: str, *args: Any) -> Any:
    with entrypoint_hook(container, method_name) as hook:
        return hook(*args)


def outbox_rows(pg_url: str, key: str = "event_type") -> list[tuple[Any, bool]]:
    """``(key, sent)`` of every row (``key`` a column name), oldest first."""
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT {key}, sent_at IS NOT NULL FROM outbox ORDER BY id")
        rows = cursor.fetchall()
    connection.close()
    return rows


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}"))


def test_an_event_is_published_once_its_transaction_commits(
    start: Any,
    shop_config: dict[str, Any],
    spy: Any,
    pg_shop: str,
    container_factory: Any,
) -> None:
    listener = spy("shop.events", "item_added")
    handler = container_factory(ShopListener, shop_config)
    handler.start()
    # A poll far beyond the wait below: the commit itself wakes the relay.
    container = start({**shop_config, OUTBOX_POLL_INTERVAL_CONFIG_KEY: 600})

    with entrypoint_waiter(handler, "on_item_added", timeout=10) as handled:
        call(container, "add", "apple")

    message = listener.get()
    assert json.loads(message.body) == {"item": "apple", "n": 0}
    assert message.delivery_info["routing_key"] == "item_added"
    # Handlers deduplicate on it: a uuid, in their context data as event_id.
    assert uuid.UUID(message.headers[EVENT_ID_HEADER])
    assert handled.get() == message.headers[EVENT_ID_HEADER]
    assert message.properties["delivery_mode"] == 2  # persistent
    wait_for(lambda: outbox_rows(pg_shop) == [("item_added", True)])


def test_a_rolled_back_transaction_leaves_no_event(
    start: Any, shop_config: dict[str, Any], pg_shop: str
) -> None:
    container = start(shop_config)

    with pytest.raises(ValueError):
        call(container, "add", "apple", True)

    assert outbox_rows(pg_shop) == []


def test_an_event_committed_while_the_broker_is_down_is_published_when_it_returns(
    start: Any,
    shop_config: dict[str, Any],
    spy: Any,
    pg_shop: str,
    broker_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = spy("shop.events", "item_added")  # straight to the broker
    container = start(
        {**shop_config, "AMQP_URI": through(broker_proxy, shop_config["AMQP_URI"])}
    )
    broker_proxy.cut()

    call(container, "add", "apple")  # the call succeeds: its change is committed

    wait_for(
        lambda: any("outbox relay failed" in r.getMessage() for r in caplog.records),
        timeout=20,
    )
    assert outbox_rows(pg_shop) == [("item_added", False)]
    broker_proxy.restore()

    assert json.loads(listener.get(timeout=30).body) == {"item": "apple", "n": 0}
    wait_for(lambda: outbox_rows(pg_shop) == [("item_added", True)])


def test_replicas_share_the_rows_without_duplicates_in_order_per_aggregate(
    start: Any, shop_config: dict[str, Any], spy: Any
) -> None:
    listener = spy("shop.events", "item_changed")
    replicas = [start(shop_config), start(shop_config)]
    items = ("x", "y", "z")
    rounds = 10

    for n in range(rounds):
        for index, item in enumerate(items):
            call(replicas[(n + index) % 2], "event", item, n)

    received = [listener.get(timeout=10) for _ in range(rounds * len(items))]
    event_ids = [message.headers[EVENT_ID_HEADER] for message in received]
    assert len(set(event_ids)) == len(event_ids)
    for item in items:
        sequence = [
            body["n"]
            for body in (json.loads(message.body) for message in received)
            if body["item"] == item
        ]
        assert sequence == list(range(rounds))


def test_a_dispatcher_without_its_table_in_the_models_stops_the_start(
    container_factory: Any, tmp_path: Any
) -> None:
    container = container_factory(
        Forgetful, {DATABASE_URL_CONFIG_KEY: f"sqlite:///{tmp_path}/db.sqlite3"}
    )

    with pytest.raises(ConfigurationError, match="outbox_table"):
        container.start()


def test_outbox_log_lines_carry_no_event_data(
    start: Any, shop_config: dict[str, Any], spy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="framework.outbox")
    listener = spy("shop.events", "item_added")
    container = start(shop_config)

    call(container, "add", "secret-apple")
    listener.get()

    assert "secret-apple" not in caplog.text


def insert_row(pg_url: str, aggregate: str, headers: str, event_type: str) -> int:
    """An outbox row written as a dispatcher would, with the given headers."""
    with psycopg2.connect(pg_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox (event_id, event_type, aggregate, body, content_type,"
            " content_encoding, headers, created_at) VALUES (%s, %s, %s, %s,"
            " 'application/json', 'utf-8', %s, now()) RETURNING id",
            (
                str(uuid.uuid4()),
                event_type,
                aggregate,
                json.dumps({"item": aggregate, "n": 0}).encode(),
                headers,
            ),
        )
        (row_id,) = cursor.fetchone()
    connection.close()
    return int(row_id)


def test_a_row_the_broker_can_never_take_holds_up_only_its_own_aggregate(
    start: Any,
    shop_config: dict[str, Any],
    spy: Any,
    pg_shop: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An AMQP header table cannot carry an integer beyond 64 bits: this row can
    # never be published, however often it is tried.
    poison = insert_row(
        pg_shop, "pear", '{"nameko.big": 1180591620717411303424}', "item_added"
    )
    behind_poison = insert_row(pg_shop, "pear", "{}", "item_changed")
    listener = spy("shop.events", "item_added")
    container = start(shop_config)

    call(container, "add", "apple")

    assert json.loads(listener.get(timeout=10).body) == {"item": "apple", "n": 0}
    wait_for(
        lambda: any(
            record.levelno == logging.ERROR and "outbox row" in record.getMessage()
            for record in caplog.records
        )
    )
    call(container, "add", "kiwi")  # the relay goes on after the error
    assert json.loads(listener.get(timeout=10).body) == {"item": "kiwi", "n": 0}
    rows = dict(outbox_rows_by_id(pg_shop))
    assert rows[poison] is False  # kept, for a fix and a later try: nothing lost
    assert rows[behind_poison] is False  # order per aggregate holds
    error = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert getattr(error, "row_id", None) == poison
    assert "pear" not in caplog.text


def outbox_rows_by_id(pg_url: str) -> list[tuple[int, bool]]:
    return outbox_rows(pg_url, "id")
