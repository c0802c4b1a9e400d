"""``services.users.schemas``: payload shapes and input validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from framework.exceptions import deserialize, serialize
from services.users.exceptions import InvalidUserData
from services.users.schemas import (
    MAX_PER_PAGE,
    PASSWORD_MAX_LENGTH,
    UserQuery,
    dump_page,
    dump_user,
    parse_changes,
    parse_new_user,
    parse_password,
    parse_query,
    parse_user_id,
)


def a_user(**overrides: object) -> SimpleNamespace:
    fields = {
        "id": 7,
        "email": "Ann@Example.com",
        "display_name": "Ann",
        "role": "member",
        "is_active": True,
        "password_hash": "$argon2id$secret",
        "created_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "updated_at": datetime(2024, 5, 2, 12, 0, tzinfo=UTC),
    }
    return SimpleNamespace(**{**fields, **overrides})


def test_a_user_payload_has_plain_json_fields_and_never_the_password_hash() -> None:
    assert dump_user(a_user()) == {
        "id": 7,
        "email": "Ann@Example.com",
        "display_name": "Ann",
        "role": "member",
        "is_active": True,
        "created_at": "2024-05-01T12:00:00+00:00",
        "updated_at": "2024-05-02T12:00:00+00:00",
    }


def test_timestamps_are_given_in_utc_whatever_the_database_returned() -> None:
    naive = datetime(2024, 5, 1, 12, 0)  # SQLite drops the zone
    two_hours_east = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))

    payload = dump_user(a_user(created_at=naive, updated_at=two_hours_east))

    assert payload["created_at"] == "2024-05-01T12:00:00+00:00"
    assert payload["updated_at"] == "2024-05-01T12:00:00+00:00"


def test_a_page_counts_pages_from_the_total() -> None:
    query = UserQuery(page=2, per_page=2, text=None, role=None)

    page = dump_page([a_user(id=3)], total=5, query=query)

    assert page["total"] == 5
    assert page["pages"] == 3
    assert (page["page"], page["per_page"]) == (2, 2)
    assert [item["id"] for item in page["items"]] == [3]


def test_an_empty_result_has_no_pages() -> None:
    query = UserQuery(page=1, per_page=20, text=None, role=None)

    assert dump_page([], total=0, query=query)["pages"] == 0


def test_a_new_user_is_cleaned_up() -> None:
    new = parse_new_user("  Ann@Example.com ", "long enough", "  Ann  ", "admin")

    assert new.email == "ann@example.com"
    assert new.display_name == "Ann"
    assert new.role == "admin"
    assert new.password == "long enough"


def test_every_invalid_field_of_a_new_user_is_reported_at_once() -> None:
    with pytest.raises(InvalidUserData) as caught:
        parse_new_user("not-an-email", "short", "   ", "superuser")

    assert set(caught.value.errors) == {"email", "password", "display_name", "role"}
    assert "at least 8" in caught.value.errors["password"]


@pytest.mark.parametrize(
    "email",
    ["", "ann", "ann@", "@example.com", "ann@example", "an n@example.com", 42, None],
)
def test_malformed_emails_are_rejected(email: object) -> None:
    with pytest.raises(InvalidUserData) as caught:
        parse_new_user(email, "long enough", "Ann", "member")

    assert list(caught.value.errors) == ["email"]


def test_an_overlong_password_is_rejected_before_anyone_hashes_it() -> None:
    with pytest.raises(InvalidUserData) as caught:
        parse_password("x" * (PASSWORD_MAX_LENGTH + 1), field="new_password")

    assert list(caught.value.errors) == ["new_password"]


def test_changes_may_touch_only_the_updatable_fields() -> None:
    with pytest.raises(InvalidUserData) as caught:
        parse_changes({"password": "new password", "password_hash": "x", "id": 3})

    assert "change_password" in caught.value.errors["password"]
    assert set(caught.value.errors) == {"password", "password_hash", "id"}


def test_changes_are_validated_like_new_users() -> None:
    assert parse_changes({"email": " bob@example.com", "is_active": False}) == {
        "email": "bob@example.com",
        "is_active": False,
    }
    with pytest.raises(InvalidUserData) as caught:
        parse_changes({"role": "root", "is_active": "no"})
    assert set(caught.value.errors) == {"role", "is_active"}


def test_a_query_defaults_blank_text_to_no_filter() -> None:
    assert parse_query(1, 20, "   ", None) == UserQuery(1, 20, None, None)
    assert parse_query(3, 5, " ann ", "admin").text == "ann"


@pytest.mark.parametrize(
    ("page", "per_page", "bad"),
    [
        (0, 20, "page"),
        (1, 0, "per_page"),
        (1, MAX_PER_PAGE + 1, "per_page"),
        (True, 20, "page"),
        ("2", 20, "page"),
    ],
)
def test_out_of_range_paging_is_rejected(
    page: object, per_page: object, bad: str
) -> None:
    with pytest.raises(InvalidUserData) as caught:
        parse_query(page, per_page, None, None)

    assert list(caught.value.errors) == [bad]


def test_user_ids_must_be_integers() -> None:
    assert parse_user_id(5) == 5
    for bad in ("5", 5.0, True, None):
        with pytest.raises(InvalidUserData):
            parse_user_id(bad)


def test_invalid_user_data_crosses_the_wire_with_its_field_errors() -> None:
    sent = InvalidUserData("invalid user data", {"email": "not an email address"})

    received = deserialize(serialize(sent))

    assert type(received) is InvalidUserData
    assert received.errors == {"email": "not an email address"}
    assert str(received) == "invalid user data (email: not an email address)"
