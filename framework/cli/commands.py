"""nameko's command classes (``nameko.cli.commands``) over our command modules.

nameko describes each subcommand as a class with a ``name``, an
``init_parser(parser)`` that adds its options to a parser made for it, and a
``main(args)``; code that builds its own parser, or calls a command directly, uses
them. Our console script is built from the modules in
``framework.cli.main.COMMAND_MODULES`` instead; each class here delegates to one of
those modules, so both paths run the same code.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import ClassVar

from framework.cli import backdoor, run, shell, show_config

__all__ = ["Backdoor", "Command", "Run", "Shell", "ShowConfig", "commands"]


class Command:
    """A subcommand: ``name``, ``init_parser(parser)`` and ``main(args)``."""

    name: ClassVar[str]
    module: ClassVar[ModuleType]

    @classmethod
    def init_parser(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the command's options to ``parser``; returns it."""
        return cls.module.add_arguments(parser)

    @classmethod
    def main(cls, args: argparse.Namespace) -> int | None:
        """Run the command with parsed ``args``; the exit code."""
        return cls.module.main(args)


class Backdoor(Command):
    """Attach to a service's backdoor console (``framework run --backdoor-port``)."""

    name = backdoor.NAME
    module: ClassVar[ModuleType] = backdoor


class Run(Command):
    """Run services until SIGTERM or Ctrl-C."""

    name = run.NAME
    module: ClassVar[ModuleType] = run


class Shell(Command):
    """An interactive Python shell with ``n.rpc`` and ``n.dispatch_event``."""

    name = shell.NAME
    module: ClassVar[ModuleType] = shell


class ShowConfig(Command):
    """Print the config after environment substitution."""

    name = show_config.NAME
    module: ClassVar[ModuleType] = show_config


#: Every command class, as ``nameko.cli.commands.commands`` lists them.
commands: list[type[Command]] = [Backdoor, Run, Shell, ShowConfig]
