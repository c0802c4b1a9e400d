"""``framework run module[:ServiceClass] ...``: host services until told to stop.

SIGTERM or Ctrl-C stops the services gracefully (in-flight workers finish); a second
Ctrl-C kills them. Exit code 0 after a stop, 1 if a service crashed.

Nothing here imports eventlet, kombu or the services at module level: the command
must monkey-patch before any of them load (a socket created before patching blocks
the whole process), and ``framework shell`` / ``show-config`` share this import path
without patching at all.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from framework.cli.config import add_config_arguments, setup_config, setup_logging
from framework.exceptions import CommandError

if TYPE_CHECKING:
    from framework.runners import ServiceRunner

log = logging.getLogger(__name__)

NAME = "run"
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Where the backdoor listens unless a host is given explicitly: whoever reaches it
#: runs any code as the service, so never a network interface by default.
DEFAULT_BACKDOOR_HOST = "127.0.0.1"
BACKDOOR_EXIT_MESSAGE = (
    "This would kill your service, not close the backdoor. To leave the backdoor, "
    "end its input (Ctrl-D) or close the connection."
)


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="run services",
        description="Run one or more services until SIGTERM or Ctrl-C. Without "
        ":ServiceClass, every class in the module that has an entrypoint is run.",
    )
    return add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``run`` on ``parser`` (nameko's ``Run.init_parser`` too)."""
    parser.add_argument(
        "services",
        nargs="+",
        metavar="module[:ServiceClass]",
        help="python path to the service(s)",
    )
    parser.add_argument(
        "--backdoor-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve a Python console for live debugging on 127.0.0.1:PORT (off by "
        "default; loopback only; connect with `framework backdoor PORT`)",
    )
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from framework import concurrency

    concurrency.monkey_patch()
    # Services are usually run from their project directory, and console scripts
    # do not put the working directory on sys.path.
    if sys.path[:1] != ["."]:
        sys.path.insert(0, ".")

    config = setup_config(args.config, args.define, args.broker)
    setup_logging(config)

    services: list[type] = []
    for path in args.services:
        for service_cls in import_services(path):
            # "svc" and "svc:Service" together name the same class once.
            if service_cls not in services:
                services.append(service_cls)
    return run(services, config, backdoor_port=args.backdoor_port)


# -- discovery ---------------------------------------------------------------------


def import_services(path: str) -> list[type]:
    """The service classes named by ``module`` or ``module:ServiceClass``.

    Without a class name, every class in the module (imported ones included) with at
    least one entrypoint method counts as a service, as in nameko.
    """
    module_name, _, class_name = path.partition(":")
    module = _import_module(module_name)
    if class_name:
        try:
            service_cls = getattr(module, class_name)
        except AttributeError:
            raise CommandError(
                f"Failed to find service class {class_name!r} in module {module_name!r}"
            ) from None
        if not isinstance(service_cls, type):
            raise CommandError("Service must be a class.")
        return [service_cls]

    services = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and _has_entrypoints(obj)
    ]
    if not services:
        raise CommandError(
            f"Failed to find anything that looks like a service in module {module_name!r}"
        )
    return services


#: nameko's name (``nameko.cli.run.import_service``): it too returns a list.
import_service = import_services


