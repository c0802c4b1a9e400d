"""``framework app``'s choices: which services, which database, which admin password.

The whole command runs end to end in tests/e2e/test_one_process.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.cli.app import (
    AppService,
    admin_password,
    database_url,
    find_services,
)
from framework.exceptions import CommandError


def make_services(root: Path, *names: str) -> Path:
    for name in names:
        folder = root / "services" / name
        folder.mkdir(parents=True)
        (folder / "service.py").write_text("")
        (folder / "config.yaml").write_text("{}\n")
    return root / "services"


def test_every_folder_with_a_service_and_a_config_is_a_service(tmp_path: Path) -> None:
    services_dir = make_services(tmp_path, "users", "web")
    (services_dir / "notes").mkdir()  # no service.py: not a service
    (services_dir / "half").mkdir()
    (services_dir / "half" / "service.py").write_text("")  # no config.yaml

    found = find_services(services_dir, [])

    assert [service.name for service in found] == ["users", "web"]
    assert found[0].module == "services.users.service"
    assert [s.name for s in find_services(services_dir, ["web"])] == ["web"]
    with pytest.raises(CommandError, match="orders"):
        find_services(services_dir, ["orders"])
    with pytest.raises(CommandError, match="no service"):
        find_services(tmp_path / "empty", [])


def test_each_service_gets_its_own_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = AppService("users", tmp_path / "services" / "users")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("USERS_DATABASE_URL", raising=False)
    assert database_url(users, tmp_path) == f"sqlite:///{tmp_path / 'users.sqlite3'}"

    monkeypatch.setenv("DATABASE_URL", "postgresql://db/{service_name}")
    assert database_url(users, tmp_path) == "postgresql://db/users"

    monkeypatch.setenv("USERS_DATABASE_URL", "postgresql://other/accounts")
    assert database_url(users, tmp_path) == "postgresql://other/accounts"


def test_the_generated_admin_password_is_kept_private_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    password, generated = admin_password(tmp_path)
    assert generated and len(password) >= 16
    kept = tmp_path / "admin-password"
    assert kept.stat().st_mode & 0o077 == 0
    assert admin_password(tmp_path) == (password, True)

    monkeypatch.setenv("ADMIN_PASSWORD", "chosen by the operator")
    assert admin_password(tmp_path) == ("chosen by the operator", False)
