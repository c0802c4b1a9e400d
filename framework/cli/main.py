"""The ``framework`` console script: argparse with one module per subcommand.

A subcommand module exposes two functions:

* ``init_parser(subparsers) -> ArgumentParser``: add its parser with
  ``subparsers.add_parser(...)`` and return it;
* ``main(args) -> int | None``: run the command, returning the exit code.

To add one, list its module in ``COMMAND_MODULES``; modules in
``OPTIONAL_COMMAND_MODULES`` are plugged in only when they exist (``framework db``
lives in ``framework/cli/db.py``). Commands import heavy things (eventlet, kombu,
services) inside ``main``, so building the parser stays cheap and ``run`` can
monkey-patch before anything opens a socket.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from framework.cli.config import ENV_VAR_MATCHER, setup_yaml_parser
from framework.exceptions import CommandError, ConfigurationError

__all__ = ["ENV_VAR_MATCHER", "main", "setup_parser", "setup_yaml_parser"]

PROG = "framework"
COMMAND_MODULES = (
    "framework.cli.run",
    "framework.cli.shell",
    "framework.cli.show_config",
    "framework.cli.dead_letters",
    "framework.cli.new_service",
    "framework.cli.app",
    "framework.cli.backdoor",
)
OPTIONAL_COMMAND_MODULES = ("framework.cli.db",)


def command_modules() -> list[ModuleType]:
    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    for name in OPTIONAL_COMMAND_MODULES:
        # find_spec rather than catching ImportError, so that a command module that
        # exists but is broken fails loudly instead of silently vanishing.
        if importlib.util.find_spec(name) is not None:
            modules.append(importlib.import_module(name))
    return modules


def version() -> str:
    try:
        return importlib.metadata.version(PROG)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run and talk to framework services."
    )
    parser.add_argument(
        "-v", "--version", action="version", version=f"%(prog)s {version()}"
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="<command>", required=True
    )
    for module in command_modules():
        command_parser = module.init_parser(subparsers)
        command_parser.set_defaults(main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = setup_parser()
    args = parser.parse_args(argv)
    try:
        return args.main(args) or 0
    except (CommandError, ConfigurationError) as exc:
        # nameko printed these to stdout and exited 0, so scripts could not tell.
        sys.stderr.write(f"Error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
