"""``framework shell``: a piped script through the console script (stdin is not a
terminal in tests), and the interactive shells through ``ShellRunner`` with a
terminal faked.

Calling a running service through ``n.rpc`` is covered by the RPC integration
tests; these cover the shell itself, and only ``make_nameko_helper``'s connection
needs a broker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from framework.cli import shell
from framework.cli.shell import (
    BrokerUnreachable,
    ShellRunner,
    make_helper,
    make_nameko_helper,
)
from framework.exceptions import CommandError
from framework.rpc import ClusterProxy

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


def test_nameko_helper_connects_at_once(rabbit_config: dict[str, Any]) -> None:
    helper = make_nameko_helper(rabbit_config)
    try:
        assert isinstance(helper.rpc, ClusterProxy)
        assert helper.config is rabbit_config
    finally:
        helper.disconnect()


def test_nameko_helper_with_the_broker_down_fails_when_made() -> None:
    with pytest.raises(BrokerUnreachable, match="127.0.0.1:1"):
        make_nameko_helper({"AMQP_URI": UNREACHABLE_BROKER})


class Terminal:
    """A stdin that says it is a terminal (and must not be read: shells are faked)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", Terminal())


@pytest.fixture
def interact(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``code.interact`` replaced: each call's keyword arguments."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(shell.code, "interact", lambda **kwargs: calls.append(kwargs))
    return calls


def without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` fail to import, installed or not."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_interactive_shell_runs_pythonstartup_in_the_namespace(
    terminal: None,
    interact: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    startup = tmp_path / "startup.py"
    startup.write_text("foo = 42\n")
    monkeypatch.setenv("PYTHONSTARTUP", str(startup))
    namespace: dict[str, Any] = {"n": "helper"}

    assert ShellRunner("the banner", namespace).start_shell("plain") == 0

    [call] = interact
    assert call["banner"] == "the banner"
    assert call["local"] is namespace
    assert namespace["foo"] == 42


def test_default_shell_falls_back_to_plain_when_no_other_is_installed(
    terminal: None, interact: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    without(monkeypatch, "IPython", "bpython")

    ShellRunner("banner", {}).start_shell(None)

    assert len(interact) == 1


def test_shell_asked_for_but_not_installed_is_a_command_error(
    terminal: None, interact: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    without(monkeypatch, "bpython")

    with pytest.raises(CommandError, match="bpython is not installed"):
        ShellRunner("banner", {}).start_shell("bpython")
    assert interact == []


def test_ipython_and_bpython_get_the_namespace_and_banner(
    terminal: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, dict[str, Any]] = {}
    fake_ipython = type(sys)("IPython")
    fake_ipython.embed = lambda **kwargs: calls.setdefault("ipython", kwargs)  # type: ignore[attr-defined]
    fake_bpython = type(sys)("bpython")
    fake_bpython.embed = lambda **kwargs: calls.setdefault("bpython", kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    monkeypatch.setitem(sys.modules, "bpython", fake_bpython)
    namespace: dict[str, Any] = {}

    ShellRunner("the banner", namespace).start_shell("ipython")
    ShellRunner("the banner", namespace).start_shell("bpython")

    assert calls["ipython"] == {"banner1": "the banner", "user_ns": namespace}
    assert calls["bpython"] == {"banner": "the banner", "locals_": namespace}


def test_help_lists_bpython_as_an_interface() -> None:
    result = run_cli(["shell", "--help"])

    assert "bpython" in result.stdout
