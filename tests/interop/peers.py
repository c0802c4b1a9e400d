"""Driving the nameko side: ``nameko run`` processes and one-shot nameko scripts.

nameko 2.14.1 lives in its own venv (``tools/nameko_venv.py``) and is never imported
here: its services run as ``nameko run`` processes and its clients as small scripts
that print JSON, all with ``tests/`` on ``PYTHONPATH`` so that they import
``interop.contract`` and ``interop.nameko_side``, as we do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from framework import concurrency
from framework.exceptions import RpcTimeout, UnknownService
from framework.standalone.rpc import ClusterRpcProxy
from interop import contract

TESTS_DIR = Path(__file__).resolve().parent.parent
ROOT = TESTS_DIR.parent
SERVICES_MODULE = "interop.nameko_side.services"

#: nameko service name -> its class in ``interop.nameko_side.services``
NAMEKO_CLASSES = {
    contract.NAMEKO_ECHO: "EchoService",
    contract.NAMEKO_CALLER: "CallerService",
    contract.NAMEKO_DISPATCHER: "DispatcherService",
    contract.NAMEKO_LISTENER: "ListenerService",
    contract.POOL_MEMBER: "PoolMemberService",
    contract.WIRE_MIRROR: "WireMirrorService",
}

VENV_CREATION_TIMEOUT = 600  # seconds; a first run installs nameko with pip
STARTUP_TIMEOUT = 60  # seconds for `nameko run` to import, connect and consume
SCRIPT_TIMEOUT = 60  # seconds for a one-shot nameko script
STOP_TIMEOUT = 10  # seconds a graceful stop may take before we kill


def nameko_python() -> Path:
    """The nameko venv's python, creating the venv on first use.

    Run as a script rather than imported: ``tools`` is not an installed package.
    """
    completed = subprocess.run(
        [sys.executable, "-m", "tools.nameko_venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=VENV_CREATION_TIMEOUT,
    )
    if completed.returncode != 0:
        pytest.fail(f"could not create the nameko venv:\n{completed.stderr}")
    return Path(completed.stdout.strip().splitlines()[-1])


def nameko_env() -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYTHON")
    }
    env["PYTHONPATH"] = str(TESTS_DIR)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Runs the command, which is killed with the test process if that dies without its
# teardown: a `nameko run` would otherwise reconnect to a deleted vhost forever.
# (Not a preexec_fn: that makes subprocess fork the green test process itself.)
DIE_WITH_PARENT = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
os.execv(sys.argv[1], sys.argv[1:])
"""


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "".join(
            path.read_text(errors="replace").splitlines(keepends=True)[-lines:]
        )
    except FileNotFoundError:
        return "<no output>"


class NamekoProcess:
    """``nameko run`` of some services, its output going to a log file."""

    def __init__(
        self,
        python: Path,
        service_names: list[str],
        config: dict[str, Any],
        workdir: Path,
    ) -> None:
        self.service_names = service_names
        self.config = config
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "config.yaml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self.log_file = workdir / "nameko.log"
        targets = [
            f"{SERVICES_MODULE}:{NAMEKO_CLASSES[name]}" for name in service_names
        ]
        with self.log_file.open("w") as log:
            self.process = subprocess.Popen(
                [
                    str(python),
                    "-c",
                    DIE_WITH_PARENT,
                    str(python.parent / "nameko"),
                    "run",
                    *targets,
                    "--config",
                    str(config_file),
                ],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=nameko_env(),
            )

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Ping every service over RPC until it answers; its queues are consumed by then
        (nameko 2 starts all of a container's consumers at once)."""
        deadline = concurrency.Deadline(timeout)
        with ClusterRpcProxy(self.config, timeout=1) as proxy:
            for name in self.service_names:
                while True:
                    if self.process.poll() is not None:
                        pytest.fail(
                            f"nameko run exited with {self.process.returncode}:\n{tail(self.log_file)}"
                        )
                    try:
                        if proxy[name].ping() == "pong":
                            break
                    except (UnknownService, RpcTimeout):
                        pass  # its queue is not declared yet, or not consumed yet
                    if deadline.expired():
                        pytest.fail(
                            f"nameko service {name} not ready within {timeout}s:\n{tail(self.log_file)}"
                        )
                    concurrency.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nameko stops gracefully on SIGTERM
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_nameko_script(
    python: Path, module: str, request: dict[str, Any], timeout: float = SCRIPT_TIMEOUT
) -> Any:
    """Run ``python -m <module>`` in the nameko venv, JSON in, JSON out."""
    try:
        completed = subprocess.run(
            [str(python), "-m", module],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=TESTS_DIR,
            env=nameko_env(),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{module} did not finish within {timeout}s:\n{exc.stderr}")
    if completed.returncode != 0:
        pytest.fail(f"{module} exited with {completed.returncode}:\n{completed.stderr}")
    return json.loads(completed.stdout)


# -- actions for nameko_side/client.py ------------------------------------------------


def call(service: str, method: str, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A ``call`` action for the nameko client script."""
    return {
        "op": "call",
        "service": service,
        "method": method,
        "args": list(args),
        "kwargs": kwargs,
    }


def call_async(
    service: str, method: str, /, *args: Any, **kwargs: Any
) -> dict[str, Any]:
    return {**call(service, method, *args, **kwargs), "op": "call_async"}


def dispatch(service: str, event_type: str, data: Any) -> dict[str, Any]:
    return {
        "op": "dispatch",
        "service": service,
        "event_type": event_type,
        "data": data,
    }
