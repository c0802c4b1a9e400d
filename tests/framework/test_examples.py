"""nameko's classic examples run under ``framework run`` with only their imports
changed, and answer through ``framework shell`` and the standalone proxies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
FRAMEWORK = [sys.executable, "-m", "framework.cli.main"]


class Process:
    """A ``framework run`` process whose output is collected as it comes."""

    def __init__(self, *modules: str, broker: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*FRAMEWORK, "run", *modules, "--broker", broker],
            cwd=EXAMPLES,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def run(rabbit_config):
    processes: list[Process] = []

    def start(*modules: str) -> Process:
        process = Process(*modules, broker=rabbit_config["AMQP_URI"])
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def shell(broker: str, script: str) -> str:
    result = subprocess.run(
        [*FRAMEWORK, "shell", "--broker", broker],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_hello_world_answers_the_shell_and_the_standalone_proxy(run, rabbit_config):
    process = run("helloworld")
    wait_for(
        lambda: "services started" in process.output or process.proc.poll() is not None,
        timeout=30,
    )
    assert process.proc.poll() is None, process.output
    assert "Hello, Matt!" in shell(
        rabbit_config["AMQP_URI"], 'print(n.rpc.greeting_service.hello(name="Matt"))'
    )
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert cluster.greeting_service.hello("Ann") == "Hello, Ann!"
    assert process.stop() == 0


def test_an_event_emitted_by_one_service_is_handled_by_another(run, rabbit_config):
    process = run("events")
    wait_for(lambda: "services started" in process.output, timeout=30)
    shell(
        rabbit_config["AMQP_URI"],
        'n.rpc.service_a.dispatching_method({"from": "shell"})',
    )
    wait_for(
        lambda: "service b received: {'from': 'shell'}" in process.output, timeout=15
    )
    shell(
        rabbit_config["AMQP_URI"],
        'n.dispatch_event("service_a", "event_type", "direct")',
    )
    wait_for(lambda: "service b received: direct" in process.output, timeout=15)
    assert process.stop() == 0


def test_timer_example_fires_every_second(run):
    process = run("timer")
    wait_for(lambda: process.output.count("pong") >= 2, timeout=15)
    assert process.stop() == 0
