"""CPU per call of each process and of the broker, for setups side by side.

    python -m bench.costs --amqp-uri URI --repeat 3 raw "raw:--transient" \\
        ours "ours:RPC_PERSISTENT_REPLIES=true"

Each case runs an RPC echo loop (tiny payload, ``--concurrency`` in flight) for
``--seconds`` after a warm-up, and reads the CPU time of its server, its client
and the broker's Erlang VM from /proc over that window: microseconds of CPU per
call, which a busy machine disturbs far less than calls per second. Cases run
one after the other, ``--repeat`` times round, and the table gives each case's
median. A case is

* ``raw`` or ``raw:<options of bench/raw.py>``: the plain py-amqp loop, server
  and client given the same options (each ignores the other's);
* ``ours`` or ``ours:KEY=VALUE,KEY=VALUE``: ``framework run`` of
  ``bench.services_ours:BenchTarget`` and ``bench.client`` (10 standalone
  proxies), both with those extra config keys;
* ``ours@DIR`` or ``raw@DIR`` (options as above): the same, with the code of
  another checkout, e.g. ``git worktree add DIR <commit>`` for a before/after.

The broker is shared: the figures are only as clean as the broker is quiet.
Measure on a broker of one's own (``--broker-pid`` names its VM; by default the
first ``beam.smp`` found) and read ``idle``, the broker's CPU with nothing
running, printed first.

CPU time also moves with the machine's load (a busy machine slows every process
and changes how frames batch). ``--erlang-node`` adds a figure that does not:
the Erlang *reductions* (units of work the VM counts) the broker spent per call,
over a window of the same length, read with ``rabbitmqctl eval`` (run with
``HOME=--erlang-home`` to find the node's cookie).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import amqp

from bench.broker import connect
from bench.processes import OURS_CONFIG_ENV, ROOT, child_env, write_service_config
from bench.profiling import broker_pid, cpu_times

SERVICE_QUEUE = "rpc-bench_target"
START_TIMEOUT = 60.0  # seconds for a server to consume its queue


@dataclass
class Sample:
    rate: float
    cores: dict[str, float]  # process -> CPU seconds per second over the window
    reductions: float | None = None  # broker's, per second over a window

    def reductions_per_call(self) -> float:
        if self.reductions is None or not self.rate:
            return float("nan")
        return self.reductions / self.rate

    def per_call(self, role: str) -> float:
        return self.cores[role] / self.rate * 1e6 if self.rate else float("nan")


def wait_for_consumer(uri: str, queue: str, timeout: float = START_TIMEOUT) -> None:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        connection = connect(uri)
        try:
            channel = connection.channel()
            _, _, consumers = channel.queue_declare(queue, passive=True)
            if consumers:
                return
        except amqp.exceptions.NotFound:
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    raise RuntimeError(f"nothing consumed {queue} within {timeout}s")


def commands(
    case: str, args: argparse.Namespace, workdir: Path
) -> tuple[list[str], list[str], dict[str, str], str]:
    """Server command, client command, environment, queue to wait for."""
    kind, _, spec = case.partition(":")
    python = sys.executable
    env = child_env()
    # Long enough for the reductions window, which opens once rabbitmqctl is up.
    client_seconds = args.warmup + args.seconds + (10 if args.erlang_node else 2)
    if kind == "raw":
        options = shlex.split(spec)
        server = [python, "-m", "bench.raw", "server", "--amqp-uri", args.amqp_uri]
        client = [python, "-m", "bench.raw", "client", "--amqp-uri", args.amqp_uri]
        client += ["--concurrency", str(args.concurrency), "--warmup", "0.5"]
        client += ["--duration", str(client_seconds)]
        return server + options, client + options, env, "rpc-bench_raw"
    kind, _, tree = kind.partition("@")
    if tree:  # another checkout of the repository, e.g. a worktree of a commit
        env["PYTHONPATH"] = tree
    if kind == "ours":
        extra = dict(pair.split("=", 1) for pair in spec.split(",") if pair)
        config = write_service_config(
            workdir / f"config-{abs(hash(case))}.yaml", args.amqp_uri, extra
        )
        env[OURS_CONFIG_ENV] = json.dumps(extra)
        framework = str(Path(python).parent / "framework")
        server = [framework, "run", "bench.services_ours:BenchTarget"]
        server += ["--config", str(config)]
        client = [python, "-m", "bench.client", "ours", "--amqp-uri", args.amqp_uri]
        client += ["rpc", "--concurrency", str(args.concurrency)]
        client += ["--duration", str(client_seconds), "--warmup-calls", "20"]
        return server, client, env, SERVICE_QUEUE
    raise SystemExit(f"unknown case {case!r}: raw[:options] or ours[:KEY=VALUE,...]")


def measure(case: str, args: argparse.Namespace, workdir: Path) -> Sample:
    server_cmd, client_cmd, env, queue = commands(case, args, workdir)
    log = open(workdir / "processes.log", "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        server_cmd, cwd=ROOT, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
    )
    client = None
    try:
        wait_for_consumer(args.amqp_uri, queue)
        client = subprocess.Popen(
            client_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log
        )
        time.sleep(args.warmup)
        counter = reductions_counter(args)
        pids = {"server": server.pid, "client": client.pid, "broker": args.broker_pid}
        before = {role: sum(cpu_times(pid)) for role, pid in pids.items()}
        started = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - started
        cores = {
            role: (sum(cpu_times(pid)) - before[role]) / elapsed
            for role, pid in pids.items()
        }
        reductions = None
        if counter is not None:
            out, _ = counter.communicate(timeout=120)
            reductions = int(out.decode().strip().splitlines()[-1]) / args.seconds
        stdout, _ = client.communicate(timeout=args.seconds + 120)
        lines = stdout.decode().strip().splitlines()
        if client.returncode != 0 or not lines:
            tail = (workdir / "processes.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{case}: the client failed; the log ends with:\n{tail}")
        result = json.loads(lines[-1])
        # The client's window covers ours; its rate is calls per second of it.
        return Sample(float(result["rate"]), cores, reductions)
    finally:
        for process in (client, server):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        log.close()


def reductions_counter(args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """``rabbitmqctl eval`` of the broker's reductions over ``--seconds``."""
    if not args.erlang_node:
        return None
    # The unwrapped CLI first: Debian's /usr/sbin one switches to the rabbitmq
    # user, whose HOME (and cookie) is not ours.
    rabbitmqctl = shutil.which(
        "rabbitmqctl", path="/usr/lib/rabbitmq/bin"
    ) or shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        raise SystemExit("--erlang-node needs rabbitmqctl")
    window = int(args.seconds * 1000)
    expression = (
        "{R0, _} = erlang:statistics(reductions), "
        f"timer:sleep({window}), "
        "{R1, _} = erlang:statistics(reductions), R1 - R0."
    )
    env = {**os.environ, "HOME": args.erlang_home} if args.erlang_home else None
    return subprocess.Popen(
        [rabbitmqctl, "-n", args.erlang_node, "eval", expression],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def idle_broker(pid: int, seconds: float) -> float:
    before = sum(cpu_times(pid))
    time.sleep(seconds)
    return (sum(cpu_times(pid)) - before) / seconds


def report(results: dict[str, list[Sample]], idle: float, load: str) -> str:
    lines = [
        f"broker idle: {idle * 100:.1f}% of a core; load average before: {load}",
        "",
        "| case | calls/s | server µs/call | client µs/call | broker µs/call "
        "| total µs/call | broker, runs | broker reductions/call, runs |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for case, samples in results.items():

        def median(values: list[float]) -> float:
            return statistics.median(values)

        rate = median([s.rate for s in samples])
        per = {
            role: median([s.per_call(role) for s in samples])
            for role in ("server", "client", "broker")
        }
        total = median(
            [
                sum(s.per_call(r) for r in ("server", "client", "broker"))
                for s in samples
            ]
        )
        runs = " / ".join(f"{s.per_call('broker'):.0f}" for s in samples)
        reductions = [s.reductions_per_call() for s in samples]
        reduction_runs = " / ".join(f"{r:,.0f}" for r in reductions)
        lines.append(
            f"| `{case}` | {rate:,.0f} | {per['server']:.0f} | {per['client']:.0f} "
            f"| {per['broker']:.0f} | {total:.0f} | {runs} "
            f"| **{median(reductions):,.0f}** ({reduction_runs}) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.costs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--amqp-uri", required=True)
    parser.add_argument("--broker-pid", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--erlang-node", help="the broker's node name, for its reductions per call"
    )
    parser.add_argument("--erlang-home", help="HOME holding that node's cookie")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.broker_pid is None:
        args.broker_pid = broker_pid()
    load = Path("/proc/loadavg").read_text().split()[0]
    idle = idle_broker(args.broker_pid, 3.0)
    results: dict[str, list[Sample]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory(prefix="bench-costs-") as tmp:
        for turn in range(args.repeat):
            for case in args.cases:
                sample = measure(case, args, Path(tmp))
                results[case].append(sample)
                print(
                    f"run {turn + 1} {case}: {sample.rate:,.0f} calls/s, "
                    + ", ".join(
                        f"{role} {sample.per_call(role):.0f} µs"
                        for role in sample.cores
                    )
                    + f", {sample.reductions_per_call():,.0f} reductions",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(results, idle, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
