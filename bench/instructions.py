"""Instructions per RPC call in our service and our client, counted by callgrind.

    python -m bench.instructions --amqp-uri URI [--calls 2000] [--tree DIR]...

CPU time per call moves with the machine's load (other processes evict caches,
frames batch differently); the number of instructions a process executes per
call barely does. Both processes of the RPC benchmark (``framework run
bench.services_ours:BenchTarget``, and a client of 10 standalone proxies, each
calling ``echo("ping")`` in a loop) run under valgrind's callgrind with counting
switched off; once every proxy has made its warm-up calls, counting is switched
on in both for exactly ``--calls`` calls, then off. Each ``--tree`` is a checkout
of the repository to measure (default: this one), e.g. ``git worktree add DIR
<commit>`` for a before/after. Needs Debian's ``valgrind`` package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = 10
WARMUP_CALLS = 20  # per proxy
STARTUP_TIMEOUT = 300.0  # seconds: everything is ~50 times slower under callgrind


def callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]


def control(pid: int, *command: str) -> None:
    subprocess.run(
        ["callgrind_control", *command, str(pid)], check=True, capture_output=True
    )


def totals(out: Path) -> int:
    """Instructions counted, over every dump of one process."""
    total = 0
    for path in out.parent.glob(f"{out.name}*"):
        for line in path.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def measure(tree: Path, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from bench.costs import SERVICE_QUEUE, wait_for_consumer
    from bench.processes import child_env, write_service_config

    env = child_env()
    env["PYTHONPATH"] = str(tree)
    config = write_service_config(workdir / "config.yaml", args.amqp_uri)
    service_out = workdir / "service.callgrind"
    client_out = workdir / "client.callgrind"
    framework = str(Path(sys.executable).parent / "framework")
    service = subprocess.Popen(
        [*callgrind(service_out), framework, "run", "bench.services_ours:BenchTarget"]
        + ["--config", str(config)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    go = workdir / "go"
    client = None
    try:
        wait_for_consumer(args.amqp_uri, SERVICE_QUEUE, STARTUP_TIMEOUT)
        client = subprocess.Popen(
            # This file by its path: the tree measured may predate it.
            [*callgrind(client_out), sys.executable, __file__]
            + ["client", "--amqp-uri", args.amqp_uri, "--calls", str(args.calls)]
            + ["--go-file", str(go)],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert client.stdout is not None
        if client.stdout.readline().strip() != b"warm":
            raise RuntimeError("the client did not warm up")
        for pid in (service.pid, client.pid):
            control(pid, "-i", "on")
        go.write_text("go")
        if client.stdout.readline().strip() != b"done":
            raise RuntimeError("the client did not finish its calls")
        for pid in (service.pid, client.pid):
            control(pid, "-i", "off")
            control(pid, "-d")  # a killed valgrind writes nothing
        (workdir / "exit").write_text("exit")
        client.wait(STARTUP_TIMEOUT)
    finally:
        for process in (client, service):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    return {
        "service": totals(service_out) / args.calls,
        "client": totals(client_out) / args.calls,
    }


def run_client(args: argparse.Namespace) -> int:
    """The measured client: warm up, say so, wait for the go, make the calls."""
    # Run by its path, this file's folder heads sys.path, and its http.py would
    # shadow the standard library's.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from framework import concurrency

    concurrency.monkey_patch()
    from framework.standalone.rpc import ClusterRpcProxy

    config = {"AMQP_URI": args.amqp_uri}
    go = Path(args.go_file)
    per_proxy = args.calls // CONCURRENCY

    def caller(proxy: object, calls: int) -> None:
        for _ in range(calls):
            proxy.bench_target.echo("ping")  # type: ignore[attr-defined]

    proxies = [ClusterRpcProxy(config) for _ in range(CONCURRENCY)]
    started = [p.start() for p in proxies]
    for thread in [concurrency.spawn(caller, p, WARMUP_CALLS) for p in started]:
        thread.wait()
    sys.stdout.write("warm\n")
    sys.stdout.flush()
    while not go.exists():
        concurrency.sleep(0.05)
    for thread in [concurrency.spawn(caller, p, per_proxy) for p in started]:
        thread.wait()
    sys.stdout.write("done\n")
    sys.stdout.flush()
    exit_file = go.parent / "exit"
    while not exit_file.exists():
        concurrency.sleep(0.05)
    for proxy in proxies:
        proxy.stop()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("role", nargs="?", choices=("measure", "client"))
    parser.add_argument("--amqp-uri", required=True)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tree", type=Path, action="append")
    parser.add_argument("--go-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "client":
        return run_client(args)
    lines = [
        f"Instructions per call (callgrind, {args.calls:,} calls of echo('ping') "
        f"from {CONCURRENCY} standalone proxies, after {WARMUP_CALLS} each to warm up):",
        "",
        "| code | service | client |",
        "|---|---:|---:|",
    ]
    for tree in args.tree or [Path(__file__).resolve().parent.parent]:
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
            started = time.monotonic()
            counts = measure(tree.resolve(), args, Path(tmp))
            print(
                f"{tree}: {counts} in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
        lines.append(f"| {tree} | {counts['service']:,.0f} | {counts['client']:,.0f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
