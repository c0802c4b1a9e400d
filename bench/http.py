"""HTTP requests/s and latency, ours against nameko 2.14.1's ``@http``, side by side.

    .venv/bin/python -m bench.http [--runs 3] [--duration 3] [--connections 1,10,50]

Each framework runs the same service (``bench/http_services_*.py``) with its own
CLI; the load comes from ``wrk`` (Debian's ``wrk`` package), a C client, so the
client costs both sides the same and little. Keep-alive connections, a 2-thread
client. Both services run at once and their windows alternate (ours, nameko,
nameko, ours, ...), so a machine busy with something else slows both alike.

Cases: the plainest handler (``GET /ping`` returning a short ``str``) at every
``--connections``; a ``(status, headers, body)`` tuple and a small ``POST`` echoed back at 10
connections; and the plainest handler again with each framework's *default*
logging (ours writes a ``worker finished`` record per request, nameko an access
line; the other cases log warnings only, as a production service tuned for
throughput would). Requests/s is the best of ``--runs`` windows (on a busy
machine, others only ever slow a window down); latencies (wrk's p50 and p99) and
CPU per request are medians. CPU per request is the service process's own
(``/proc``), which a busy machine disturbs far less than requests/s. Prints a
markdown table and writes it to ``bench/results/http.md``.

``--instructions`` measures instead what a busy machine cannot move: the
instructions each service process executes per ``GET /ping`` (valgrind's
callgrind, Debian's ``valgrind`` package), quiet and with default logging, over
1,000 requests on 10 keep-alive connections after a warm-up.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
QUIET_LOGGING = "LOGGING: {version: 1, root: {level: WARNING}}\n"
POST_BODY = "x" * 64


@dataclass(frozen=True)
class Case:
    label: str
    path: str
    connections: int
    default_logging: bool = False
    post: bool = False


@dataclass
class Window:
    rate: float  # requests/s
    p50: float  # ms
    p99: float  # ms
    cpu_us: float  # service CPU per request, microseconds


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


def wait_until_serving(
    port: int, process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
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
    raise SystemExit(f"the service did not answer within {timeout}s")


def start_service(
    side: str,
    port: int,
    workdir: Path,
    *,
    default_logging: bool = False,
    wrapper: tuple[str, ...] = (),
    startup_timeout: float = STARTUP_TIMEOUT,
) -> subprocess.Popen:
    framework = load_frameworks()[side]
    name = f"{side}-{'default' if default_logging else 'quiet'}"
    config = workdir / f"{name}.yaml"
    # Both accept nameko's config keys; the AMQP URI is unused (HTTP only).
    config.write_text(
        f"AMQP_URI: amqp://guest:guest@127.0.0.1:5672/\n"
        f"WEB_SERVER_ADDRESS: 127.0.0.1:{port}\n"
        "max_workers: 10\n" + ("" if default_logging else QUIET_LOGGING)
    )
    # The default logs go to a file, as they would to a collector: what is
    # measured is producing them, not a terminal's speed.
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        [
            *wrapper,
            *framework.run_command,
            SERVICE_MODULES[side],
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    wait_until_serving(port, process, log, startup_timeout)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def wrk(
    port: int, pid: int, case: Case, duration: float, script: Path | None
) -> Window:
    """One wrk window against ``case``, with the service's CPU over it."""
    command = [
        "wrk",
        f"-t{min(2, case.connections)}",
        f"-c{case.connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
    ]
    if case.post and script is not None:
        command += ["-s", str(script)]
    before = cpu_seconds(pid)
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}{case.path}"],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    cpu = cpu_seconds(pid) - before
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return Window(
        rate=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50=_latency(out, "50"),
        p99=_latency(out, "99"),
        cpu_us=cpu / max(requests, 1) * 1e6,
    )


def cases_for(connections: list[int]) -> list[Case]:
    plain = [Case(f"GET str, {c} conn.", "/ping", c) for c in connections]
    return [
        *plain,
        Case("GET (status, headers, JSON str), 10 conn.", "/json", 10),
        Case(f"POST {len(POST_BODY)} B echoed, 10 conn.", "/echo", 10, post=True),
        Case("GET str, default logging, 10 conn.", "/ping", 10, default_logging=True),
    ]


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
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instructions per request under callgrind instead of wrk windows",
    )
    args = parser.parse_args(argv)
    if args.instructions:
        return print_instructions()
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    check_identical()
    cases = cases_for([int(c) for c in args.connections.split(",")])
    results: dict[tuple[str, Case], list[Window]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = "{POST_BODY}"\n'
            'wrk.headers["Content-Type"] = "text/plain"\n'
        )
        services: dict[tuple[str, bool], tuple[int, subprocess.Popen]] = {}
        try:
            for side in (OURS, NAMEKO):
                for default_logging in (False, True):
                    port = free_port()
                    process = start_service(
                        side, port, workdir, default_logging=default_logging
                    )
                    services[side, default_logging] = (port, process)
            for port, process in services.values():
                wrk(port, process.pid, Case("warm-up", "/ping", 10), 1.0, None)
            for run in range(args.runs):
                # Alternate who goes first, so a drift in the machine's load
                # favours neither side.
                order = (OURS, NAMEKO) if run % 2 == 0 else (NAMEKO, OURS)
                for case in cases:
                    for side in order:
                        port, process = services[side, case.default_logging]
                        window = wrk(port, process.pid, case, args.duration, script)
                        results.setdefault((side, case), []).append(window)
                        print(
                            f"{side:7} {case.label:38} {window.rate:8,.0f} req/s "
                            f"p99 {window.p99:6.2f} ms {window.cpu_us:5.0f} us CPU/req",
                            file=sys.stderr,
                        )
        finally:
            for _, process in services.values():
                stop(process)

    table = render(args, cases, results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)
    return 0


