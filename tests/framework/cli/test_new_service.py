"""``framework new-service``: a generated service passes its own tests as generated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.cli.new_service import class_name

from .cli_helpers import cli_env, run_cli

PROJECT_DIR = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
SERVICE = "order_history"
ROLES = {
    "__init__.py",
    "service.py",
    "models.py",
    "schemas.py",
    "exceptions.py",
    "dependencies.py",
    "config.yaml",
    "README.md",
    "migrations/env.py",
    "migrations/script.py.mako",
    "migrations/versions/0001_initial.py",
}


def generate(root: Path, name: str = SERVICE) -> subprocess.CompletedProcess[str]:
    return run_cli(["new-service", name, "--root", str(root)], cwd=root)


def test_new_service_lays_out_every_role_and_its_tests(tmp_path: Path) -> None:
    result = generate(tmp_path)

    assert result.returncode == 0, result.stderr
    service = tmp_path / "services" / SERVICE
    found = {
        str(path.relative_to(service))
        for path in service.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert found == ROLES
    tests = tmp_path / "tests" / "services" / SERVICE
    assert {path.name for path in tests.glob("*.py")} == {
        "conftest.py",
        "test_service.py",
        "test_integration.py",
    }
    text = (service / "service.py").read_text()
    assert f"class {class_name(SERVICE)}Service:" in text
    assert f'name = "{SERVICE}"' in text
    assert "{{" not in "".join(p.read_text() for p in service.rglob("*.py"))
    assert "docs/adding-a-service.md" in result.stdout


def test_new_service_refuses_a_bad_name_or_an_existing_folder(tmp_path: Path) -> None:
    for bad in ("Orders", "order-history", "class", "9lives", "framework"):
        result = generate(tmp_path, bad)
        assert result.returncode == 1
        assert "invalid service name" in result.stderr
    assert not (tmp_path / "services").exists()

    assert generate(tmp_path).returncode == 0
    readme = tmp_path / "services" / SERVICE / "README.md"
    readme.write_text("my notes")
    again = generate(tmp_path)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert readme.read_text() == "my notes"


@pytest.mark.integration
def test_the_generated_service_passes_its_tests_and_the_linter(tmp_path: Path) -> None:
    assert generate(tmp_path).returncode == 0
    lint = subprocess.run(
        [
            str(BIN / "ruff"),
            "check",
            "--config",
            str(PROJECT_DIR / "pyproject.toml"),
            # In the project, these two are first-party by their folders.
            "--config",
            "lint.isort.known-first-party=['framework', 'services']",
            ".",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout
    formatted = subprocess.run(
        [
            str(BIN / "ruff"),
            "format",
            "--check",
            "--config",
            str(PROJECT_DIR / "pyproject.toml"),
            ".",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert formatted.returncode == 0, formatted.stdout

    # The generated tests, as the project runs them: importlib mode, the project's
    # fixtures (the framework's pytest plugin), its own services/ first on the path.
    env = cli_env(PYTHONPATH=str(tmp_path))
    env.pop("PYTEST_ADDOPTS", None)
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            f"tests/services/{SERVICE}",
        ],
        cwd=tmp_path,
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "6 passed" in tests.stdout, tests.stdout
