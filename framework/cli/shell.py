"""``framework shell``: an interactive Python shell wired to the cluster.

The namespace holds ``n``::

    >>> n.rpc.greeter.hello("Ada")               # RPC to any running service
    >>> n.dispatch_event("greeter", "greeted", {"name": "Ada"})
    >>> n.config                                  # the loaded config
    >>> n.disconnect()                            # close the RPC connection

``n.rpc`` connects on first use, so the shell starts (and ``n.config`` works) even
when the broker is down; using it then raises ``BrokerUnreachable`` with the URI.

With stdin not a terminal, the piped text runs as one script and the exit code is
non-zero if it raised::

    echo 'print(n.rpc.greeter.hello("x"))' | framework shell

(nameko fed piped text to its interactive console line by line; a whole script runs
as written, blank lines inside a function included.)

nameko's API is here too: ``make_nameko_helper(config)`` (connects at once, as
nameko's did) and ``ShellRunner(banner, namespace).start_shell(interface)``.

Like nameko's shell, this does not monkey-patch: the standalone proxies use
blocking sockets, and patching underneath IPython breaks its prompt.
"""

from __future__ import annotations

import argparse
import code
import os
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from framework.cli.config import add_config_arguments, load_config, setup_config
from framework.constants import AMQP_URI_CONFIG_KEY
from framework.exceptions import CommandError
from framework.utils import sanitize_url

NAME = "shell"
#: Tried in this order when no --interface is given.
INTERFACES = ("ipython", "bpython", "plain")
HELPER_DOC = """Shell helper for calling services and dispatching events.

    >>> n.rpc.<service>.<method>(*args, **kwargs)
    >>> n.dispatch_event(service_name, event_type, payload)
    >>> n.config
    >>> n.disconnect()
"""


