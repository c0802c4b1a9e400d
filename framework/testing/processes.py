"""``framework run`` as a real process, for tests and benches of deployed replicas.

A replica started this way is configured as in production (a config file, the
environment, ``--define``); its log goes to a file the test can show on failure.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import requests

log = logging.getLogger(__name__)

# The console script installed next to the interpreter running the tests.
FRAMEWORK = str(Path(sys.executable).parent / "framework")


def start_service(
    module: str,
    config: str | Path,
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_file: Path,
    defines: Mapping[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``framework run MODULE --config CONFIG [--define KEY=VALUE...]`` in
    ``cwd``, its output appended to ``log_file``."""
    command = [FRAMEWORK, "run", module, "--config", str(config)]
    for key, value in (defines or {}).items():
        command += ["--define", f"{key}={value}"]
    with open(log_file, "ab") as output:
        return subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=output, stderr=subprocess.STDOUT
        )


def health_ready(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the health server on ``port`` answers ``/health/ready`` with 2xx;
    false while it is not listening yet."""
    try:
        return requests.get(f"http://{host}:{port}/health/ready", timeout=1).ok
    except requests.RequestException:
        return False


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes]], timeout: float = 30
) -> None:
    """SIGTERM every process, then wait for each; one still running after
    ``timeout`` seconds is killed (a graceful stop waits for running workers).

    A process a test froze with SIGSTOP is continued first: it would not act on
    SIGTERM until then.
    """
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(ports: Iterable[int], timeout: float) -> None:
    """Wait until every health server on ``ports`` is ready; ``TimeoutError``
    (naming the ports still not ready) at the deadline."""
    from framework import concurrency

    waiting = list(ports)
    deadline = concurrency.Deadline(timeout)
    while waiting:
        waiting = [port for port in waiting if not health_ready(port)]
        if not waiting:
            return
        if deadline.expired():
            raise TimeoutError(f"not ready within {timeout}s: ports {waiting}")
        concurrency.sleep(0.2)
