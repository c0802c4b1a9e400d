"""Driving the ``framework`` console script as a real subprocess.

The CLI is tested end to end through the installed script (``pip install -e .``),
because what matters is what an operator sees: output, exit codes, signals.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def framework_executable() -> str:
    candidate = Path(sys.executable).parent / "framework"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("framework")
    if found is None:
        pytest.fail(
            "the `framework` console script is not installed: pip install -e . --no-deps"
        )
    return found


def cli_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LOG_FORMAT"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path | str = HERE,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``framework <args>`` to completion and capture its output."""
    return subprocess.run(
        [framework_executable(), *args],
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env if env is not None else cli_env(),
        timeout=timeout,
    )


class RunningCli:
    """A long-running ``framework`` process whose stderr is read as it arrives."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str = HERE,
        env: dict[str, str] | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [framework_executable(), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env if env is not None else cli_env(),
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()

    @property
    def output(self) -> str:
        with self._new_line:
            return "".join(self.lines)

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        """Block until ``text`` appears in the output; fail with the output if not."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while text not in "".join(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    pytest.fail(
                        f"{text!r} never appeared in the output:\n{''.join(self.lines)}"
                    )
                self._new_line.wait(min(remaining, 0.5))

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_for_exit(self, timeout: float = 30) -> int:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the process did not exit within {timeout}s:\n{self.output}")
        self._reader.join(timeout)
        return returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