CALLGRIND_REQUESTS = 1000  # measured, over 10 connections
CALLGRIND_WARMUP = 200


def keep_alive_requests(port: int, total: int, connections: int = 10) -> None:
    """``total`` ``GET /ping`` over ``connections`` keep-alive connections at once."""
    errors: list[BaseException] = []

    def one_connection() -> None:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for _ in range(total // connections):
                client.request("GET", "/ping")
                response = client.getresponse()
                if response.read() != b"pong":
                    raise RuntimeError(f"unexpected answer, status {response.status}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"requests failed: {errors[0]!r}")


def callgrind_control(pid: int, *command: str) -> None:
    subprocess.run(
        ["callgrind_control", *command, str(pid)], check=True, capture_output=True
    )


def instructions_per_request(side: str, workdir: Path, default_logging: bool) -> float:
    """Instructions the service process executes per request, counted by callgrind
    only while the measured requests run (not start-up, not the warm-up)."""
    out = workdir / f"callgrind-{side}-{default_logging}.out"
    port = free_port()
    process = start_service(
        side,
        port,
        workdir,
        default_logging=default_logging,
        wrapper=(
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        ),
        startup_timeout=300.0,
    )
    try:
        keep_alive_requests(port, CALLGRIND_WARMUP)
        callgrind_control(process.pid, "-i", "on")
        keep_alive_requests(port, CALLGRIND_REQUESTS)
        callgrind_control(process.pid, "-i", "off")
        # Written now: a service that outlives stop()'s patience is killed, and a
        # killed valgrind writes nothing.
        callgrind_control(process.pid, "-d")
    finally:
        stop(process)
    # Each dump holds the counts since the previous one, on its `totals:` line
    # (its `summary:` line can say 0 when instrumentation starts switched off).
    total = 0
    for path in workdir.glob(f"{out.name}*"):
        for line in path.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total / CALLGRIND_REQUESTS


def print_instructions() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is missing: apt-get install valgrind", file=sys.stderr)
        return 2
    check_identical()
    lines = [
        f"Instructions per `GET /ping` in the service process (callgrind, "
        f"{CALLGRIND_REQUESTS:,} requests over 10 keep-alive connections after "
        f"{CALLGRIND_WARMUP} to warm up):",
        "",
        "| logging | ours | nameko | nameko / ours |",
        "|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for default_logging in (False, True):
            counts = {
                side: instructions_per_request(side, Path(tmp), default_logging)
                for side in (OURS, NAMEKO)
            }
            lines.append(
                f"| {'default' if default_logging else 'warnings only'} | "
                f"{counts[OURS] / 1e6:.2f} M | {counts[NAMEKO] / 1e6:.2f} M | "
                f"{counts[NAMEKO] / counts[OURS]:.2f}x |"
            )
    print("\n".join(lines))
    return 0


def render(
    args: argparse.Namespace,
    cases: list[Case],
    results: dict[tuple[str, Case], list[Window]],
) -> str:
    def median(side: str, case: Case, field: str) -> float:
        if field == "rate":
            return max(w.rate for w in results[side, case])
        return statistics.median(getattr(w, field) for w in results[side, case])

    lines = [
        "# HTTP: ours vs nameko 2.14.1 `@http`",
        "",
        f"`python -m bench.http --runs {args.runs} --duration {args.duration} "
        f"--connections {args.connections}`; wrk, keep-alive, both services up at "
        f"once and their windows alternating; req/s the best of {args.runs} "
        f"windows, latencies and CPU their median. "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| Case | req/s ours | req/s nameko | ours / nameko | p50 ms ours | "
        "p50 ms nameko | p99 ms ours | p99 ms nameko | CPU µs/req ours | "
        "CPU µs/req nameko | nameko / ours CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        ours = {f: median(OURS, case, f) for f in ("rate", "p50", "p99", "cpu_us")}
        theirs = {f: median(NAMEKO, case, f) for f in ("rate", "p50", "p99", "cpu_us")}
        lines.append(
            f"| {case.label} | {ours['rate']:,.0f} | {theirs['rate']:,.0f} | "
            f"{ours['rate'] / theirs['rate']:.2f}x | {ours['p50']:.2f} | "
            f"{theirs['p50']:.2f} | {ours['p99']:.2f} | {theirs['p99']:.2f} | "
            f"{ours['cpu_us']:.0f} | {theirs['cpu_us']:.0f} | "
            f"{theirs['cpu_us'] / ours['cpu_us']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
