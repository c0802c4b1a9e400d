"""The ``framework`` entry point: subcommand plumbing, version, error reporting."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from framework.cli import main as cli_main

from .cli_helpers import run_cli


def test_version_names_the_installed_distribution() -> None:
    result = run_cli(["--version"])

    assert result.returncode == 0
    assert result.stdout.startswith("framework ")


def test_no_command_prints_usage_and_fails() -> None:
    result = run_cli([])

    assert result.returncode == 2
    assert "usage: framework" in result.stderr


def test_help_lists_every_builtin_command() -> None:
    result = run_cli(["--help"])

    for command in ("run", "shell", "show-config"):
        assert command in result.stdout


def test_optional_command_module_plugs_in_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = f"cli_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module_name}.py").write_text(
        textwrap.dedent(
            """
            def init_parser(subparsers):
                parser = subparsers.add_parser("greet")
                parser.add_argument("name")
                return parser

            def main(args):
                return 7 if args.name == "plugin" else 0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli_main, "OPTIONAL_COMMAND_MODULES", (module_name, "no_such_cli_module")
    )

    try:
        assert cli_main.main(["greet", "plugin"]) == 7
    finally:
        sys.modules.pop(module_name, None)


def test_command_and_configuration_errors_go_to_stderr_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"

    assert cli_main.main(["show-config", "--config", str(missing)]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"Error: config file '{missing}' does not exist\n"
