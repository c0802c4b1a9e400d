"""``framework dead-letters list|replay QUEUE``: inspect and replay dead letters."""

from __future__ import annotations

import argparse
import sys

from framework.cli.config import add_config_arguments, setup_config

NAME = "dead-letters"


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="inspect or replay dead-lettered messages",
        description="List the dead letters of a queue (left in place), or replay them "
        "to their original exchange and routing key.",
    )
    parser.add_argument("action", choices=("list", "replay"))
    parser.add_argument(
        "queue", help="the source queue, e.g. evt-orders-order_created--billing.handle"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many messages"
    )
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from framework import deadletters

    config = setup_config(args.config, args.define, args.broker)
    if args.action == "list":
        letters = deadletters.peek(config, args.queue, limit=args.limit or 100)
        for letter in letters:
            # Sensitive arguments (passwords...) masked: see display_body.
            body = deadletters.display_body(letter)
            sys.stdout.write(
                f"{letter.original_exchange or '(default)'} {letter.original_routing_key}"
                f" [{letter.reason}] {body[:200]}\n"
            )
        sys.stdout.write(f"{len(letters)} dead letter(s)\n")
    else:
        count = deadletters.replay(config, args.queue, limit=args.limit)
        sys.stdout.write(f"replayed {count} message(s)\n")
    return 0
