"""nameko's command classes (``framework.cli.commands``) over our command modules."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from framework.cli import commands
from framework.cli.main import setup_parser


def test_command_classes_name_subcommands_of_the_console_script() -> None:
    parser = setup_parser()
    subparsers = next(
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )

    names = {command.name for command in commands.commands}

    assert names == {"backdoor", "run", "shell", "show-config"}
    assert names <= set(subparsers.choices)


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (commands.Run, ["svc:Service", "--backdoor-port", "4000", "--broker", "x"]),
        (commands.Shell, ["--interface", "plain", "--define", "A=1"]),
        (commands.ShowConfig, ["--config", "other.yaml"]),
        (commands.Backdoor, ["localhost:4000"]),
    ],
)
def test_init_parser_adds_the_same_options_as_the_console_script(
    command: type[commands.Command], argv: list[str]
) -> None:
    own = vars(command.init_parser(argparse.ArgumentParser()).parse_args(argv))
    script = vars(setup_parser().parse_args([command.name, *argv]))

    # The console script adds which command it chose and that command's main.
    assert script.pop("command") == command.name
    assert script.pop("main") is command.module.main
    assert own == script


def test_main_runs_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "config.yaml"
    config.write_text("FOO: ${COMMANDS_TEST_UNSET:foobar}\n")
    args = commands.ShowConfig.init_parser(argparse.ArgumentParser()).parse_args(
        ["--config", str(config)]
    )

    assert commands.ShowConfig.main(args) == 0
    assert capsys.readouterr().out == "FOO: foobar\n"
