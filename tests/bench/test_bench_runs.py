"""``python -m bench`` end to end at toy sizes: it runs and prints its table.

No timing is asserted here (timing is what the bench reports, not what tests
check); only that the bench still works, so it has not rotted by the time someone
needs real figures. It talks to the real RabbitMQ and runs both frameworks'
services as processes, so it is an e2e test, sized to finish in well under a
minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.processes import check_identical_services

ROOT = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT = 100.0  # seconds; the run itself takes about 25 s on 2 cores

QUICK_RPC = [
    "--quick",
    "--only", "rpc",
    "--runs", "1",
    "--duration", "0.2",
    "--concurrency", "1,10",
]  # fmt: skip


def table_rows(table: str, first_cell_prefix: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith(f"| {first_cell_prefix}")
    ]


def rabbitmq_vhosts() -> set[str]:
    output = subprocess.run(
        ["rabbitmqctl", "list_vhosts", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {line.strip() for line in output.splitlines()}


def test_benchmark_services_are_the_same_code_for_both_frameworks() -> None:
    check_identical_services()


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT + 30)
def test_quick_rpc_bench_prints_both_frameworks_and_removes_its_vhost(
    tmp_path: Path,
) -> None:
    output = tmp_path / "latest.md"
    logs = tmp_path / "logs"
    bench = [sys.executable, "-m", "bench", *QUICK_RPC, "--output", str(output)]
    # coreutils' timeout sends SIGINT at the deadline, on which the bench stops its
    # services and deletes its vhosts: a hung bench fails the test with its log,
    # and leaves nothing behind even if pytest itself is killed first.
    result = subprocess.run(
        ["timeout", "--signal=INT", str(BENCH_TIMEOUT), *bench, "--log-dir", str(logs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )

    assert result.returncode != 124, (
        f"over {BENCH_TIMEOUT}s; logs in {logs}\n{result.stderr}"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    results = table.split("## Results", 1)[1].split("\n## ", 1)[0]
    header = table_rows(results, "Figure | ours")[0]
    assert header[:4] == ["Figure", "ours", "nameko 2.14.1", "ours / nameko"]
    rows = table_rows(results, "RPC")
    assert len(rows) >= 6  # 2 payloads x 2 concurrencies, latencies, relay
    for row in rows:
        figure, ours, nameko, ratio = row[:4]
        assert ours not in ("", "–"), figure
        assert nameko not in ("", "–"), figure
        assert ratio.endswith("x"), figure
    assert output.read_text() == table

    vhosts = re.findall(r"vhost (bench_\w+) created", result.stderr)
    assert len(vhosts) == 3  # ours, nameko, raw
    assert not set(vhosts) & rabbitmq_vhosts()
