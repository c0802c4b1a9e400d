"""``framework shell`` with a piped script (stdin is not a terminal in tests).

Calling a running service through ``n.rpc`` is covered by the RPC integration
tests; these cover the shell itself, none of which needs a broker.
"""

from __future__ import annotations

from pathlib import Path

from framework.cli.shell import make_helper

from .cli_helpers import run_cli

UNREACHABLE_BROKER = "pyamqp://guest:secret@127.0.0.1:1//"


def test_piped_script_sees_the_config_without_connecting() -> None:
    result = run_cli(["shell", "--broker", "X"], stdin='print(n.config["AMQP_URI"])\n')

    assert result.returncode == 0, result.stderr
    assert result.stdout == "X\n"


def test_define_wins_over_broker() -> None:
    result = run_cli(
        ["shell", "--broker", "X", "--define", "AMQP_URI=Y"],
        stdin='print(n.config["AMQP_URI"])\n',
    )

    assert result.stdout == "Y\n"


def test_config_file_wins_over_broker(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("AMQP_URI: from-file\n")

    result = run_cli(
        ["shell", "--config", str(config), "--broker", "X"],
        stdin='print(n.config["AMQP_URI"])\n',
    )

    assert result.stdout == "from-file\n"


def test_piped_script_runs_as_a_whole_program() -> None:
    script = "def greet(name):\n    return 'hi ' + name\nfor name in ['a', 'b']:\n    print(greet(name))\n"

    result = run_cli(["shell"], stdin=script)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi a\nhi b\n"


def test_script_that_raises_exits_non_zero_with_its_traceback() -> None:
    result = run_cli(
        ["shell"], stdin="print('before')\nraise ValueError('boom')\nprint('after')\n"
    )

    assert result.returncode == 1
    assert result.stdout == "before\n"
    assert "ValueError: boom" in result.stderr


def test_script_exit_code_is_the_shells_exit_code() -> None:
    result = run_cli(["shell"], stdin="import sys\nsys.exit(3)\n")

    assert result.returncode == 3


def test_rpc_proxy_does_not_connect_until_used() -> None:
    result = run_cli(
        ["shell", "--broker", UNREACHABLE_BROKER], stdin="print(repr(n.rpc))\n"
    )

    assert result.returncode == 0, result.stderr
    assert "not connected yet" in result.stdout
    assert "secret" not in result.stdout


def test_using_rpc_with_the_broker_down_is_a_clear_error() -> None:
    result = run_cli(
        ["shell", "--broker", UNREACHABLE_BROKER], stdin="n.rpc.greeter.hello('x')\n"
    )

    assert result.returncode == 1
    assert (
        "BrokerUnreachable: cannot connect to the broker at pyamqp://guest:********@127.0.0.1:1//"
        in (result.stderr)
    )


def test_private_attribute_probes_do_not_connect() -> None:
    # IPython and tab completion look up names like _repr_html_ on every object.
    helper = make_helper({"AMQP_URI": UNREACHABLE_BROKER})

    assert not hasattr(helper.rpc, "_repr_html_")
    assert "not connected yet" in repr(helper.rpc)


def test_disconnect_before_use_is_harmless() -> None:
    helper = make_helper({"AMQP_URI": UNREACHABLE_BROKER})

    helper.disconnect()

    assert "not connected yet" in repr(helper.rpc)
