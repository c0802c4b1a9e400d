"""The processes the bench starts: service runners, measuring clients, raw server.

Each framework runs from its own virtual environment with its own CLI, exactly as
a team would deploy it: ours with ``framework run``, nameko's with ``nameko run``.
Every process started here is registered with a ``ProcessRegistry`` and stopped
by it, so an aborted bench leaves nothing running.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.broker import BenchError, BrokerProbe, NoReply

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
OURS = "ours"
NAMEKO = "nameko"

STARTUP_TIMEOUT = 30.0  # seconds for a service process to answer its first call
STOP_TIMEOUT = 10.0  # seconds a graceful stop may take before we kill
CLIENT_TIMEOUT = 600.0  # seconds for one measuring client to finish


@dataclass(frozen=True)
class Framework:
    """One side of the comparison: where its python and its CLI live."""

    key: str
    label: str
    python: Path
    run_command: tuple[str, ...]
    services_module: str


def load_frameworks() -> dict[str, Framework]:
    """Ours from this interpreter's venv; nameko from the cached nameko venv."""
    from tools.nameko_venv import nameko_python

    our_bin = Path(sys.executable).parent
    our_cli = our_bin / "framework"
    if not our_cli.exists():
        raise BenchError(
            f"{our_cli} is missing: install the project with `{our_bin / 'pip'} install -e . --no-deps`"
        )
    nameko_py = nameko_python()
    return {
        OURS: Framework(
            OURS,
            "ours",
            Path(sys.executable),
            (str(our_cli), "run"),
            "bench.services_ours",
        ),
        NAMEKO: Framework(
            NAMEKO,
            "nameko 2.14.1",
            nameko_py,
            (str(nameko_py.parent / "nameko"), "run"),
            "bench.services_nameko",
        ),
    }


# JSON of extra config keys for our side (``--ours-config``), read by our clients.
OURS_CONFIG_ENV = "BENCH_OURS_CONFIG"


def write_service_config(
    path: Path, amqp_uri: str, extra: dict[str, Any] | None = None
) -> Path:
    """A config both CLIs read: the vhost's URI, and logging at WARNING, plus
    ``extra`` keys.

    JSON is valid YAML, and it needs no YAML library here.
    """
    config = {
        **(extra or {}),
        "AMQP_URI": amqp_uri,
        "LOGGING": {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
            },
            "handlers": {
                "console": {"class": "logging.StreamHandler", "formatter": "plain"}
            },
            "root": {"level": "WARNING", "handlers": ["console"]},
        },
    }
    path.write_text(json.dumps(config, indent=2))
    return path


class ProcessRegistry:
    """Every child the bench starts; ``stop_all`` ends whichever still run."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: list[subprocess.Popen[Any]] = []

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(
        self, command: Sequence[str], name: str, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        with open(self.log_path(name), "ab") as log_file:
            process = subprocess.Popen(
                list(command),
                cwd=ROOT,
                preexec_fn=die_with_parent,
                stdout=kwargs.pop("stdout", log_file),
                stderr=log_file,
                env=child_env(),
                **kwargs,
            )
        self._running.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any]) -> None:
        """SIGTERM (a graceful stop in both CLIs), then SIGKILL if it hangs."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning(
                    "process did not stop in %ss; killing it",
                    STOP_TIMEOUT,
                    extra={"pid": process.pid},
                )
                process.kill()
                process.wait()
        if process in self._running:
            self._running.remove(process)

    def stop_all(self) -> None:
        for process in list(self._running):
            self.stop(process)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the bench dies.

    A bench killed outright (SIGKILL, a test timeout) runs no cleanup; without
    this, its services would keep running and consuming forever.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: cleanup relies on stop_all
        pass


def child_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LOG_FORMAT", "PYTHONPATH")
    }
    env["PYTHONUNBUFFERED"] = "1"
    # The children import ``bench`` from the repository root (their cwd); eventlet's
    # deprecation notice would only clutter their logs.
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- services ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstCall:
    """The call that tells a freshly started service is up."""

    service: str
    method: str
    args: tuple[Any, ...] = ()


@dataclass
class RunningService:
    process: subprocess.Popen[Any]
    startup_seconds: float
    """From just before the process was spawned to the first answered RPC."""
    problems: str | None = None
    """Errors the service logged while it ran; set once it has stopped."""


