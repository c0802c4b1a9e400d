"""``framework run --backdoor-port`` and ``framework backdoor``."""

from __future__ import annotations

import io
import socket

import pytest

from framework import concurrency
from framework.cli.backdoor import relay
from framework.cli.main import main
from framework.cli.run import run_services


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
            run_services({}, [], backdoor_port=port)


def test_backdoor_client_without_a_console_is_a_clear_error(capsys):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert main(["backdoor", str(port)]) == 1
    assert "--backdoor-port" in capsys.readouterr().err