def _import_module(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if module_name.endswith(".py") and os.path.exists(module_name):
            dotted = module_name[: -len(".py")].replace(os.sep, ".").replace("/", ".")
            raise CommandError(
                f"Failed to find service, did you mean {dotted!r}?"
            ) from None
        if _is_missing(exc, module_name):
            raise CommandError(str(exc)) from None
        # The module exists but something it imports does not: that is a bug in the
        # service, and its full traceback is the useful error.
        raise


def _is_missing(exc: ImportError, module_name: str) -> bool:
    """Whether ``exc`` says ``module_name`` itself (or a parent package) is missing."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None:
        return False
    return module_name == exc.name or module_name.startswith(exc.name + ".")


def _has_entrypoints(cls: type) -> bool:
    from framework.extensions import ENTRYPOINT_EXTENSIONS_ATTR

    return any(
        callable(member) and hasattr(member, ENTRYPOINT_EXTENSIONS_ATTR)
        for _, member in inspect.getmembers(cls)
    )


# -- running -----------------------------------------------------------------------


def setup_backdoor(
    runner: Any, port: int, host: str = DEFAULT_BACKDOOR_HOST
) -> tuple[Any, Any]:
    """Serve a Python console with ``runner`` in scope on ``host:port`` (0: any free
    port); the listening socket and the green thread serving it (kill it to stop).

    Only loopback unless ``host`` says otherwise: whoever reaches the console runs
    any code as the service (from another machine, tunnel: ``ssh -L``). ``quit()``
    and ``exit()`` raise instead of exiting: in a console served by a green thread,
    ``SystemExit`` ends the whole process, services and all.
    """
    from framework import concurrency

    def refuse_to_exit(*args: Any) -> None:
        raise RuntimeError(BACKDOOR_EXIT_MESSAGE)

    namespace = {"runner": runner, "quit": refuse_to_exit, "exit": refuse_to_exit}
    listener = concurrency.green_listen((host, port))
    return listener, concurrency.serve_backdoor(listener, namespace)


def run(
    services: list[type], config: dict[str, Any], backdoor_port: int | None = None
) -> int:
    """Start ``services`` and block until they stop; the process's exit code.

    With ``backdoor_port``, a Python console with ``runner`` in scope listens on
    127.0.0.1 at that port while the services run (see ``setup_backdoor``).
    """
    from framework import concurrency
    from framework.runners import ServiceRunner

    if not concurrency.is_monkey_patched():
        raise RuntimeError(
            "framework.cli.run.run needs a monkey-patched process "
            "(framework.concurrency.monkey_patch)"
        )

    runner = ServiceRunner(config)
    for service_cls in services:
        try:
            runner.add_service(service_cls)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    backdoor = None
    if backdoor_port is not None:
        # Before the services start: a port in use fails the command at once.
        try:
            listener, backdoor = setup_backdoor(runner, backdoor_port)
        except OSError as exc:
            raise CommandError(
                f"cannot serve the backdoor on {DEFAULT_BACKDOOR_HOST}:{backdoor_port}: "
                f"{exc.strerror or exc}"
            ) from None
        log.warning("backdoor console listening on %s:%d", *listener.getsockname()[:2])

    shutdown = SignalShutdown(runner)
    shutdown.install()
    try:
        try:
            runner.start()
        except Exception:
            log.critical(
                "services failed to start: %s",
                ", ".join(runner.service_names),
                exc_info=True,
            )
            # Whatever did start holds connections and threads; release them.
            runner.kill()
            if backdoor is not None:
                concurrency.kill(backdoor)
            return 1
        freeze_heap()
        try:
            runner.wait()
        except Exception:
            log.critical(
                "services crashed: %s", ", ".join(runner.service_names), exc_info=True
            )
            return 1
        finally:
            if backdoor is not None:
                concurrency.kill(backdoor)
    finally:
        shutdown.uninstall()
    log.info("services stopped: %s", ", ".join(runner.service_names))
    return 0


def freeze_heap() -> None:
    """Move every object alive once the services have started out of the garbage
    collector's reach (``gc.freeze``).

    A full collection walks every object of the process (modules, classes,
    templates...) and stops the hub meanwhile: in the scheduler's and the web
    service's traces, one every few seconds to every 30 s stalled every request
    or tick in flight by 50-370 ms, most of their p99. After the freeze it walks
    only what was made since, and took a few ms there. Once per process, after
    start: what is frozen is never collected, and little of it would ever be.
    """
    gc.collect()
    gc.freeze()
    log.debug("heap frozen after start", extra={"objects": gc.get_freeze_count()})


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Python-level handler that only exists so the wakeup fd gets written."""


class SignalShutdown:
    """Turns SIGTERM/SIGINT into ``runner.stop()``, a second SIGINT into ``kill()``.

    Signals reach a green thread through a self-pipe (``signal.set_wakeup_fd``)
    rather than through a Python signal handler: a handler runs inside eventlet's
    hub while it sits in ``epoll``, and since PEP 475 the interrupted ``epoll`` is
    simply resumed, so a green thread spawned by the handler would not run until
    the hub's next timer, up to a minute later. A byte on a socket the hub watches
    wakes it at once, and the work then happens in an ordinary green thread, where
    eventlet primitives are safe to use.
    """

    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner
        self._stopping = False
        self._killing = False
        self._previous_handlers: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._listener: Any = None

    def install(self) -> None:
        from framework import concurrency

        # The process is monkey-patched, so these are green sockets: recv() on the
        # reader yields to the hub instead of blocking the process.
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        for signum in SHUTDOWN_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, _ignore_signal)
        self._listener = concurrency.spawn(self._listen)

    def uninstall(self) -> None:
        from framework import concurrency

        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        if self._listener is not None:
            concurrency.kill(self._listener)
        for sock in (self._reader, self._writer):
            if sock is not None:
                sock.close()

    def _listen(self) -> None:
        assert self._reader is not None
        while True:
            data = self._reader.recv(64)
            if not data:
                return
            for signum in data:
                self.handle(signum)

    def handle(self, signum: int) -> None:
        from framework import concurrency

        # The wakeup fd reports every signal that has a Python handler, not only ours.
        if signum not in SHUTDOWN_SIGNALS:
            return
        signame = signal.Signals(signum).name
        if not self._stopping:
            self._stopping = True
            log.info(
                "%s received, stopping services gracefully",
                signame,
                extra={"signal": signame},
            )
            concurrency.spawn(self._stop)
        elif signum == signal.SIGINT and not self._killing:
            self._killing = True
            log.warning(
                "second SIGINT received, killing services", extra={"signal": signame}
            )
            concurrency.spawn(self._kill)
        else:
            log.info(
                "%s received, already stopping", signame, extra={"signal": signame}
            )

    def _stop(self) -> None:
        try:
            self.runner.stop()
        except Exception:
            # A failed graceful stop must still end the process.
            log.exception("graceful stop failed, killing services")
            self._kill()

    def _kill(self) -> None:
        self.runner.kill()
