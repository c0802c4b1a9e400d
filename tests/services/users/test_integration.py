"""The users service in a real container, on the real RabbitMQ and PostgreSQL.

Every RPC method is called the way other services and scripts call it, through a
standalone ``ClusterRpcProxy``; errors must come back as instances of the classes
in ``services.users.exceptions``, and events must reach a real listener service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
import sqlalchemy.orm

from framework import concurrency
from framework.database import Session, create_engine
from framework.events import event_handler
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import entrypoint_waiter
from services.users.dependencies import (
    ADMIN_EMAIL_CONFIG_KEY,
    ADMIN_PASSWORD_CONFIG_KEY,
    UserRepository,
)
from services.users.exceptions import (
    AuthenticationFailed,
    EmailAlreadyRegistered,
    InvalidUserData,
    UserNotFound,
)
from services.users.models import User
from services.users.schemas import USER_CREATED, USER_DELETED, USER_UPDATED
from services.users.service import UsersService

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
EVENT_TIMEOUT = 10  # seconds
RPC_TIMEOUT = 10  # seconds


class UserEventsListener:
    """Stands in for any service that follows the users service's events."""

    name = "user_events_listener"

    @event_handler("users", USER_CREATED)
    def on_user_created(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @event_handler("users", USER_UPDATED)
    def on_user_updated(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @event_handler("users", USER_DELETED)
    def on_user_deleted(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


@pytest.fixture
def users_container(container_factory: Any, config: dict[str, Any]) -> Any:
    container = container_factory(UsersService, config)
    container.start()
    return container


@pytest.fixture
def listener(container_factory: Any, config: dict[str, Any]) -> Any:
    # Started before any event is dispatched, so its queues exist to receive them.
    container = container_factory(UserEventsListener, config)
    container.start()
    return container


@pytest.fixture
def users(users_container: Any, config: dict[str, Any]) -> Iterator[Any]:
    with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as rpc:
        yield rpc.users


def create(users: Any, email: str = "ann@example.com", **fields: Any) -> dict[str, Any]:
    fields.setdefault("display_name", email.split("@")[0].title())
    return users.create_user(email, fields.pop("password", PASSWORD), **fields)


# -- each method, over the wire --------------------------------------------------------


def test_create_user_returns_the_account_and_announces_it(
    users: Any, listener: Any
) -> None:
    with entrypoint_waiter(listener, "on_user_created", timeout=EVENT_TIMEOUT) as event:
        user = users.create_user("Ann@Example.com", PASSWORD, "Ann")

    assert user["email"] == "ann@example.com"  # stored normalised
    assert user["role"] == "member"
    assert user["is_active"] is True
    assert "password_hash" not in user
    assert event.get() == {"user": user}


def test_invalid_data_comes_back_as_invalid_user_data_with_its_fields(
    users: Any,
) -> None:
    with pytest.raises(InvalidUserData) as caught:
        users.create_user("nope", "short", "Ann", role="owner")

    assert set(caught.value.errors) == {"email", "password", "role"}


def test_a_taken_email_comes_back_as_email_already_registered(users: Any) -> None:
    create(users, "ann@example.com")

    with pytest.raises(EmailAlreadyRegistered):
        create(users, "ANN@example.com")


def test_get_user_and_get_user_by_email_find_the_account(users: Any) -> None:
    user = create(users, "Ann@Example.com")

    assert users.get_user(user["id"]) == user
    assert users.get_user_by_email("ann@EXAMPLE.com") == user


def test_unknown_users_come_back_as_user_not_found(users: Any) -> None:
    for method, args in [
        (users.get_user, (404,)),
        (users.get_user_by_email, ("nobody@example.com",)),
        (users.update_user, (404,)),
        (users.deactivate_user, (404,)),
        (users.delete_user, (404,)),
        (users.change_password, (404, PASSWORD, "battery staple")),
    ]:
        with pytest.raises(UserNotFound):
            method(*args)


def test_list_users_pages_and_filters(users: Any) -> None:
    ann = create(users, "ann@example.com", display_name="Ann Smith")
    bob = create(users, "bob@example.com", display_name="Bob Annand", role="admin")
    carol = create(users, "carol@example.com", display_name="Carol")

    everyone = users.list_users()
    second_page = users.list_users(page=2, per_page=2)
    anns = users.list_users(text="ann")
    admins = users.list_users(role="admin")
    ann_admins = users.list_users(text="ANN", role="admin")

    assert everyone == {
        "items": [ann, bob, carol],
        "total": 3,
        "page": 1,
        "per_page": 20,
        "pages": 1,
    }
    assert second_page["items"] == [carol]
    assert (second_page["total"], second_page["pages"]) == (3, 2)
    assert anns["items"] == [ann, bob]
    assert admins["items"] == [bob]
    assert ann_admins["items"] == [bob]
    with pytest.raises(InvalidUserData):
        users.list_users(per_page=0)


def test_update_user_changes_fields_and_announces_which(
    users: Any, listener: Any
) -> None:
    user = create(users)

    with entrypoint_waiter(listener, "on_user_updated", timeout=EVENT_TIMEOUT) as event:
        updated = users.update_user(user["id"], display_name="Annie", role="admin")

    assert (updated["display_name"], updated["role"]) == ("Annie", "admin")
    assert users.get_user(user["id"]) == updated
    assert event.get() == {"user": updated, "changed": ["display_name", "role"]}
    with pytest.raises(InvalidUserData):
        users.update_user(user["id"], password="battery staple")


def test_deactivate_user_stops_logins_and_is_announced(
    users: Any, listener: Any
) -> None:
    user = create(users)

    with entrypoint_waiter(listener, "on_user_updated", timeout=EVENT_TIMEOUT) as event:
        deactivated = users.deactivate_user(user["id"])

    assert deactivated["is_active"] is False
    assert event.get() == {"user": deactivated, "changed": ["is_active"]}
    with pytest.raises(AuthenticationFailed):
        users.authenticate(user["email"], PASSWORD)


def test_delete_user_removes_the_account_and_is_announced(
    users: Any, listener: Any
) -> None:
    user = create(users)

    with entrypoint_waiter(listener, "on_user_deleted", timeout=EVENT_TIMEOUT) as event:
        assert users.delete_user(user["id"]) is None

    assert event.get() == {"user": user}
    with pytest.raises(UserNotFound):
        users.get_user(user["id"])


def test_authenticate_accepts_only_the_right_password(users: Any) -> None:
    user = create(users, "Ann@Example.com")

    assert users.authenticate("ann@example.com", PASSWORD) == user
    for email, password in [
        ("ann@example.com", "wrong horse"),
        ("nobody@example.com", PASSWORD),
    ]:
        with pytest.raises(AuthenticationFailed) as caught:
            users.authenticate(email, password)
        assert str(caught.value) == "invalid email or password"


def test_change_password_requires_the_old_one_and_is_announced(
    users: Any, listener: Any
) -> None:
    user = create(users)
    with pytest.raises(AuthenticationFailed):
        users.change_password(user["id"], "wrong horse", "battery staple")
    with pytest.raises(InvalidUserData):
        users.change_password(user["id"], PASSWORD, "short")

    with entrypoint_waiter(listener, "on_user_updated", timeout=EVENT_TIMEOUT) as event:
        changed = users.change_password(user["id"], PASSWORD, "battery staple")

    assert event.get() == {"user": changed, "changed": ["password"]}
    assert "password" not in str(event.get()["user"])
    assert users.authenticate(user["email"], "battery staple")["id"] == user["id"]


def test_reset_password_replaces_it_is_announced_and_never_shown(
    users: Any, listener: Any, caplog: pytest.LogCaptureFixture
) -> None:
    user = create(users)
    secret = "a brand new secret"
    rejected = "Sh0rt!x"  # too short: the failed call is logged, with its arguments

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(InvalidUserData) as caught:
            users.reset_password(user["id"], rejected)
        with entrypoint_waiter(
            listener, "on_user_updated", timeout=EVENT_TIMEOUT
        ) as event:
            reset = users.reset_password(user["id"], secret)

    assert set(caught.value.errors) == {"new_password"}
    assert rejected not in str(caught.value)
    assert event.get() == {"user": reset, "changed": ["password"], "reset": True}
    assert users.authenticate(user["email"], secret)["id"] == user["id"]
    with pytest.raises(AuthenticationFailed):
        users.authenticate(user["email"], PASSWORD)
    assert secret not in str(reset)
    assert caplog.records  # the calls were logged, without the password
    for record in caplog.records:
        for password in (secret, rejected):
            assert password not in record.getMessage()
            assert password not in str(record.__dict__)


# -- the database ----------------------------------------------------------------------------


def test_postgres_rejects_a_second_account_with_the_same_email_in_another_case(
    pg_users: str, users: Any
) -> None:
    # What settles a race the service's own lookup cannot see: the unique index.
    create(users, "ann@example.com")
    engine = create_engine(pg_users)
    session = sqlalchemy.orm.sessionmaker(bind=engine, class_=Session)()
    try:
        twin = User(
            email="ann@example.com",  # as stored: normalised
            display_name="Twin",
            role="member",
            is_active=True,
            password_hash="x",
        )
        repository = UserRepository(session)
        with pytest.raises(EmailAlreadyRegistered), repository.transaction():
            repository.add(twin)
    finally:
        session.close()
        engine.dispose()


# -- the first admin ---------------------------------------------------------------------------


def test_postgres_finds_an_email_by_the_string_it_was_registered_with(
    users: Any,
) -> None:
    # PostgreSQL's lower() makes "σας" of ΣΑΣ where Python's casefold makes "σασ".
    user = create(users, "ΣΑΣ.İVAN@example.com")

    assert users.get_user_by_email("ΣΑΣ.İVAN@example.com") == user
    assert users.authenticate("ΣΑΣ.İVAN@example.com", PASSWORD) == user
    with pytest.raises(EmailAlreadyRegistered):
        create(users, "ΣΑΣ.İVAN@example.com".lower())


def test_bad_strings_and_pages_are_invalid_user_data_not_database_errors(
    users: Any,
) -> None:
    with pytest.raises(InvalidUserData):
        users.list_users(page=2**62)
    with pytest.raises(InvalidUserData):
        users.get_user_by_email("ann\x00@example.com")
    with pytest.raises(InvalidUserData):
        create(users, "ann@example.com", display_name="Ann\x00")


def test_two_replicas_starting_together_create_one_admin(
    container_factory: Any,
    config: dict[str, Any],
    listener: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Both replicas are held after finding no admin until the other has found
    # none too, so both really try to create it and the unique index decides.
    checked: list[bool] = []
    both_checked = concurrency.Event()
    really_exists = UserRepository.active_admin_exists

    def checked_together(self: UserRepository) -> bool:
        exists = really_exists(self)
        if len(checked) < 2:
            checked.append(exists)
            if len(checked) == 2:
                both_checked.send()
            both_checked.wait()
        return exists

    monkeypatch.setattr(UserRepository, "active_admin_exists", checked_together)
    caplog.set_level(logging.INFO, logger="services.users.service")
    config = {
        **config,
        ADMIN_EMAIL_CONFIG_KEY: "root@example.com",
        ADMIN_PASSWORD_CONFIG_KEY: "root password",
    }
    replicas = [container_factory(UsersService, config) for _ in range(2)]

    with entrypoint_waiter(listener, "on_user_created", timeout=EVENT_TIMEOUT) as event:
        starts = [concurrency.spawn(replica.start) for replica in replicas]
        for start in starts:
            start.wait()  # neither replica fails to start

    with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as rpc:
        admins = rpc.users.list_users(role="admin")
        admin = rpc.users.authenticate("root@example.com", "root password")
    assert admins["items"] == [admin]
    assert event.get() == {"user": admin}
    assert checked == [False, False]  # they raced
    losers = [r for r in caplog.records if "another instance created" in r.getMessage()]
    assert len(losers) == 1  # and exactly one lost to the index
