"""``framework.testing.processes``: replicas as processes, their readiness, their stop."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from framework.testing.processes import health_ready, stop_processes, wait_until_ready
from framework.testing.utils import find_free_port


def test_a_port_nothing_listens_on_is_not_ready() -> None:
    assert health_ready(find_free_port()) is False


def test_waiting_for_readiness_names_the_ports_still_not_ready() -> None:
    port = find_free_port()
    with pytest.raises(TimeoutError, match=str(port)):
        wait_until_ready([port], timeout=0.3)


def test_stop_terminates_processes_even_a_frozen_one() -> None:
    sleepers = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        for _ in range(2)
    ]
    sleepers[0].send_signal(signal.SIGSTOP)
    stop_processes(sleepers, timeout=10)
    assert [sleeper.returncode for sleeper in sleepers] == [-signal.SIGTERM] * 2


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    stop_processes([stubborn], timeout=0.5)
    stubborn.stdout.close()
    assert stubborn.returncode == -signal.SIGKILL
