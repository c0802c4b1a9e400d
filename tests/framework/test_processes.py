"""``concurrency.run_in_process``: CPU-bound work in a child process, off the hub."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from framework import concurrency
from tests.helpers import wait_for

# -- what the children run (importable by name, as run_in_process requires) ----------


def count_to(send: Any, n: int) -> int:
    for i in range(n):
        send(i)
    return n * 10


def fail(send: Any, message: str) -> None:
    raise ValueError(message)


def spin_forever(send: Any, pid_file: str | None = None) -> None:
    if pid_file is not None:
        Path(pid_file).write_text(str(os.getpid()))
    send(os.getpid())
    while True:
        sum(range(10_000))


def die_by_signal(send: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def burn_cpu(send: Any, seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(10_000))
    return "burnt"


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has stopped running already


# -- tests --------------------------------------------------------------------------------


def test_the_result_and_every_message_come_back_in_order() -> None:
    messages: list[int] = []

    result = concurrency.run_in_process(count_to, 5, on_message=messages.append)

    assert result == 50
    assert messages == [0, 1, 2, 3, 4]


def test_an_exception_in_the_child_is_raised_here_with_its_type() -> None:
    with pytest.raises(ValueError, match="bad input on line 3"):
        concurrency.run_in_process(fail, "bad input on line 3")


def test_should_stop_kills_a_busy_child() -> None:
    pids: list[int] = []

    with pytest.raises(concurrency.ProcessCancelled):
        concurrency.run_in_process(
            spin_forever, on_message=pids.append, should_stop=lambda: bool(pids)
        )

    assert len(pids) == 1
    assert gone(pids[0])


def test_a_child_killed_from_outside_is_reported() -> None:
    with pytest.raises(concurrency.ChildProcessDied) as caught:
        concurrency.run_in_process(die_by_signal)

    assert caught.value.exitcode == -signal.SIGKILL


def test_green_threads_keep_running_while_the_child_computes() -> None:
    ticks: list[float] = []

    def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            concurrency.sleep(0.01)

    ticker = concurrency.spawn(tick)
    try:
        assert concurrency.run_in_process(burn_cpu, 1.0) == "burnt"
    finally:
        concurrency.kill(ticker)

    # A blocked hub would have let the ticker run a handful of times at most.
    assert len(ticks) > 20


CHILD_OF_A_DOOMED_PARENT = """
import sys
from framework import concurrency
concurrency.monkey_patch()
from tests.framework.test_processes import spin_forever
concurrency.run_in_process(spin_forever, sys.argv[1])
"""


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD_OF_A_DOOMED_PARENT, str(pid_file)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30)
        child = int(pid_file.read_text())
        assert not gone(child)

        parent.kill()
        parent.wait(timeout=10)

        wait_for(lambda: gone(child), timeout=10)
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_children_started_and_ended_at_once_from_many_green_threads() -> None:
    # Starting a process polls the others' exit pipes; with several green threads
    # waiting on those pipes, eventlet refused the second wait on one descriptor.
    results: list[int] = []

    def worker(n: int) -> None:
        for _ in range(2):
            results.append(concurrency.run_in_process(count_to, n))

    threads = [concurrency.spawn(worker, n) for n in range(1, 5)]
    for thread in threads:
        thread.wait()

    assert sorted(results) == sorted(n * 10 for n in range(1, 5) for _ in range(2))
