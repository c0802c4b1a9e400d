"""``services.users.dependencies``: password hashing, admin settings."""

from __future__ import annotations

from typing import Any

import argon2
import pytest

from framework.exceptions import ConfigurationError
from services.users.dependencies import (
    ADMIN_DISPLAY_NAME_CONFIG_KEY,
    ADMIN_EMAIL_CONFIG_KEY,
    ADMIN_PASSWORD_CONFIG_KEY,
    PASSWORD_HASHING_CONFIG_KEY,
    AdminSettings,
    FirstAdmin,
    PasswordHasher,
    Passwords,
)
from services.users.models import User


def bound(provider: Any, container: Any, attr_name: str) -> Any:
    instance = provider.bind(container, attr_name)
    instance.setup()
    return instance


# -- passwords -------------------------------------------------------------------------


def test_a_hash_verifies_only_its_own_password(passwords: Passwords) -> None:
    password_hash = passwords.hash("correct horse")

    assert passwords.verify(password_hash, "correct horse")
    assert not passwords.verify(password_hash, "correct horsE")
    assert not passwords.verify(password_hash, b"correct horse")


def test_no_hash_never_verifies(passwords: Passwords) -> None:
    assert not passwords.verify(None, "no account has this password")
    assert not passwords.verify(None, "")


def test_a_corrupt_stored_hash_fails_verification_instead_of_raising(
    passwords: Passwords,
) -> None:
    assert not passwords.verify("not a hash", "correct horse")
    assert not passwords.verify("$argon2id$v=19$m=8,t=1,p=1$broken", "correct horse")


def test_hashes_made_with_other_parameters_need_a_rehash(passwords: Passwords) -> None:
    old = Passwords(argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))

    assert passwords.needs_rehash(old.hash("correct horse"))
    assert not passwords.needs_rehash(passwords.hash("correct horse"))


def test_password_hashing_takes_its_parameters_from_config(mock_container: Any) -> None:
    mock_container.config[PASSWORD_HASHING_CONFIG_KEY] = {
        "time_cost": 1,
        "memory_cost": 8,
        "parallelism": 1,
    }
    provider = bound(PasswordHasher(), mock_container, "passwords")

    password_hash = provider.get_dependency(None).hash("correct horse")

    assert password_hash.startswith("$argon2id$v=19$m=8,t=1,p=1$")


def test_unknown_password_hashing_parameters_stop_the_service(
    mock_container: Any,
) -> None:
    mock_container.config[PASSWORD_HASHING_CONFIG_KEY] = {"rounds": 10}

    with pytest.raises(ConfigurationError, match="rounds"):
        bound(PasswordHasher(), mock_container, "passwords")


# -- admin settings ---------------------------------------------------------------------


def test_admin_settings_come_from_config(mock_container: Any) -> None:
    mock_container.config.update(
        {
            ADMIN_EMAIL_CONFIG_KEY: " root@example.com ",
            ADMIN_PASSWORD_CONFIG_KEY: "root password",
            ADMIN_DISPLAY_NAME_CONFIG_KEY: "Root",
        }
    )

    provider = bound(AdminSettings(), mock_container, "first_admin")

    assert provider.get_dependency(None) == FirstAdmin(
        "root@example.com", "root password", "Root"
    )


def test_the_admin_display_name_has_a_default(mock_container: Any) -> None:
    mock_container.config.update(
        {
            ADMIN_EMAIL_CONFIG_KEY: "root@example.com",
            ADMIN_PASSWORD_CONFIG_KEY: "root password",
        }
    )

    provider = bound(AdminSettings(), mock_container, "first_admin")

    assert provider.get_dependency(None).display_name == "Administrator"


@pytest.mark.parametrize("email", [None, ""])
def test_without_an_admin_email_there_is_no_first_admin(
    mock_container: Any, email: Any
) -> None:
    mock_container.config[ADMIN_EMAIL_CONFIG_KEY] = email

    assert (
        bound(AdminSettings(), mock_container, "first_admin").get_dependency(None)
        is None
    )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({ADMIN_EMAIL_CONFIG_KEY: "root@example.com"}, ADMIN_PASSWORD_CONFIG_KEY),
        (
            {
                ADMIN_EMAIL_CONFIG_KEY: "root@example.com",
                ADMIN_PASSWORD_CONFIG_KEY: "short",
            },
            ADMIN_PASSWORD_CONFIG_KEY,
        ),
        (
            {
                ADMIN_EMAIL_CONFIG_KEY: "root",
                ADMIN_PASSWORD_CONFIG_KEY: "root password",
            },
            ADMIN_EMAIL_CONFIG_KEY,
        ),
    ],
)
def test_unusable_admin_settings_stop_the_service_naming_the_key(
    mock_container: Any, settings: dict[str, Any], named: str
) -> None:
    mock_container.config.update(settings)

    with pytest.raises(ConfigurationError, match=named):
        bound(AdminSettings(), mock_container, "first_admin")


# -- models ------------------------------------------------------------------------------


def test_a_users_repr_leaves_out_the_password_hash() -> None:
    user = User(
        id=1,
        email="ann@example.com",
        role="member",
        is_active=True,
        password_hash="$argon2id$x",
    )

    assert "argon2" not in repr(user)
    assert "ann@example.com" not in repr(user)
