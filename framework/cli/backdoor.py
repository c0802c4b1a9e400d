"""``framework backdoor PORT``: attach to a service's live-debugging console.

The console is served by ``framework run --backdoor-port PORT`` on 127.0.0.1 only;
from another machine, tunnel to it (``ssh -L PORT:127.0.0.1:PORT host``). This is a
minimal line client (nameko shells out to telnet, which few systems still ship).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import IO

from framework.exceptions import CommandError

NAME = "backdoor"


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="attach to a running service's backdoor console",
        description="Connect to the Python console of `framework run "
        "--backdoor-port PORT` on this machine. Ctrl-D leaves it.",
    )
    parser.add_argument("port", type=int, help="the port given to --backdoor-port")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        connection = socket.create_connection(("127.0.0.1", args.port), timeout=5)
    except OSError as exc:
        raise CommandError(
            f"no backdoor on 127.0.0.1:{args.port} ({exc.strerror or exc}); "
            "was the service run with --backdoor-port?"
        ) from None
    connection.settimeout(None)
    with connection:
        relay(connection, sys.stdin, sys.stdout)
    return 0


def relay(connection: socket.socket, stdin: IO[str], stdout: IO[str]) -> None:
    """Copy the console's output to ``stdout`` and ``stdin``'s lines to it, until
    either side ends."""

    def show() -> None:
        while data := connection.recv(4096):
            stdout.write(data.decode("utf-8", "replace"))
            stdout.flush()

    reader = threading.Thread(target=show, name="backdoor-output", daemon=True)
    reader.start()
    try:
        for line in stdin:
            connection.sendall(line.encode())
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service went away
    try:
        connection.shutdown(socket.SHUT_WR)  # the console sees end of input
    except OSError:
        pass
    reader.join(timeout=5)