class BrokerUnreachable(ConnectionError):
    """The shell could not talk to the broker; raised on use of ``n.rpc`` and friends."""


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="interactive shell for calling services",
        description="Python shell with `n.rpc.<service>.<method>()`, "
        "`n.dispatch_event()`, `n.config` and `n.disconnect()`. Reads a script "
        "from stdin when it is not a terminal.",
    )
    return add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``shell`` on ``parser`` (nameko's ``Shell.init_parser`` too)."""
    parser.add_argument(
        "--interface",
        choices=INTERFACES,
        help="shell to use (default: the first of ipython, bpython, plain that is "
        "installed)",
    )
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    config = setup_config(args.config, args.define, args.broker)
    # As ``run`` does: scripts piped in may import the project's own modules.
    if "." not in sys.path:
        sys.path.insert(0, ".")
    helper = make_helper(config)
    namespace: dict[str, Any] = {
        "__name__": "__console__",
        "__doc__": None,
        "n": helper,
    }
    try:
        banner = make_banner(config, broker_source(args, config))
        return ShellRunner(banner, namespace).start_shell(args.interface)
    finally:
        helper.disconnect()


def broker_source(args: argparse.Namespace, config: dict[str, Any]) -> str:
    """Where ``AMQP_URI`` came from, for the banner."""
    if args.config is not None and AMQP_URI_CONFIG_KEY in load_config(args.config):
        return "--config"
    if any(
        option.partition("=")[0].strip() == AMQP_URI_CONFIG_KEY
        for option in args.define
    ):
        return "--define"
    return "--broker"


def make_banner(config: dict[str, Any], source: str) -> str:
    uri = sanitize_url(str(config.get(AMQP_URI_CONFIG_KEY, "")))
    suffix = "" if source == "--broker" else f" (from {source})"
    return (
        f"framework Python {sys.version} shell on {sys.platform}\n"
        f"Broker: {uri}{suffix}\n"
        f"Try: n.rpc.<service>.<method>(...), n.dispatch_event(service, event_type, payload)"
    )


# -- the `n` helper ----------------------------------------------------------------


class LazyClusterRpc:
    """``n.rpc``: a ``ClusterRpcProxy`` started on first attribute access.

    Names starting with ``_`` never connect: IPython and tab completion probe objects
    for ``_repr_html_`` and friends, and that must not dial the broker.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._standalone: Any = None
        self._proxy: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._connect(), name)

    def __repr__(self) -> str:
        state = "connected" if self._proxy is not None else "not connected yet"
        return f"<cluster RPC proxy to {_broker(self._config)} ({state})>"

    def _connect(self) -> Any:
        if self._proxy is None:
            try:
                from framework.standalone.rpc import ClusterRpcProxy
            except ImportError as exc:
                raise CommandError(f"RPC is unavailable: {exc}") from None
            standalone = ClusterRpcProxy(self._config)
            try:
                self._proxy = standalone.start()
            except _connection_errors() as exc:
                raise BrokerUnreachable(
                    f"cannot connect to the broker at {_broker(self._config)}: {exc}. "
                    f"Is RabbitMQ running, and is --broker / {AMQP_URI_CONFIG_KEY} right? "
                    f"n.rpc tries again on next use."
                ) from None
            self._standalone = standalone
        return self._proxy

    def _disconnect(self) -> None:
        standalone, self._standalone, self._proxy = self._standalone, None, None
        if standalone is not None:
            standalone.stop()


class LazyEventDispatcher:
    """``n.dispatch_event``: builds the standalone dispatcher on first call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._dispatch: Callable[[str, str, Any], None] | None = None

    def __call__(self, service_name: str, event_type: str, event_data: Any) -> None:
        if self._dispatch is None:
            try:
                from framework.standalone.events import event_dispatcher
            except ImportError as exc:
                raise CommandError(f"event dispatch is unavailable: {exc}") from None
            self._dispatch = event_dispatcher(self._config)
        try:
            self._dispatch(service_name, event_type, event_data)
        except _connection_errors() as exc:
            raise BrokerUnreachable(
                f"cannot dispatch {service_name}.{event_type} via the broker at "
                f"{_broker(self._config)}: {exc}"
            ) from None


def make_helper(config: dict[str, Any]) -> ModuleType:
    """The ``n`` module object the shell namespace exposes; connects on first use."""
    helper = ModuleType("n", HELPER_DOC)
    rpc = LazyClusterRpc(config)
    helper.rpc = rpc  # type: ignore[attr-defined]
    helper.dispatch_event = LazyEventDispatcher(config)  # type: ignore[attr-defined]
    helper.config = config  # type: ignore[attr-defined]
    helper.disconnect = rpc._disconnect  # type: ignore[attr-defined]
    return helper


def make_nameko_helper(config: dict[str, Any]) -> ModuleType:
    """nameko's helper: ``make_helper``'s ``n``, but connected at once, so that
    ``n.rpc`` is the started ``ClusterProxy`` and an unreachable broker fails here
    (``BrokerUnreachable``) rather than on first use."""
    helper = make_helper(config)
    helper.rpc = helper.rpc._connect()  # type: ignore[attr-defined]
    return helper


def _broker(config: dict[str, Any]) -> str:
    return sanitize_url(str(config.get(AMQP_URI_CONFIG_KEY, "")))


def _connection_errors() -> tuple[type[BaseException], ...]:
    # Imported here so the shell starts without loading kombu.
    import amqp.exceptions
    import kombu.exceptions

    return (OSError, kombu.exceptions.OperationalError, amqp.exceptions.ConnectionError)


# -- shells ------------------------------------------------------------------------


def run_script(source: str, namespace: dict[str, Any]) -> int:
    """Run piped-in text as one script; 1 if it raised, its code if it exited."""
    try:
        exec(compile(source, "<stdin>", "exec"), namespace)  # noqa: S102 - that is the feature
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    sys.stderr.write(f"{exc.code}\n")
    return 1


class ShellRunner:
    """Runs ``namespace`` in the shell asked for: a piped script when stdin is not a
    terminal, else ``interface`` (or the first installed of ``INTERFACES``).

    ``PYTHONSTARTUP`` runs in the namespace before an interactive shell, whichever it
    is, as the plain interpreter does it.
    """

    def __init__(self, banner: str, local: dict[str, Any]) -> None:
        self.banner = banner
        self.local = local

    def start_shell(self, name: str | None = None) -> int:
        """Run the shell; the exit code."""
        if not sys.stdin.isatty():
            return run_script(sys.stdin.read(), self.local)
        run_startup_file(self.local)
        for candidate in [name] if name is not None else INTERFACES:
            # Only the import is guarded: an ImportError inside a running shell is
            # the session's business, not a sign the shell is missing.
            try:
                shell = self.load(candidate)
            except ImportError:
                if name is not None:
                    raise CommandError(
                        f"{name} is not installed; use --interface plain"
                    ) from None
                continue
            return shell()
        raise AssertionError("the plain shell is always available")

    def load(self, name: str) -> Callable[[], int]:
        """Shell ``name``, ready to run; ImportError if it is not installed."""
        if name == "ipython":
            from IPython import embed

            def ipython() -> int:
                embed(banner1=self.banner, user_ns=self.local)
                return 0

            return ipython
        if name == "bpython":
            import bpython  # type: ignore[import-not-found]

            def run_bpython() -> int:
                bpython.embed(locals_=self.local, banner=self.banner)
                return 0

            return run_bpython
        if name == "plain":
            return self.plain
        raise CommandError(f"unknown shell {name!r}; one of {', '.join(INTERFACES)}")

    def plain(self) -> int:
        try:
            import readline
            import rlcompleter
        except ImportError:
            pass  # no readline on this platform: no tab completion, still a shell
        else:
            readline.set_completer(rlcompleter.Completer(self.local).complete)
            readline.parse_and_bind("tab: complete")
        try:
            code.interact(banner=self.banner, local=self.local, exitmsg="")
        except SystemExit as exc:
            return _exit_code(exc)
        return 0


def run_startup_file(namespace: dict[str, Any]) -> None:
    startup = os.environ.get("PYTHONSTARTUP")
    if startup and os.path.isfile(startup):
        with open(startup, encoding="utf-8") as stream:
            exec(compile(stream.read(), startup, "exec"), namespace)  # noqa: S102
