"""``framework backdoor [HOST:]PORT``: attach to a service's live-debugging console.

The console is served by ``framework run --backdoor-port PORT`` on 127.0.0.1 only;
from another machine, tunnel to it (``ssh -L PORT:127.0.0.1:PORT host``). ``HOST``
defaults to 127.0.0.1; naming one reaches a console that ``setup_backdoor`` was
explicitly told to serve elsewhere. This is a minimal line client (nameko shells out
to telnet or netcat under rlwrap, which few systems still ship).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import IO

from framework.exceptions import CommandError

NAME = "backdoor"
DEFAULT_HOST = "127.0.0.1"


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="attach to a running service's backdoor console",
        description="Connect to the Python console of `framework run "
        "--backdoor-port PORT` on this machine. Ctrl-D leaves it.",
    )
    return add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``backdoor`` on ``parser`` (nameko's ``Backdoor.init_parser``)."""
    parser.add_argument(
        "target",
        type=parse_target,
        metavar="[HOST:]PORT",
        help=f"the port given to --backdoor-port (host: {DEFAULT_HOST})",
    )
    return parser


def parse_target(text: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (``[::1]:PORT`` for an IPv6 address)."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PORT or HOST:PORT (PORT a number)"
        ) from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is not between 0 and 65535")
    return host, number


def main(args: argparse.Namespace) -> int:
    host, port = args.target
    try:
        connection = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        raise CommandError(
            f"Backdoor unreachable on {host}:{port} ({exc.strerror or exc}); "
            "was the service run with --backdoor-port?"
        ) from None
    connection.settimeout(None)
    with connection:
        relay(connection, sys.stdin, sys.stdout)
    return 0


#: What the console prints when it is ready for the next line.
PROMPTS = (">>> ", "... ")


def relay(connection: socket.socket, stdin: IO[str], stdout: IO[str]) -> None:
    """Copy the console's output to ``stdout`` and ``stdin``'s lines to it, until
    either side ends.

    A line is sent only once the console prompts for it: eventlet's console reads
    through a text file that throws away what it has read ahead each time it writes,
    so lines sent together (piped in, or pasted) were lost after the first answer.
    """
    prompted = threading.Event()

    def show() -> None:
        tail = ""
        while data := connection.recv(4096):
            text = data.decode("utf-8", "replace")
            stdout.write(text)
            stdout.flush()
            tail = (tail + text)[-len(PROMPTS[0]) :]
            if tail in PROMPTS:
                prompted.set()
        prompted.set()  # the console is gone: stop waiting for it

    reader = threading.Thread(target=show, name="backdoor-output", daemon=True)
    reader.start()
    try:
        for line in stdin:
            prompted.wait()
            if not reader.is_alive():
                break
            prompted.clear()
            connection.sendall(line.encode())
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service went away
    if reader.is_alive():
        prompted.wait()  # the answer to the last line
    try:
        connection.shutdown(socket.SHUT_WR)  # the console sees end of input
    except OSError:
        pass
    reader.join(timeout=5)
