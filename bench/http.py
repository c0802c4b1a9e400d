"""HTTP requests/s, ours against nameko 2.14.1's ``@http``, side by side.

    .venv/bin/python -m bench.http [--runs 3] [--duration 3] [--connections 1,10,50]

Each framework runs the same service (``bench/http_services_*.py``) with its own
CLI; the load comes from ``wrk`` (Debian's ``wrk`` package), a C client, so the
client costs both sides the same and little. Keep-alive connections, a 2-thread
client; a figure is the median of ``--runs`` windows. Prints a markdown table and
writes it to ``bench/results/http.md``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.processes import (
    NAMEKO,
    OURS,
    ROOT,
    child_env,
    die_with_parent,
    load_frameworks,
)

SERVICE_MODULES = {
    OURS: "bench.http_services_ours",
    NAMEKO: "bench.http_services_nameko",
}
MARKER = "# -- identical in http_services_ours.py and http_services_nameko.py below this line --"
STARTUP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_identical() -> None:
    bodies = [
        (ROOT / "bench" / f"{module.split('.')[-1]}.py").read_text().split(MARKER, 1)[1]
        for module in SERVICE_MODULES.values()
    ]
    if bodies[0] != bodies[1]:
        raise SystemExit("bench/http_services_*.py differ below the marker")


def wait_until_serving(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(
                    b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                if b"pong" in sock.recv(4096):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the service did not answer within {STARTUP_TIMEOUT}s")


def start_service(side: str, port: int, workdir: Path) -> subprocess.Popen:
    framework = load_frameworks()[side]
    config = workdir / f"{side}.yaml"
    # Both accept nameko's config keys; the AMQP URI is unused (HTTP only).
    config.write_text(
        f"AMQP_URI: amqp://guest:guest@127.0.0.1:5672/\n"
        f"WEB_SERVER_ADDRESS: 127.0.0.1:{port}\n"
        "max_workers: 10\n"
        "LOGGING: {version: 1, root: {level: WARNING}}\n"
    )
    log = workdir / f"{side}.log"
    process = subprocess.Popen(
        [*framework.run_command, SERVICE_MODULES[side], "--config", str(config)],
        cwd=ROOT,
        env=child_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    wait_until_serving(port, process, log)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(port: int, connections: int, duration: float) -> tuple[float, float]:
    """``(requests/s, p50 latency in ms)`` from one wrk window."""
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            f"http://127.0.0.1:{port}/ping",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return rate, float(value) * _UNITS[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--connections", default="1,10,50")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "http.md"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    check_identical()
    connections = [int(c) for c in args.connections.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in (OURS, NAMEKO):
            port = free_port()
            process = start_service(side, port, Path(tmp))
            try:
                wrk(port, 10, 1.0)  # warm up
                for conns in connections:
                    results[side, conns] = [
                        wrk(port, conns, args.duration) for _ in range(args.runs)
                    ]
                    print(
                        f"{side:7} c={conns:<3} "
                        + " / ".join(
                            f"{r:,.0f} req/s" for r, _ in results[side, conns]
                        ),
                        file=sys.stderr,
                    )
            finally:
                stop(process)

    lines = [
        "# HTTP: ours vs nameko 2.14.1 `@http`",
        "",
        f"`python -m bench.http --runs {args.runs} --duration {args.duration}`; wrk, keep-alive, "
        f"GET /ping returning a str; median of {args.runs} windows. "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, same machine as `latest.md`.",
        "",
        "| Figure | ours | nameko 2.14.1 | ours / nameko |",
        "|---|---:|---:|---:|",
    ]
    for conns in connections:
        ours = statistics.median(r for r, _ in results[OURS, conns])
        theirs = statistics.median(r for r, _ in results[NAMEKO, conns])
        lines.append(
            f"| HTTP requests/s, {conns} connection(s) | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |"
        )
    for conns in connections[:1]:
        ours = statistics.median(p for _, p in results[OURS, conns])
        theirs = statistics.median(p for _, p in results[NAMEKO, conns])
        lines.append(
            f"| HTTP latency p50, {conns} connection(s) (ms) | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