@contextmanager
def running_service(
    registry: ProcessRegistry,
    framework: Framework,
    service_class: str,
    config_path: Path,
    probe: BrokerProbe,
    first_call: FirstCall,
) -> Iterator[RunningService]:
    """Run ``service_class`` under ``framework`` until the block ends.

    ``first_call`` is sent *before* the process is spawned: it waits in the
    service's queue and is answered as soon as the service consumes, which marks
    the end of start-up with no polling error.
    """
    probe.declare_service_queue(first_call.service)
    correlation_id = probe.send(first_call.service, first_call.method, *first_call.args)
    name = f"{framework.key}-{service_class}"
    command = [
        *framework.run_command,
        f"{framework.services_module}:{service_class}",
        "--config",
        str(config_path),
    ]
    log_path = registry.log_path(name)
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    spawned_at = time.perf_counter()
    process = registry.start(command, name)
    service: RunningService | None = None
    try:
        limit = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                _, answered_at = probe.wait(correlation_id, timeout=0.5)
                break
            except NoReply:
                pass
            if process.poll() is not None:
                raise BenchError(
                    f"{framework.label} {service_class} exited with {process.returncode} before answering; "
                    f"its log ({registry.log_path(name)}) ends with:\n{tail(registry.log_path(name))}"
                )
            if time.monotonic() > limit:
                raise BenchError(
                    f"{framework.label} {service_class} did not answer within {STARTUP_TIMEOUT}s"
                )
        service = RunningService(process, answered_at - spawned_at)
        yield service
    finally:
        registry.stop(process)
        if service is not None:
            service.problems = logged_problems(log_path, log_offset)


# A log record at ERROR or above, and the last line of a traceback.
ERROR_RECORD = re.compile(r" (ERROR|CRITICAL) ")
EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Timeout|Exit)\b.*"
)


def logged_problems(log_path: Path, offset: int) -> str | None:
    """A one-line summary of what went wrong in a log since ``offset``, if anything.

    A service that logs errors under load (a lost confirm, a crashed worker) makes
    its figures suspect, so the report says so instead of printing them silently.
    """
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(offset)
            lines = log_file.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    records = sum(1 for line in lines if ERROR_RECORD.search(line))
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    if not records and not exceptions:
        return None
    example = (
        exceptions[0]
        if exceptions
        else next(line for line in lines if ERROR_RECORD.search(line))
    )
    return (
        f"{records} error record(s) and {len(exceptions)} traceback(s) logged, "
        f"e.g. `{example[:300]}`"
    )


# -- clients ----------------------------------------------------------------------------


def run_client(
    registry: ProcessRegistry, python: Path, module: str, args: Sequence[str], name: str
) -> dict[str, Any]:
    """Run ``python -m module args`` to completion; its last stdout line, as JSON."""
    command = [str(python), "-m", module, *args]
    process = registry.start(command, name, stdout=subprocess.PIPE)
    try:
        stdout, _ = process.communicate(timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        registry.stop(process)
        raise BenchError(f"{name} did not finish within {CLIENT_TIMEOUT}s") from None
    registry.stop(process)
    lines = stdout.decode(errors="replace").strip().splitlines()
    if process.returncode != 0 or not lines:
        raise BenchError(
            f"{name} failed (exit code {process.returncode}); its log ({registry.log_path(name)}) ends with:\n"
            f"{tail(registry.log_path(name))}"
        )
    return json.loads(lines[-1])


@contextmanager
def raw_server(
    registry: ProcessRegistry,
    amqp_uri: str,
    confirms: str,
    prefetch: int,
    transient: bool = False,
) -> Iterator[subprocess.Popen[Any]]:
    command = [
        sys.executable,
        "-m",
        "bench.raw",
        "server",
        "--amqp-uri",
        amqp_uri,
        "--confirms",
        confirms,
        "--prefetch",
        str(prefetch),
    ] + (["--transient"] if transient else [])
    process = registry.start(command, "raw-server", stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            process.wait(5)
            raise BenchError(
                f"the raw server did not start:\n{tail(registry.log_path('raw-server'))}"
            )
        yield process
    finally:
        registry.stop(process)


# -- the services under test ------------------------------------------------------------

IDENTICAL_MARKER = (
    "# -- identical in services_ours.py and services_nameko.py below this line --"
)


def check_identical_services() -> None:
    """Both frameworks must run the same service code; only the imports differ."""
    bodies = []
    for name in ("services_ours.py", "services_nameko.py"):
        text = (Path(__file__).parent / name).read_text()
        if IDENTICAL_MARKER not in text:
            raise BenchError(f"bench/{name} lacks the line {IDENTICAL_MARKER!r}")
        bodies.append(text.split(IDENTICAL_MARKER, 1)[1])
    if bodies[0] != bodies[1]:
        raise BenchError(
            "bench/services_ours.py and bench/services_nameko.py differ below the marker line"
        )
