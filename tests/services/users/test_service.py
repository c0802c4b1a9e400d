"""``UsersService``'s methods, called through ``worker_factory`` on a SQLite file.

Everything but the event dispatcher is real: the migrated schema, the repository,
argon2 (at its cheapest). The dispatcher is a mock: the test asserts on what the
service announces, which is its contract with whoever listens.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from unittest.mock import call

import argon2
import pytest
from sqlalchemy import select

from framework.rpc import Rpc
from framework.testing.utils import get_extension
from framework.utils import REDACTED, get_redacted_args
from services.users.dependencies import FirstAdmin, Passwords, UserRepository
from services.users.exceptions import (
    AuthenticationFailed,
    EmailAlreadyRegistered,
    InvalidUserData,
    UserNotFound,
)
from services.users.models import User
from services.users.schemas import MAX_USER_ID, USER_CREATED, USER_DELETED, USER_UPDATED
from services.users.service import UsersService

PASSWORD = "correct horse"


def create(
    service: Any, email: str = "ann@example.com", **fields: Any
) -> dict[str, Any]:
    fields.setdefault("display_name", email.split("@")[0].title())
    return service.create_user(email, fields.pop("password", PASSWORD), **fields)


def later(timestamp: str, than: str) -> bool:
    return datetime.fromisoformat(timestamp) > datetime.fromisoformat(than)


def stored(repository: UserRepository, user_id: int) -> User:
    """The row as the database has it now, not as the session remembers it."""
    repository.session.expire_all()
    user = repository.session.get(User, user_id)
    assert user is not None
    return user


# -- create_user ------------------------------------------------------------------------


def test_create_user_returns_the_account_and_announces_it(service: Any) -> None:
    user = service.create_user("Ann@Example.com", PASSWORD, "Ann")

    assert user["email"] == "ann@example.com"  # stored normalised
    assert user["display_name"] == "Ann"
    assert user["role"] == "member"
    assert user["is_active"] is True
    assert "password_hash" not in user and PASSWORD not in str(user)
    assert service.dispatch.call_args_list == [call(USER_CREATED, {"user": user})]


def test_the_password_is_stored_only_as_an_argon2_hash(
    service: Any, repository: UserRepository
) -> None:
    user = create(service)

    password_hash = stored(repository, user["id"]).password_hash

    assert password_hash.startswith("$argon2id$")
    assert PASSWORD not in password_hash
    assert argon2.PasswordHasher().verify(password_hash, PASSWORD)


def test_an_email_is_taken_whatever_its_case(service: Any) -> None:
    create(service, "ann@example.com")
    service.dispatch.reset_mock()

    with pytest.raises(EmailAlreadyRegistered):
        create(service, "ANN@Example.COM")

    assert not service.dispatch.called


def test_the_email_index_catches_a_duplicate_the_lookup_missed(
    service: Any, repository: UserRepository
) -> None:
    # What a second replica (or a concurrent call) sees when it checked for the
    # email before the first one committed it.
    create(service, "ann@example.com")
    twin = User(
        email="ann@example.com",
        display_name="Twin",
        role="member",
        is_active=True,
        password_hash="x",
    )

    with pytest.raises(EmailAlreadyRegistered), repository.transaction():
        repository.add(twin)

    assert repository.find_by_email("ann@example.com").display_name == "Ann"


def test_invalid_new_users_are_rejected_with_every_reason(service: Any) -> None:
    with pytest.raises(InvalidUserData) as caught:
        service.create_user("nope", "short", "", role="owner")

    assert set(caught.value.errors) == {"email", "password", "display_name", "role"}
    assert not service.dispatch.called


# -- reads ---------------------------------------------------------------------------------


def test_get_user_and_get_user_by_email_find_the_same_account(service: Any) -> None:
    user = create(service, "Ann@Example.com")

    assert service.get_user(user["id"]) == user
    assert service.get_user_by_email("ann@example.com") == user
    assert service.get_user_by_email("  ANN@EXAMPLE.COM ") == user


@pytest.mark.parametrize("user_id", [999, 0, -1, MAX_USER_ID + 1])
def test_an_unknown_user_id_is_not_found(service: Any, user_id: int) -> None:
    with pytest.raises(UserNotFound):
        service.get_user(user_id)


def test_a_user_id_that_is_not_an_integer_is_invalid(service: Any) -> None:
    with pytest.raises(InvalidUserData):
        service.get_user("1")


@pytest.mark.parametrize("email", ["nobody@example.com", "", None, 42])
def test_an_unknown_email_is_not_found(service: Any, email: Any) -> None:
    with pytest.raises(UserNotFound):
        service.get_user_by_email(email)


def test_list_users_pages_oldest_first(service: Any) -> None:
    ids = [create(service, f"user{n}@example.com")["id"] for n in range(5)]

    first = service.list_users(page=1, per_page=2)
    last = service.list_users(page=3, per_page=2)
    beyond = service.list_users(page=4, per_page=2)

    assert [u["id"] for u in first["items"]] == ids[:2]
    assert [u["id"] for u in last["items"]] == ids[4:]
    assert beyond["items"] == []
    assert first["total"] == last["total"] == beyond["total"] == 5
    assert first["pages"] == 3
    assert (last["page"], last["per_page"]) == (3, 2)


def test_list_users_searches_email_and_display_name_case_insensitively(
    service: Any,
) -> None:
    ann = create(service, "ann@example.com", display_name="Ann Smith")
    bob = create(service, "bob@example.com", display_name="Bob Annand")
    create(service, "carol@example.com", display_name="Carol")

    found = service.list_users(text="ANN")

    assert [u["id"] for u in found["items"]] == [ann["id"], bob["id"]]
    assert found["total"] == 2


def test_list_users_takes_search_wildcards_literally(service: Any) -> None:
    percent = create(service, "100%@example.com", display_name="Percent")
    create(service, "plain@example.com", display_name="Plain_name")

    assert [u["id"] for u in service.list_users(text="%")["items"]] == [percent["id"]]
    assert [u["display_name"] for u in service.list_users(text="_")["items"]] == [
        "Plain_name"
    ]


def test_list_users_filters_by_role(service: Any) -> None:
    admin = create(service, "root@example.com", role="admin")
    create(service, "ann@example.com")

    admins = service.list_users(role="admin")

    assert [u["id"] for u in admins["items"]] == [admin["id"]]
    assert admins["total"] == 1


def test_list_users_rejects_bad_paging(service: Any) -> None:
    with pytest.raises(InvalidUserData) as caught:
        service.list_users(page=0, per_page=1000, role="owner")

    assert set(caught.value.errors) == {"page", "per_page", "role"}


# -- update_user, deactivate_user, delete_user -------------------------------------------


def test_update_user_applies_the_changes_and_announces_which(service: Any) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    updated = service.update_user(
        user["id"], display_name="Annie", role="admin", email="ann@example.com"
    )

    assert updated["display_name"] == "Annie"
    assert updated["role"] == "admin"
    assert updated["created_at"] == user["created_at"]
    assert later(updated["updated_at"], user["updated_at"])
    assert service.get_user(user["id"]) == updated
    assert service.dispatch.call_args_list == [
        call(USER_UPDATED, {"user": updated, "changed": ["display_name", "role"]})
    ]


def test_an_update_that_changes_nothing_is_not_announced(service: Any) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    assert service.update_user(user["id"], display_name=user["display_name"]) == user
    assert service.update_user(user["id"]) == user
    assert not service.dispatch.called


def test_a_user_may_give_their_own_email_in_another_case(service: Any) -> None:
    user = create(service, "ann@example.com")
    service.dispatch.reset_mock()

    assert service.update_user(user["id"], email="Ann@Example.com") == user
    assert not service.dispatch.called  # the same identity: nothing changed


# Letters whose lower-casing Python and PostgreSQL disagree on: final sigma, and
# the dotted capital I whose lower case is i + U+0307.
@pytest.mark.parametrize(
    ("registered", "twin"),
    [
        ("ΣΑΣ.Παπας@example.com", "σας.παπας@example.com"),
        ("İVAN.Petrov@example.com", "i̇van.petrov@example.com"),
        ("ＡＮＮ@example.com", "ann@example.com"),  # fullwidth: NFKC
    ],
)
def test_an_email_is_one_identity_whatever_its_letters(
    service: Any, registered: str, twin: str
) -> None:
    user = create(service, registered)

    assert service.get_user_by_email(registered) == user
    assert service.authenticate(registered, PASSWORD) == user
    assert service.get_user_by_email(twin) == user
    with pytest.raises(EmailAlreadyRegistered):
        create(service, twin)


def test_an_email_belonging_to_someone_else_cannot_be_taken(service: Any) -> None:
    create(service, "ann@example.com")
    bob = create(service, "bob@example.com")

    with pytest.raises(EmailAlreadyRegistered):
        service.update_user(bob["id"], email="ANN@example.com")

    assert service.get_user(bob["id"])["email"] == "bob@example.com"


def test_update_user_refuses_the_password_and_unknown_fields(service: Any) -> None:
    user = create(service)

    with pytest.raises(InvalidUserData) as caught:
        service.update_user(user["id"], password="another one", nickname="A")

    assert set(caught.value.errors) == {"password", "nickname"}


def test_updating_an_unknown_user_is_not_found(service: Any) -> None:
    with pytest.raises(UserNotFound):
        service.update_user(42, display_name="Ghost")


def test_deactivate_user_is_announced_once(service: Any) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    deactivated = service.deactivate_user(user["id"])
    again = service.deactivate_user(user["id"])

    assert deactivated["is_active"] is False
    assert again == deactivated
    assert service.dispatch.call_args_list == [
        call(USER_UPDATED, {"user": deactivated, "changed": ["is_active"]})
    ]


def test_delete_user_removes_the_account_and_announces_what_it_was(
    service: Any,
) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    assert service.delete_user(user["id"]) is None

    with pytest.raises(UserNotFound):
        service.get_user(user["id"])
    assert service.dispatch.call_args_list == [call(USER_DELETED, {"user": user})]
    with pytest.raises(UserNotFound):
        service.delete_user(user["id"])


def test_a_deleted_users_email_can_be_registered_again_under_a_new_id(
    service: Any,
) -> None:
    user = create(service, "ann@example.com")
    service.delete_user(user["id"])

    again = create(service, "Ann@example.com")

    assert again["id"] != user["id"]
    assert service.get_user_by_email("ann@example.com") == again


@pytest.mark.parametrize("bad", ["ann\x00@example.com", "ann\ud800@example.com"])
def test_strings_no_column_can_store_are_invalid_user_data(
    service: Any, bad: str
) -> None:
    create(service, "ann@example.com")
    user_id = service.get_user_by_email("ann@example.com")["id"]
    attempts = [
        lambda: service.create_user(bad, PASSWORD, "Ann"),
        lambda: service.create_user("bob@example.com", PASSWORD + bad, "Bob"),
        lambda: service.create_user("bob@example.com", PASSWORD, bad),
        lambda: service.get_user_by_email(bad),
        lambda: service.authenticate(bad, PASSWORD),
        lambda: service.authenticate("ann@example.com", bad),
        lambda: service.list_users(text=bad),
        lambda: service.update_user(user_id, display_name=bad),
        lambda: service.update_user(user_id, email=bad),
        lambda: service.change_password(user_id, bad, "new password"),
        lambda: service.change_password(user_id, PASSWORD, "new password" + bad),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidUserData):
            attempt()


def test_a_page_past_any_possible_user_is_invalid_not_a_database_error(
    service: Any,
) -> None:
    with pytest.raises(InvalidUserData) as caught:
        service.list_users(page=2**62)

    assert set(caught.value.errors) == {"page"}


# -- authenticate, change_password --------------------------------------------------------


def test_authenticate_returns_the_account_for_the_right_password(service: Any) -> None:
    user = create(service, "Ann@Example.com")

    assert service.authenticate("ann@example.com", PASSWORD) == user


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("ann@example.com", "wrong horse"),
        ("ann@example.com", PASSWORD.upper()),
        ("nobody@example.com", PASSWORD),
        ("ann@example.com", None),
        (None, PASSWORD),
    ],
)
def test_authenticate_fails_the_same_way_for_any_bad_credentials(
    service: Any, email: Any, password: Any
) -> None:
    create(service, "ann@example.com")

    with pytest.raises(AuthenticationFailed) as caught:
        service.authenticate(email, password)

    assert str(caught.value) == "invalid email or password"


def test_a_deactivated_account_cannot_authenticate(service: Any) -> None:
    user = create(service)
    service.deactivate_user(user["id"])

    with pytest.raises(AuthenticationFailed) as caught:
        service.authenticate(user["email"], PASSWORD)

    assert str(caught.value) == "invalid email or password"


def test_a_hash_made_with_old_parameters_is_upgraded_at_login(
    make_service: Any, repository: UserRepository
) -> None:
    user = create(make_service())
    stronger = Passwords(
        argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    )
    old_hash = stored(repository, user["id"]).password_hash

    make_service(passwords=stronger).authenticate(user["email"], PASSWORD)

    new_hash = stored(repository, user["id"]).password_hash
    assert new_hash != old_hash
    assert not stronger.needs_rehash(new_hash)
    assert stronger.verify(new_hash, PASSWORD)


def test_an_unknown_email_is_verified_against_a_stand_in_with_the_stored_parameters(
    make_service: Any, passwords: Passwords
) -> None:
    # Accounts hashed at one cost; then the cost is raised. Most stored hashes
    # keep the old parameters until their owners log in, so a stand-in at the
    # new cost would make an unknown email slower than a wrong password.
    create(make_service(), "ann@example.com")
    create(make_service(), "bob@example.com")
    verified: list[str] = []

    class RecordingHasher(argon2.PasswordHasher):
        def verify(self, password_hash: Any, password: Any) -> bool:
            verified.append(password_hash)
            return super().verify(password_hash, password)

    stronger = Passwords(RecordingHasher(time_cost=2, memory_cost=16, parallelism=1))
    service = make_service(passwords=stronger)

    with pytest.raises(AuthenticationFailed):
        service.authenticate("nobody@example.com", PASSWORD)
    with pytest.raises(AuthenticationFailed):
        service.authenticate("ann@example.com", "wrong horse")

    unknown, known = verified
    assert argon2.extract_parameters(unknown) == argon2.extract_parameters(known)
    assert unknown != known  # a stand-in, not somebody's hash
    assert stronger.needs_rehash(unknown)  # made with the old parameters


def test_change_password_needs_the_old_one(service: Any) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    with pytest.raises(AuthenticationFailed):
        service.change_password(user["id"], "wrong horse", "battery staple")

    changed = service.change_password(user["id"], PASSWORD, "battery staple")

    assert service.authenticate(user["email"], "battery staple") == changed
    with pytest.raises(AuthenticationFailed):
        service.authenticate(user["email"], PASSWORD)
    assert service.dispatch.call_args_list == [
        call(USER_UPDATED, {"user": changed, "changed": ["password"]})
    ]


def test_change_password_validates_the_new_one(service: Any) -> None:
    user = create(service)

    with pytest.raises(InvalidUserData) as caught:
        service.change_password(user["id"], PASSWORD, "short")

    assert list(caught.value.errors) == ["new_password"]
    assert service.authenticate(user["email"], PASSWORD)["id"] == user["id"]


def test_a_deactivated_account_cannot_change_its_password(service: Any) -> None:
    user = create(service)
    service.deactivate_user(user["id"])

    with pytest.raises(AuthenticationFailed):
        service.change_password(user["id"], PASSWORD, "battery staple")


def test_changing_the_password_of_an_unknown_user_is_not_found(service: Any) -> None:
    with pytest.raises(UserNotFound):
        service.change_password(42, PASSWORD, "battery staple")


# -- reset_password -------------------------------------------------------------------------


def test_reset_password_replaces_the_password_without_the_old_one(
    service: Any,
) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    reset = service.reset_password(user["id"], "battery staple")

    assert service.authenticate(user["email"], "battery staple") == reset
    with pytest.raises(AuthenticationFailed):
        service.authenticate(user["email"], PASSWORD)
    assert "battery staple" not in str(reset)
    assert service.dispatch.call_args_list == [
        call(USER_UPDATED, {"user": reset, "changed": ["password"], "reset": True})
    ]


@pytest.mark.parametrize("bad", ["short", "x" * 1025, 12345678, None, "pass\x00word"])
def test_reset_password_applies_the_password_rules(service: Any, bad: Any) -> None:
    user = create(service)
    service.dispatch.reset_mock()

    with pytest.raises(InvalidUserData) as caught:
        service.reset_password(user["id"], bad)

    assert list(caught.value.errors) == ["new_password"]
    assert service.authenticate(user["email"], PASSWORD)["id"] == user["id"]
    assert not service.dispatch.called


def test_a_deactivated_account_can_be_reset_and_stays_deactivated(
    service: Any,
) -> None:
    user = create(service)
    service.deactivate_user(user["id"])

    reset = service.reset_password(user["id"], "battery staple")

    assert reset["is_active"] is False
    with pytest.raises(AuthenticationFailed):
        service.authenticate(user["email"], "battery staple")
    service.update_user(user["id"], is_active=True)
    assert service.authenticate(user["email"], "battery staple")["id"] == user["id"]


@pytest.mark.parametrize("user_id", [42, 0, 2**40, "1", True])
def test_resetting_the_password_of_an_unknown_or_bad_id_fails_cleanly(
    service: Any, user_id: Any
) -> None:
    with pytest.raises((UserNotFound, InvalidUserData)):
        service.reset_password(user_id, "battery staple")
    assert not service.dispatch.called


# -- the first admin ---------------------------------------------------------------------

ROOT = FirstAdmin("root@example.com", "root password", "Root")


def admins(repository: UserRepository) -> list[User]:
    return list(repository.session.scalars(select(User).where(User.role == "admin")))


def test_the_configured_admin_is_created_when_there_is_no_admin(
    make_service: Any, repository: UserRepository
) -> None:
    service = make_service(first_admin=ROOT)

    service.create_first_admin()

    admin = service.authenticate("root@example.com", "root password")
    assert (admin["role"], admin["display_name"]) == ("admin", "Root")
    assert service.dispatch.call_args_list == [call(USER_CREATED, {"user": admin})]


def test_the_admin_is_created_only_once(
    make_service: Any, repository: UserRepository
) -> None:
    make_service(first_admin=ROOT).create_first_admin()
    again = make_service(first_admin=ROOT)

    again.create_first_admin()

    assert len(admins(repository)) == 1
    assert not again.dispatch.called


def test_no_admin_is_created_while_another_active_admin_exists(
    make_service: Any, repository: UserRepository
) -> None:
    service = make_service(first_admin=ROOT)
    create(service, "boss@example.com", role="admin")

    service.create_first_admin()

    assert [admin.email for admin in admins(repository)] == ["boss@example.com"]


def test_an_existing_member_with_the_admin_email_is_not_promoted(
    make_service: Any, repository: UserRepository, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(first_admin=ROOT)
    member = create(service, "Root@Example.com")

    with caplog.at_level(logging.WARNING, logger="services.users.service"):
        service.create_first_admin()

    assert service.get_user(member["id"])["role"] == "member"
    assert admins(repository) == []
    assert "not promoting it" in caplog.text


def test_without_admin_settings_no_admin_is_created(
    service: Any, repository: UserRepository
) -> None:
    service.create_first_admin()

    assert admins(repository) == []


# -- declarations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method_name", "args", "secrets"),
    [
        ("create_user", ("ann@example.com", PASSWORD, "Ann"), ["password"]),
        ("authenticate", ("ann@example.com", PASSWORD), ["password"]),
        (
            "change_password",
            (1, PASSWORD, "battery staple"),
            ["old_password", "new_password"],
        ),
        ("reset_password", (1, PASSWORD), ["new_password"]),
    ],
)
def test_passwords_are_masked_wherever_call_arguments_are_recorded(
    container_factory: Any, method_name: str, args: tuple[Any, ...], secrets: list[str]
) -> None:
    container = container_factory(UsersService, {})
    entrypoint = get_extension(container, Rpc, method_name=method_name)

    recorded = get_redacted_args(entrypoint, *args)

    assert all(recorded[name] == REDACTED for name in secrets)
    assert PASSWORD not in str(recorded)
