"""``framework db``, through the installed console script."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .cli_helpers import cli_env, run_cli

REVISION = '''
"""create items"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("items")
'''


def make_service(
    root: Path, config: str = "DATABASE_URL: sqlite:///shop.sqlite3\n"
) -> Path:
    """``<root>/services/shop`` with a config, initialised migrations and one revision."""
    service = root / "services" / "shop"
    service.mkdir(parents=True)
    (service / "config.yaml").write_text(config)
    result = run_cli(["db", "init", "services/shop"], cwd=root)
    assert result.returncode == 0, result.stderr
    # This throwaway service has no models module for env.py to import.
    (service / "migrations" / "env.py").write_text(
        "from alembic import context\n"
        "from framework.migrations import run_migrations\n"
        "run_migrations(context)\n"
    )
    (service / "migrations" / "versions" / "0001_create_items.py").write_text(REVISION)
    return service


def test_db_is_a_subcommand_with_the_migration_commands(tmp_path: Path) -> None:
    result = run_cli(["db", "--help"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for command in (
        "upgrade",
        "downgrade",
        "current",
        "heads",
        "history",
        "revision",
        "init",
    ):
        assert command in result.stdout


def test_init_creates_the_migrations_folder_and_says_what_it_created(
    tmp_path: Path,
) -> None:
    (tmp_path / "services" / "shop").mkdir(parents=True)

    result = run_cli(["db", "init", "shop"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    migrations = tmp_path / "services" / "shop" / "migrations"
    assert f"created {migrations / 'env.py'}" in result.stdout
    assert (migrations / "script.py.mako").is_file()
    assert (migrations / "versions").is_dir()


def test_upgrade_current_and_downgrade_by_service_name(tmp_path: Path) -> None:
    make_service(tmp_path)

    upgrade = run_cli(["db", "upgrade", "shop"], cwd=tmp_path)
    current = run_cli(["db", "current", "shop"], cwd=tmp_path)
    downgrade = run_cli(["db", "downgrade", "shop", "--revision", "base"], cwd=tmp_path)
    after = run_cli(["db", "current", "shop"], cwd=tmp_path)

    assert upgrade.returncode == 0, upgrade.stderr
    assert "Running upgrade  -> 0001" in upgrade.stderr
    assert current.stdout == "0001 (head)\n"
    assert downgrade.returncode == 0, downgrade.stderr
    assert after.stdout == ""
    # The relative SQLite path in config.yaml is relative to where the command runs,
    # as it is for `framework run`.
    assert (tmp_path / "shop.sqlite3").is_file()


def test_the_database_url_comes_from_the_environment_through_the_config(
    tmp_path: Path,
) -> None:
    make_service(
        tmp_path,
        config="DATABASE_URL: ${SHOP_DATABASE_URL:sqlite:///default.sqlite3}\n",
    )
    url = f"sqlite:///{tmp_path}/from-env.sqlite3"

    result = run_cli(
        ["db", "upgrade", "shop"], cwd=tmp_path, env=cli_env(SHOP_DATABASE_URL=url)
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-env.sqlite3").is_file()
    assert not (tmp_path / "default.sqlite3").exists()


def test_config_and_define_options_override_the_service_config(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("DATABASE_URL: sqlite:///other.sqlite3\n")

    from_file = run_cli(
        ["db", "upgrade", str(service), "--config", str(other)], cwd=tmp_path
    )
    defined = run_cli(
        ["db", "upgrade", str(service), "-d", "DATABASE_URL=sqlite:///defined.sqlite3"],
        cwd=tmp_path,
    )

    assert from_file.returncode == 0, from_file.stderr
    assert defined.returncode == 0, defined.stderr
    assert (tmp_path / "other.sqlite3").is_file()
    assert (tmp_path / "defined.sqlite3").is_file()
    assert not (tmp_path / "shop.sqlite3").exists()


def test_revision_writes_a_new_revision_file(tmp_path: Path) -> None:
    service = make_service(tmp_path)

    result = run_cli(["db", "revision", "shop", "-m", "add prices"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    (created,) = [
        path for path in (service / "migrations" / "versions").glob("*add_prices.py")
    ]
    assert f"created {created}" in result.stdout
    assert "down_revision = '0001'" in created.read_text()


def test_an_unknown_service_is_reported_with_exit_code_1(tmp_path: Path) -> None:
    result = run_cli(["db", "upgrade", "nowhere"], cwd=tmp_path)

    assert result.returncode == 1
    assert "Error: no service found for 'nowhere'" in result.stderr


def test_a_service_without_migrations_is_told_how_to_create_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "services" / "shop").mkdir(parents=True)

    result = run_cli(["db", "upgrade", "shop"], cwd=tmp_path)

    assert result.returncode == 1
    assert "create it with `framework db init shop`" in result.stderr


def test_an_unreachable_database_is_reported_without_its_password(
    tmp_path: Path,
) -> None:
    make_service(
        tmp_path,
        config=textwrap.dedent(
            """
            DATABASE_URL: postgresql://postgres:secret@127.0.0.1:1/shop
            """
        ),
    )

    result = run_cli(["db", "upgrade", "shop"], cwd=tmp_path)

    assert result.returncode == 1
    assert (
        "Error: shop: database postgresql://postgres:********@127.0.0.1:1/shop"
        in result.stderr
    )
    assert "secret" not in result.stderr
