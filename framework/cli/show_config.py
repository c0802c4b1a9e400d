"""``framework show-config``: the config a service would run with, after substitution.

Useful to check what ``${...}`` references resolve to in a given environment before
deploying. Note that secrets come out in clear text.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from framework.cli.config import DEFAULT_CONFIG_FILE, add_config_arguments, setup_config

NAME = "show-config"


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="print the loaded config",
        description="Print the config, after environment substitution and --define, "
        "as block-style YAML.",
    )
    return add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``show-config`` on ``parser`` (nameko's
    ``ShowConfig.init_parser`` too)."""
    add_config_arguments(parser, default_config=DEFAULT_CONFIG_FILE, broker=False)
    return parser


def main(args: argparse.Namespace) -> int:
    config = setup_config(args.config, args.define)
    sys.stdout.write(render(config))
    return 0


def render(config: dict) -> str:
    """Block-style YAML, keys in the order the file gives them."""
    return yaml.safe_dump(
        config, default_flow_style=False, sort_keys=False, allow_unicode=True
    )
