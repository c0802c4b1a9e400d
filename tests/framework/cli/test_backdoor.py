"""``framework run --backdoor-port``, ``setup_backdoor`` and ``framework backdoor``."""

from __future__ import annotations

import argparse
import io
import re
import socket
from collections.abc import Iterator

import pytest

from framework import concurrency
from framework.cli.backdoor import parse_target, relay
from framework.cli.main import main
from framework.cli.run import run, setup_backdoor


def test_the_console_runs_code_in_the_given_namespace_on_loopback_only():
    thread, port = concurrency.backdoor_server(0, {"answer": 42})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            output = io.StringIO()
            relay(connection, io.StringIO("answer + 1\n"), output)
        assert "43" in output.getvalue()
    finally:
        concurrency.kill(thread)


def test_run_refuses_a_backdoor_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
            run([], {}, backdoor_port=port)


def test_backdoor_client_without_a_console_is_a_clear_error(capsys):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert main(["backdoor", str(port)]) == 1
    assert "--backdoor-port" in capsys.readouterr().err


class Runner:
    def __repr__(self) -> str:
        return "<the runner>"


@pytest.fixture
def backdoor() -> Iterator[tuple[str, int]]:
    """A backdoor served by ``setup_backdoor`` for a stand-in runner; its address."""
    listener, thread = setup_backdoor(Runner(), 0)
    try:
        yield listener.getsockname()[:2]
    finally:
        concurrency.kill(thread)


def read_until_prompt(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b">>> "):
        part = connection.recv(4096)
        if not part:
            raise AssertionError(f"the console closed the connection after {data!r}")
        data += part
    return data.decode()


def console_output(address: tuple[str, int], *lines: str) -> str:
    """What the console answers to ``lines``, typed one at a time.

    One at a time, as a person types: eventlet's console reads through a text file
    that drops what it has read ahead whenever it writes, so lines sent together
    are lost after the first answer.
    """
    with socket.create_connection(address, timeout=5) as connection:
        read_until_prompt(connection)  # the banner
        answers = []
        for line in lines:
            connection.sendall(line.encode() + b"\n")
            answers.append(read_until_prompt(connection))
    return "".join(answers)


def test_setup_backdoor_serves_the_runner_on_loopback_by_default(backdoor):
    host, _ = backdoor

    assert host == "127.0.0.1"
    assert "<the runner>" in console_output(backdoor, "runner")


def test_setup_backdoor_listens_on_a_host_given_explicitly():
    listener, thread = setup_backdoor(Runner(), 0, host="127.0.0.2")
    try:
        address = listener.getsockname()[:2]
        assert address[0] == "127.0.0.2"
        assert "<the runner>" in console_output(address, "runner")
    finally:
        concurrency.kill(thread)


def test_quit_and_exit_in_the_backdoor_raise_instead_of_ending_the_process(backdoor):
    # Without the guard, SystemExit from the console's green thread ends the whole
    # process: this test run would stop here.
    output = console_output(backdoor, "quit()", "exit()", "6 * 7")

    assert output.count("RuntimeError: This would kill your service") == 2
    assert "42" in output


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("4000", ("127.0.0.1", 4000)),
        ("localhost:4000", ("localhost", 4000)),
        ("[::1]:4000", ("::1", 4000)),
    ],
)
def test_backdoor_client_takes_a_port_or_host_and_port(text, target):
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["host:", "four", "70000"])
def test_backdoor_client_rejects_a_malformed_target(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_target(text)


def test_the_client_sends_each_piped_line_once_the_console_asks_for_it(backdoor):
    with socket.create_connection(backdoor, timeout=5) as connection:
        output = io.StringIO()
        script = "1 + 1\n2 + 2\ndef five():\n    return 5\n\nfive()\n"
        relay(connection, io.StringIO(script), output)

    # Each answer follows the prompt of the line that asked for it.
    answers = re.findall(r"^(?:>>> |\.\.\. )*(\d+)$", output.getvalue(), re.M)
    assert answers == ["2", "4", "5"]
